"""Checkpoints written by transformers itself (5.x `save_pretrained`), and 4.x configs edited by hand.

transformers is the oracle here: its own LlamaForCausalLM computes the logits on the same file,
so a config key we read wrongly (RoPE theta, scaling, head_dim) shows up as a logit gap. Each
scaled case also checks that dropping the scaling would have moved logits by far more than the
tolerance, so the comparison can tell the two apart.
"""
import copy
import json
import logging
import os

import pytest
import torch
import transformers

from model import Llama, LlamaConfig
from model.checkpoint import CheckpointError, export_hf, load_checkpoint

V, D, N_HEADS, N_KV, N_LAYERS, HIDDEN, T = 96, 32, 4, 2, 2, 48, 48

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
LINEAR = {"rope_type": "linear", "factor": 4.0}


def hf_model(rope_parameters, seed=0, **extra):
    """A random transformers LlamaForCausalLM with weights large enough that RoPE errors show."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=HIDDEN, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=N_KV, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_parameters=copy.deepcopy(rope_parameters), tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3, **extra)
    return transformers.LlamaForCausalLM(config).eval()


def ids(seed=0, batch=2):
    return torch.randint(3, V, (batch, T), generator=torch.Generator().manual_seed(seed))


def logits_of(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def assert_logits_close(ours, theirs):
    """1e-5 relative to the largest logit: transformers builds RoPE speeds in float32, we in float64,
    which alone moves these logits (up to ~7) by ~2e-5; a wrong theta or scaling moves them by > 1e-3."""
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * max(1.0, float(theirs.abs().max())))


def edit_config(d, fn):
    path = os.path.join(d, "config.json")
    with open(path) as f:
        config = json.load(f)
    fn(config)
    with open(path, "w") as f:
        json.dump(config, f)


CASES = {
    "theta 5e4": {"rope_type": "default", "rope_theta": 5e4},
    "theta 5e5 (Llama 3)": {"rope_type": "default", "rope_theta": 5e5},
    "llama3 scaling": {**LLAMA3, "rope_theta": 5e5},
    "linear scaling": {**LINEAR, "rope_theta": 1e4},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers5_save_pretrained_loads_exactly(tmp_path, case):
    hf = hf_model(CASES[case])
    hf.save_pretrained(tmp_path / "hf")
    with open(tmp_path / "hf" / "config.json") as f:
        assert "rope_parameters" in json.load(f)       # the 5.x layout, as written by transformers
    ours = load_checkpoint(tmp_path / "hf").model.eval()
    x = ids()
    assert_logits_close(logits_of(ours, x), logits_of(hf, x))
    # The same weights with theta 10000 and no scaling (what a reader of top-level keys saw) differ.
    wrong_cfg = LlamaConfig(**{**ours.config.to_dict(), "rope_theta": 10000.0, "rope_scaling": None})
    wrong = Llama(wrong_cfg).eval()
    wrong.load_state_dict(ours.state_dict())
    assert (logits_of(wrong, x) - logits_of(hf, x)).abs().max() > 1e-3


@pytest.mark.parametrize("spelling", ["type", "rope_type"])
@pytest.mark.parametrize("case", ["llama3 scaling", "linear scaling", "theta 5e5 (Llama 3)"])
def test_hand_edited_4x_configs_load_exactly(tmp_path, case, spelling):
    """4.x keeps rope_theta at the top level and the scaling in rope_scaling ('type' in old files)."""
    params = CASES[case]
    hf = hf_model(params, seed=1)
    hf.save_pretrained(tmp_path / "hf")

    def to_4x(config):
        del config["rope_parameters"]
        config["rope_theta"] = params["rope_theta"]
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        scaling[spelling] = scaling.pop("rope_type")
        config["rope_scaling"] = scaling if scaling[spelling] != "default" else {spelling: "default"}

    edit_config(tmp_path / "hf", to_4x)
    ours = load_checkpoint(tmp_path / "hf").model.eval()
    x = ids(1)
    assert_logits_close(logits_of(ours, x), logits_of(hf, x))


@pytest.mark.parametrize("layout", ["5.x", "4.x"])
def test_a_top_level_original_max_position_embeddings_wins_as_in_transformers(tmp_path, layout):
    """Phi-3-style configs keep the pretraining length at the top level; transformers 5 lets it win
    over the nested value (standardize_rope_params). Here 4 against 16 moves the logits by > 1e-3."""
    hf = hf_model(CASES["llama3 scaling"], seed=5)
    hf.save_pretrained(tmp_path / "hf")

    def edit(config):
        config["original_max_position_embeddings"] = 4
        if layout == "4.x":
            config["rope_theta"] = config["rope_parameters"].pop("rope_theta")
            config["rope_scaling"] = config.pop("rope_parameters")

    edit_config(tmp_path / "hf", edit)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_checkpoint(tmp_path / "hf").model.eval()
    assert ours.config.rope_scaling["original_max_position_embeddings"] == 4
    x = ids(5)
    assert_logits_close(logits_of(ours, x), logits_of(theirs, x))
    assert (logits_of(hf, x) - logits_of(theirs, x)).abs().max() > 1e-3      # the key matters


def test_head_dim_and_pretraining_tp(tmp_path):
    """head_dim != hidden / heads is implemented; pretraining_tp is the same math and is accepted."""
    hf = hf_model({"rope_type": "default", "rope_theta": 1e4}, seed=2, head_dim=16, pretraining_tp=2)
    hf.save_pretrained(tmp_path / "hf")
    ck = load_checkpoint(tmp_path / "hf")
    assert ck.model.config.head_dim == 16
    assert_logits_close(logits_of(ck.model.eval(), ids(2)), logits_of(hf, ids(2)))


def test_sharded_save_pretrained(tmp_path):
    hf = hf_model(CASES["llama3 scaling"], seed=3)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")
    ours = load_checkpoint(tmp_path / "hf").model.eval()
    assert_logits_close(logits_of(ours, ids(3)), logits_of(hf, ids(3)))


REFUSED = {
    "yarn": (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                 "original_max_position_embeddings": 16}), "rope_type 'yarn'"),
    "dynamic": (lambda c: c.update(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
                "rope_type 'dynamic'"),
    "longrope": (lambda c: c.update(rope_scaling={"type": "longrope", "factor": 2.0}), "rope_type 'longrope'"),
    "unknown field": (lambda c: c["rope_parameters"].update(beta_fast=32), r"\['beta_fast'\]"),
    "llama3 field missing": (lambda c: c.update(rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                                                 "rope_theta": 1e4}), "takes exactly the fields"),
    "disagreeing spellings": (lambda c: c.update(rope_theta=123.0), "'rope_theta' is 123.0"),
    "no model_type": (lambda c: c.pop("model_type"), "'model_type' is missing"),
    "mistral": (lambda c: c.update(model_type="mistral"), "'model_type' is 'mistral'"),
    "attention_bias": (lambda c: c.update(attention_bias=True), "'attention_bias' is true"),
    "mlp_bias": (lambda c: c.update(mlp_bias=True), "'mlp_bias' is true"),
    "sliding_window": (lambda c: c.update(sliding_window=4096), "'sliding_window' is 4096"),
    "per-layer rope": (lambda c: c.update(rope_parameters={"full_attention": {"rope_type": "default"}}),
                       "per layer type"),
    # transformers 5 moves it into the RoPE parameters and rotates half of each head under scaling
    "partial rotary, top level": (lambda c: c.update(
        partial_rotary_factor=0.5, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e4}),
        "'partial_rotary_factor' is 0.5"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_math_changing_keys_are_refused_with_one_line(tmp_path, case):
    hf_model(CASES["theta 5e4"], seed=4).save_pretrained(tmp_path / "hf")
    edit, message = REFUSED[case]
    edit_config(tmp_path / "hf", edit)
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(tmp_path / "hf")
    assert str(tmp_path / "hf" / "config.json") in str(e.value) and "\n" not in str(e.value)


def test_harmless_4x_default_scaling_is_accepted(tmp_path):
    hf = hf_model(CASES["theta 5e4"], seed=5)
    hf.save_pretrained(tmp_path / "hf")
    edit_config(tmp_path / "hf", lambda c: c.update(rope_scaling={"rope_type": "default"}, rope_theta=5e4))
    ours = load_checkpoint(tmp_path / "hf").model.eval()
    assert_logits_close(logits_of(ours, ids(5)), logits_of(hf, ids(5)))


# ---- export_hf: read back by transformers, as 5.x and as 4.x would read it ------------------------

def our_model(scaling, head="lm", seed=6):
    torch.manual_seed(seed)
    cfg = LlamaConfig(dim=D, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV, vocab_size=V, hidden_dim=HIDDEN,
                      rope_theta=5e5, rope_scaling=scaling, max_seq_len=64)
    model = Llama(cfg, head=head).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("scaling", [None, LLAMA3, LINEAR], ids=["none", "llama3", "linear"])
def test_export_hf_round_trips_through_transformers(tmp_path, scaling):
    model = our_model(scaling)
    hf = transformers.LlamaForCausalLM.from_pretrained(export_hf(model, tmp_path / "out"), dtype=torch.float32).eval()
    x = ids(6)
    assert_logits_close(logits_of(model, x), logits_of(hf, x))
    # A 4.x reader takes rope_theta and rope_scaling; simulate it by leaving only those keys.
    edit_config(tmp_path / "out", lambda c: c.pop("rope_parameters"))
    hf4 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert_logits_close(logits_of(model, x), logits_of(hf4, x))
    # transformers' own save_pretrained (5.x layout) -> rmlab: the manifest-free round trip stays exact.
    hf.save_pretrained(tmp_path / "again")
    back = load_checkpoint(tmp_path / "again").model.eval()
    assert back.config.rope_scaling == model.config.rope_scaling and back.config.rope_theta == 5e5
    assert_logits_close(logits_of(back, x), logits_of(model, x))


def test_export_refuses_what_transformers_cannot_load(tmp_path):
    """transformers 5 refuses hidden_size % num_attention_heads != 0 even with head_dim given
    (LlamaConfig's validation); rmlab runs such a model, but does not write an export that fails."""
    from model import LlamaConfig
    model = Llama(LlamaConfig(dim=60, n_layers=1, n_heads=8, n_kv_heads=4, head_dim=8, hidden_dim=64,
                              vocab_size=64, max_seq_len=32), head="lm")
    with pytest.raises(ValueError, match="not a multiple of its 8 heads"):
        export_hf(model, tmp_path / "out")
    with pytest.raises(Exception, match="multiple of the number of attention heads"):   # why: transformers' own check
        transformers.LlamaConfig(hidden_size=60, num_attention_heads=8, head_dim=8)


def test_a_reward_model_whose_pad_is_eos_is_warned_about(tmp_path, caplog):
    """transformers reads a score at the last token that is not pad; with pad = eos that is the
    token before the EOS rmlab reads at, so the two disagree: loading says so."""
    model = our_model(None, head="reward", seed=8)
    d = export_hf(model, tmp_path / "rm")
    eos = 2
    edit_config(d, lambda c: c.update(pad_token_id=eos, eos_token_id=eos))
    x = ids(5)[:1]
    x[x == eos] = 5
    x[0, -1] = eos                                                       # a sequence ending with EOS
    hf = transformers.LlamaForSequenceClassification.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        assert abs(float(hf(x).logits[0, 0]) - float(model(x)[0] - model.head.bias)) > 1e-3
    with caplog.at_level(logging.WARNING):
        load_checkpoint(d)
    assert "pad_token_id is an eos id" in caplog.text


def test_exported_reward_model_without_tokenizer_takes_padded_batches(tmp_path):
    """pad_token_id is always written, so transformers scores a right-padded batch of two."""
    model = our_model(LLAMA3, head="reward", seed=7)
    d = export_hf(model, tmp_path / "rm")
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    assert config["pad_token_id"] is not None and config["pad_token_id"] != config["eos_token_id"]
    hf = transformers.LlamaForSequenceClassification.from_pretrained(d, dtype=torch.float32).eval()
    pad = config["pad_token_id"]
    x = ids(7)
    x[x == pad] = 5
    x[1, 30:] = pad                                                    # row 1 is 30 tokens long
    mask = (x != pad).long()
    with torch.no_grad():
        theirs = hf(x, attention_mask=mask).logits[:, 0]
        ours = model(x, attention_mask=mask) - model.head.bias         # HF's score has no bias
    assert_logits_close(ours, theirs)


def test_scaled_rope_in_packed_rows_and_kv_cache_decode(tmp_path):
    """Every RoPE path uses the scaling: a packed row equals its sequences alone, and greedy decoding
    with the KV cache equals transformers' greedy decoding on the same weights."""
    model = our_model(LLAMA3, seed=8)
    a, b = ids(8, 1)[0, :30], ids(9, 1)[0, :18]
    packed = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(30), torch.arange(18)])[None]
    block = torch.zeros(48, 48, dtype=torch.bool)
    block[:30, :30] = torch.ones(30, 30, dtype=torch.bool).tril()
    block[30:, 30:] = torch.ones(18, 18, dtype=torch.bool).tril()
    with torch.no_grad():
        together = model(packed, attention_mask=block[None], position_ids=pos)[0]
        assert_logits_close(together[:30], model(a[None])[0])
        assert_logits_close(together[30:], model(b[None])[0])
    hf = transformers.LlamaForCausalLM.from_pretrained(export_hf(model, tmp_path / "hf"), dtype=torch.float32).eval()
    prompt = a[:20].tolist()
    ours, _ = model.generate([prompt], max_new_tokens=25, temperature=0)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=25, do_sample=False, min_new_tokens=25,
                         pad_token_id=0)[0, 20:].tolist()
    assert ours[0] == theirs


def test_a_tied_config_with_its_own_lm_head_loads_untied_like_transformers(tmp_path):
    hf = hf_model(CASES["theta 5e4"], seed=9)                       # untied: lm_head differs from the embedding
    hf.save_pretrained(tmp_path / "hf")
    edit_config(tmp_path / "hf", lambda c: c.update(tie_word_embeddings=True))
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = load_checkpoint(tmp_path / "hf").model.eval()
    assert not ours.config.tie_embeddings
    assert_logits_close(logits_of(ours, ids(9)), logits_of(theirs, ids(9)))


@pytest.mark.parametrize("key,value", [("hidden_size", 32.0), ("num_hidden_layers", "2"), ("rms_norm_eps", "1e-5"),
                                       ("tie_word_embeddings", "false"), ("vocab_size", True)])
def test_config_numbers_of_the_wrong_type_are_one_line(tmp_path, key, value):
    hf_model(CASES["theta 5e4"], seed=10).save_pretrained(tmp_path / "hf")
    edit_config(tmp_path / "hf", lambda c: c.update({key: value}))
    with pytest.raises(CheckpointError, match=f"field '{key}' is {value!r}"):
        load_checkpoint(tmp_path / "hf")
