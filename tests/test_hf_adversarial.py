"""Hugging Face checkpoints that transformers 5 reads one way and rmlab once read another.

Each case is a file transformers itself loads: rmlab must compute what transformers computes on
it, or refuse it with one line. transformers is the oracle (its model's logits, its tokenizer's
ids, its parsed config), so each test also shows what transformers does with the file.
"""
import json
import logging
import os
import shutil

import pytest
import torch
import transformers

from model import Tokenizer
from model.checkpoint import CheckpointError, load_checkpoint
from model.tokenizer import load_tokenizer
from test_hf_configs import LINEAR, LLAMA3, assert_logits_close, edit_config, hf_model, ids, logits_of
from test_tokenizers import llama3_style_dir


def hf_logits(d, x):
    hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return logits_of(hf, x)


# ---- config.json ------------------------------------------------------------------------------

@pytest.mark.parametrize("empty", [None, {}])
def test_an_empty_rope_scaling_beside_rope_parameters_is_not_read(tmp_path, empty):
    """transformers reads rope_parameters when rope_scaling is null or {} (4.x configs write null)."""
    hf_model({**LLAMA3, "rope_theta": 5e5}).save_pretrained(tmp_path)
    edit_config(tmp_path, lambda c: c.update(rope_scaling=empty))
    assert transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_type"] == "llama3"
    x = ids()
    assert_logits_close(logits_of(load_checkpoint(tmp_path).model.eval(), x), hf_logits(tmp_path, x))


def test_a_theta_only_in_rope_parameters_beside_rope_scaling_is_refused(tmp_path):
    """With rope_scaling set, transformers reads it alone, and rope_theta from the top level
    (10000 when absent): the 5e5 in rope_parameters is not used. rmlab used it: logits differed."""
    hf_model({**LINEAR, "rope_theta": 5e5}).save_pretrained(tmp_path)
    edit_config(tmp_path, lambda c: (c.pop("rope_theta", None), c.update(rope_scaling=dict(LINEAR))))
    assert transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_theta"] == 10000.0
    with pytest.raises(CheckpointError, match="has rope_theta 500000.0, which transformers ignores beside "
                                              "'rope_scaling'"):
        load_checkpoint(tmp_path)
    # the same file with the theta transformers reads, given at the top level, loads exactly
    edit_config(tmp_path, lambda c: c.update(rope_theta=5e5))
    x = ids()
    assert_logits_close(logits_of(load_checkpoint(tmp_path).model.eval(), x), hf_logits(tmp_path, x))


def test_a_partial_rotary_factor_transformers_wrote_under_default_rope_loads(tmp_path):
    """transformers writes a partial_rotary_factor into rope_parameters and its Llama ignores it
    under default RoPE (whole heads rotate): rmlab refused the file it reads."""
    hf_model({"rope_type": "default", "rope_theta": 1e4}, partial_rotary_factor=0.5).save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["rope_parameters"]["partial_rotary_factor"] == 0.5
    x = ids()
    assert_logits_close(logits_of(load_checkpoint(tmp_path).model.eval(), x), hf_logits(tmp_path, x))


def test_hidden_act_swish_is_silu(tmp_path):
    """transformers' ACT2FN["swish"] is SiLU: the same Llama, which rmlab refused."""
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(transformers.activations.ACT2FN["swish"](x), torch.nn.functional.silu(x))
    hf_model({"rope_type": "default", "rope_theta": 1e4}).save_pretrained(tmp_path)
    edit_config(tmp_path, lambda c: c.update(hidden_act="swish"))
    x = ids()
    assert_logits_close(logits_of(load_checkpoint(tmp_path).model.eval(), x), hf_logits(tmp_path, x))


def test_a_tied_head_saved_under_lm_head_only_loads(tmp_path):
    """safetensors' save_model keeps one name of a tied pair, the first in sorted order:
    lm_head.weight. transformers ties it back to the embedding; rmlab said it was missing."""
    from safetensors.torch import load_file, save_model
    untied = hf_model({"rope_type": "default", "rope_theta": 1e4})
    config = untied.config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    hf.save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    save_model(hf, str(tmp_path / "model.safetensors"))
    names = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" in names and "model.embed_tokens.weight" not in names
    x = ids()
    ours = load_checkpoint(tmp_path).model.eval()
    assert ours.head.weight is ours.tok_embeddings.weight
    assert_logits_close(logits_of(ours, x), hf_logits(tmp_path, x))


# ---- tokenizers ---------------------------------------------------------------------------------

TEXTS = ["hello world", "the cat sat", "cat 12 on the mat"]


@pytest.fixture(scope="module")
def sp_dirs(tmp_path_factory):
    """A SentencePiece tokenizer.model dir, and the tokenizer.json dir transformers converts it to."""
    root = tmp_path_factory.mktemp("sp")
    texts = [f"the cat {n} sat on the mat, hello world" for n in range(200)]
    Tokenizer.train(texts, str(root / "model" / "tokenizer"), vocab_size=300)
    with open(root / "model" / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}, f)
    transformers.AutoTokenizer.from_pretrained(root / "model").save_pretrained(root / "json")
    if os.path.exists(root / "json" / "tokenizer.model"):
        os.remove(root / "json" / "tokenizer.model")
    return {"tokenizer.model": root / "model", "tokenizer.json": root / "json"}


@pytest.mark.parametrize("which", ["tokenizer.model", "tokenizer.json"])
def test_add_prefix_space_of_a_llama_tokenizer_is_followed_or_refused(tmp_path, sp_dirs, which):
    """transformers' LlamaTokenizer puts '▁' before a text iff tokenizer_config's add_prefix_space
    says so, whatever tokenizer.model or tokenizer.json does: every id differs when the two disagree.
    rmlab read the file alone; now it refuses the disagreement."""
    file_alone = load_tokenizer(str(sp_dirs[which]))
    for add_prefix_space in (True, False):
        d = tmp_path / str(add_prefix_space)
        shutil.copytree(sp_dirs[which], d)
        with open(d / "tokenizer_config.json") as f:
            tc = json.load(f)
        with open(d / "tokenizer_config.json", "w") as f:
            json.dump({**tc, "add_prefix_space": add_prefix_space}, f)
        theirs = [transformers.AutoTokenizer.from_pretrained(d)(t).input_ids for t in TEXTS]
        if add_prefix_space:            # what the file does: the same ids
            ours = load_tokenizer(str(d))
            assert [ours.bos_prefix + ours.encode(t) for t in TEXTS] == theirs
            continue
        assert [file_alone.bos_prefix + file_alone.encode(t) for t in TEXTS] != theirs
        with pytest.raises(ValueError, match="add_prefix_space is False but .* puts '▁' before a text"):
            load_tokenizer(str(d))


def test_add_bos_token_that_the_post_processor_contradicts_is_said(tmp_path, caplog):
    """Beside a tokenizer.json transformers 5 drops add_bos_token and the post-processor decides;
    rmlab follows add_bos_token (transformers 4's LlamaTokenizerFast did): the disagreement is said."""
    d, tok_ids = llama3_style_dir(str(tmp_path / "tok"), add_bos_key=False)
    bos = tok_ids["<|begin_of_text|>"]
    assert transformers.AutoTokenizer.from_pretrained(d)("hello").input_ids[0] == bos
    with caplog.at_level(logging.WARNING, logger="rmlab.tokenizer"):
        tok = load_tokenizer(d)
    assert tok.bos_prefix == [] and "add_bos_token is False but the post-processor" in caplog.text
    caplog.clear()
    d, _ = llama3_style_dir(str(tmp_path / "agrees"))
    with caplog.at_level(logging.WARNING, logger="rmlab.tokenizer"):
        assert load_tokenizer(d).bos_prefix == [bos]
    assert "add_bos_token" not in caplog.text


@pytest.mark.parametrize("setting", ["truncation", "padding"])
def test_truncation_or_padding_saved_in_tokenizer_json_is_not_applied(tmp_path, setting):
    """A tokenizer.json saved with truncation or padding enabled: transformers applies neither
    unless asked; rmlab's encode() cut every text at 4 tokens, or padded it (EOS after the pads)."""
    from tokenizers import Tokenizer as Backend
    d, tok_ids = llama3_style_dir(str(tmp_path / "tok"))
    backend = Backend.from_file(os.path.join(d, "tokenizer.json"))
    if setting == "truncation":
        backend.enable_truncation(max_length=4)
    else:
        backend.enable_padding(length=16, pad_id=tok_ids["<|reserved_special_token_0|>"],
                               pad_token="<|reserved_special_token_0|>", direction="left")
    backend.save(os.path.join(d, "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(d)
    ours = load_tokenizer(d)
    for text in ("hello", "hello hello hello hello"):
        assert ours.bos_prefix + ours.encode(text) == hf(text).input_ids
    assert ours.bos_prefix == [tok_ids["<|begin_of_text|>"]]


def test_a_bos_that_only_the_post_processor_names_is_added(tmp_path):
    """No bos_token in tokenizer_config.json and no bos_token_id in config.json, but the
    post-processor adds <|begin_of_text|>: transformers adds it; rmlab added none."""
    d, tok_ids = llama3_style_dir(str(tmp_path / "tok"))
    for name, key in (("tokenizer_config.json", "bos_token"), ("config.json", "bos_token_id")):
        with open(os.path.join(d, name)) as f:
            content = json.load(f)
        content.pop(key)
        with open(os.path.join(d, name), "w") as f:
            json.dump(content, f)
    hf = transformers.AutoTokenizer.from_pretrained(d)
    ours = load_tokenizer(d)
    assert ours.bos_id == tok_ids["<|begin_of_text|>"]
    for text in ("hello", "hello world"):
        assert ours.bos_prefix + ours.encode(text) == hf(text).input_ids
