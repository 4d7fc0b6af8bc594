"""Hugging Face and Meta checkpoints: loaded logits against a reference written from the papers' formulas.

The checkpoints are written here, by hand, in each format's own layout (HF: rotate-half q/k rows;
Meta: interleaved pairs, split across model-parallel shards). The reference runs on those
tensors directly, in float64, with the RoPE each format publishes, explicit causal softmax
attention, and GQA by head index. It shares no code with model/.
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model import Llama, LlamaConfig, Tokenizer
from model.checkpoint import CheckpointError, export_hf, load_checkpoint

D, N_HEADS, N_KV, N_LAYERS, HF_HIDDEN, THETA, EPS = 32, 4, 2, 2, 48, 500.0, 1e-5
HD = D // N_HEADS
# Meta derives the SwiGLU width: int(2 * 4 * 32 / 3) = 85 -> int(1.3 * 85) = 110 -> next multiple of 16 = 112.
META_MULTIPLE_OF, META_FFN_MULT, META_HIDDEN = 16, 1.3, 112


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"the {w} sat on {n} mats and said {w * 2}" for n in range(40) for w in ("cat", "dog", "ox")]
    return Tokenizer.train(texts, str(tmp_path_factory.mktemp("tok") / "tok"), vocab_size=300)


# ---- the reference ------------------------------------------------------------------------------

def rope_rotate_half(x, theta):
    """HF modeling_llama: x * cos + rotate_half(x) * sin, with cos/sin of cat(freqs, freqs). x (T, H, hd)."""
    T, _, hd = x.shape
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    emb = torch.cat([torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)] * 2, dim=-1)  # (T, hd)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    rotated = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], dim=-1)
    return x * cos + rotated * sin


def rope_complex(x, theta):
    """Meta llama/model.py: consecutive pairs as complex numbers times exp(i * pos * freq). x (T, H, hd)."""
    T, _, hd = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), freqs)                        # (T, hd/2)
    xc = torch.view_as_complex(x.reshape(T, -1, hd // 2, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)


def reference(p, ids, rope, n_heads=N_HEADS, n_kv=N_KV, theta=THETA, eps=EPS):
    """Head output at every position (T, out_rows) of one sequence, float64."""
    p = {k: ([{n: t.double() for n, t in L.items()} for L in v] if k == "layers" else v.double())
         for k, v in p.items()}
    T = len(ids)

    def rmsnorm(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    x = p["emb"][torch.tensor(ids)]                                                         # (T, D)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    for L in p["layers"]:
        h = rmsnorm(x, L["ln1"])
        q = rope((h @ L["q"].T).view(T, n_heads, -1), theta)
        k = rope((h @ L["k"].T).view(T, n_kv, -1), theta)
        v = (h @ L["v"].T).view(T, n_kv, -1)
        heads = []
        for hq in range(n_heads):
            hk = hq // (n_heads // n_kv)                                                    # GQA: query head -> its kv head
            scores = (q[:, hq] @ k[:, hk].T / math.sqrt(q.shape[-1])).masked_fill(future, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v[:, hk])
        x = x + torch.cat(heads, dim=-1) @ L["o"].T
        h = rmsnorm(x, L["ln2"])
        x = x + (F.silu(h @ L["gate"].T) * (h @ L["up"].T)) @ L["down"].T
    return rmsnorm(x, p["norm"]) @ p["out"].T


def random_weights(V, hidden, out_rows, seed, tied=False):
    """Scaled so that attention is peaked and a wrong RoPE layout moves logits by far more than 1e-5."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.3):
        return torch.randn(*shape, generator=g) * std

    layers = [dict(q=rnd(D, D), k=rnd(N_KV * HD, D), v=rnd(N_KV * HD, D), o=rnd(D, D), gate=rnd(hidden, D),
                   up=rnd(hidden, D), down=rnd(D, hidden, std=0.1), ln1=1 + rnd(D, std=0.2),
                   ln2=1 + rnd(D, std=0.2)) for _ in range(N_LAYERS)]
    emb = rnd(V, D)
    return dict(emb=emb, layers=layers, norm=1 + rnd(D, std=0.2), out=emb if tied else rnd(out_rows, D))


# (reference key, HF name, Meta name) for the tensors of block i.
LAYER_NAMES = [("q", "self_attn.q_proj", "attention.wq"), ("k", "self_attn.k_proj", "attention.wk"),
               ("v", "self_attn.v_proj", "attention.wv"), ("o", "self_attn.o_proj", "attention.wo"),
               ("gate", "mlp.gate_proj", "feed_forward.w1"), ("down", "mlp.down_proj", "feed_forward.w2"),
               ("up", "mlp.up_proj", "feed_forward.w3"), ("ln1", "input_layernorm", "attention_norm"),
               ("ln2", "post_attention_layernorm", "ffn_norm")]


def hf_tensors(p, head_name):
    t = {"model.embed_tokens.weight": p["emb"], "model.norm.weight": p["norm"]}
    if head_name:
        t[head_name] = p["out"]
    for i, L in enumerate(p["layers"]):
        t.update({f"model.layers.{i}.{hf}.weight": L[key] for key, hf, _ in LAYER_NAMES})
    return {n: v.contiguous() for n, v in t.items()}


def meta_tensors(p):
    t = {"tok_embeddings.weight": p["emb"], "norm.weight": p["norm"], "output.weight": p["out"]}
    for i, L in enumerate(p["layers"]):
        t.update({f"layers.{i}.{meta}.weight": L[key] for key, _, meta in LAYER_NAMES})
    return t


def hf_config(V, tied=False, arch="LlamaForCausalLM", **extra):
    return {"architectures": [arch], "model_type": "llama", "hidden_size": D, "intermediate_size": HF_HIDDEN,
            "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS, "num_key_value_heads": N_KV,
            "rms_norm_eps": EPS, "rope_theta": THETA, "vocab_size": V, "max_position_embeddings": 64,
            "tie_word_embeddings": tied, "hidden_act": "silu", **extra}


def write_json(path, d):
    with open(path, "w") as f:
        json.dump(d, f)


def write_hf(d, tensors, config, layout="safetensors"):
    """One checkpoint dir in one of HF's three weight layouts."""
    os.makedirs(d, exist_ok=True)
    write_json(os.path.join(d, "config.json"), config)
    if layout == "safetensors":
        save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    elif layout == "bin":
        torch.save(tensors, os.path.join(d, "pytorch_model.bin"))
    else:  # sharded: layer 0 and the embedding in one file, the rest in the other, plus the index
        names = sorted(tensors)
        first = [n for n in names if "layers.0." in n or "embed" in n]
        shards = {"model-00001-of-00002.safetensors": first,
                  "model-00002-of-00002.safetensors": [n for n in names if n not in first]}
        for fname, shard_names in shards.items():
            save_file({n: tensors[n] for n in shard_names}, os.path.join(d, fname), metadata={"format": "pt"})
        write_json(os.path.join(d, "model.safetensors.index.json"),
                   {"metadata": {}, "weight_map": {n: f for f, ns in shards.items() for n in ns}})
    return d


def batch_ids(V, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, V, (2, 11), generator=g)


def assert_matches_reference(logits, p, ids, rope, atol=1e-4):
    """logits (B, T, out) from our model; the reference runs one row at a time. fp32 against
    float64 lands 0.7e-5 to 1.1e-5 off depending on the CPU's kernels (AVX-512 or AVX2); a wrong
    RoPE layout or weight permutation is over 1e-2 off (the tests check that too)."""
    for b in range(ids.shape[0]):
        want = reference(p, ids[b].tolist(), rope)
        torch.testing.assert_close(logits[b].double(), want, rtol=0, atol=atol)


# ---- Hugging Face ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,tied", [("safetensors", False), ("sharded", True), ("bin", False)])
def test_hf_causal_lm_matches_reference(tmp_path, tok, layout, tied):
    V = tok.vocab_size
    p = random_weights(V, HF_HIDDEN, V, seed=1, tied=tied)
    d = write_hf(str(tmp_path / "hf"), hf_tensors(p, None if tied else "lm_head.weight"), hf_config(V, tied), layout)
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.write(tok.model_proto())
    ck = load_checkpoint(d)
    model = ck.model
    assert model.head_kind == "lm" and ck.new_params == [] and ck.tokenizer.vocab_size == V
    assert model.config.rope_theta == THETA and model.config.n_kv_heads == N_KV
    assert (model.head.weight is model.tok_embeddings.weight) == tied
    ids = batch_ids(V)
    with torch.no_grad():
        logits = model(ids)
    assert_matches_reference(logits, p, ids, rope_rotate_half)
    # The test can see a layout error: Meta's RoPE on these HF-layout weights is far off.
    wrong = reference(p, ids[0].tolist(), rope_complex)
    assert (logits[0].double() - wrong).abs().max() > 1e-2


def test_hf_sequence_classification_is_a_reward_model(tmp_path, tok):
    V = tok.vocab_size
    p = random_weights(V, HF_HIDDEN, 1, seed=2)
    config = hf_config(V, arch="LlamaForSequenceClassification", id2label={"0": "LABEL_0"}, pad_token_id=3)
    model = load_checkpoint(write_hf(str(tmp_path / "rm"), hf_tensors(p, "score.weight"), config)).model
    assert model.head_kind == "reward" and torch.equal(model.head.bias, torch.zeros(1))
    # HF reads the score at the last non-pad token; with right padding that is our last attended token.
    ids = batch_ids(V, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 3
    with torch.no_grad():
        rewards = model(ids, attention_mask=mask)
    want = torch.stack([reference(p, ids[0].tolist(), rope_rotate_half)[-1, 0],
                        reference(p, ids[1, :7].tolist(), rope_rotate_half)[-1, 0]])
    torch.testing.assert_close(rewards.double(), want, rtol=0, atol=1e-5)


def test_lm_loaded_as_reward_reports_new_head(tmp_path, tok, caplog):
    V = tok.vocab_size
    p = random_weights(V, HF_HIDDEN, V, seed=4)
    d = write_hf(str(tmp_path / "hf"), hf_tensors(p, "lm_head.weight"), hf_config(V))
    with caplog.at_level("WARNING"):
        ck = load_checkpoint(d, head="reward")
    assert ck.new_params == ["head.weight", "head.bias"]
    assert "Some weights were newly initialized: ['head.weight', 'head.bias']" in caplog.text
    assert ck.model.head_kind == "reward"
    torch.testing.assert_close(ck.model.tok_embeddings.weight, p["emb"], rtol=0, atol=0)


# ---- Meta -------------------------------------------------------------------------------------------

# How Meta's model-parallel layers split a tensor across ranks (None: replicated), stated here
# independently of model/interop.py.
META_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0}


def write_meta(d, p, n_shards=2, params_extra=None, tokenizer_proto=None, embedding_split=1):
    """Meta's layout: Llama 2's ParallelEmbedding splits dim 1, Llama 3's VocabParallelEmbedding dim 0."""
    os.makedirs(d, exist_ok=True)
    write_json(os.path.join(d, "params.json"),
               {"dim": D, "n_layers": N_LAYERS, "n_heads": N_HEADS, "n_kv_heads": N_KV, "vocab_size": -1,
                "multiple_of": META_MULTIPLE_OF, "ffn_dim_multiplier": META_FFN_MULT, "norm_eps": EPS,
                "rope_theta": THETA, **(params_extra or {})})
    full = meta_tensors(p)
    full["rope.freqs"] = 1.0 / THETA ** (torch.arange(0, HD, 2).float() / HD)   # Llama 2's shards carry it
    for rank in range(n_shards):
        shard = {}
        for name, t in full.items():
            dim = META_SPLIT.get(name.split(".")[-2]) if name.endswith(".weight") else None
            dim = embedding_split if name == "tok_embeddings.weight" else dim
            shard[name] = t.chunk(n_shards, dim=dim)[rank].clone() if dim is not None else t.clone()
        torch.save(shard, os.path.join(d, f"consolidated.{rank:02d}.pth"))
    if tokenizer_proto is not None:  # Meta's download keeps tokenizer.model beside the model dirs
        with open(os.path.join(os.path.dirname(d), "tokenizer.model"), "wb") as f:
            f.write(tokenizer_proto)
    return d


def test_meta_two_shards_match_reference(tmp_path, tok):
    V = tok.vocab_size
    p = random_weights(V, META_HIDDEN, V, seed=5)
    d = write_meta(str(tmp_path / "llama-tiny"), p, n_shards=2, tokenizer_proto=tok.model_proto())
    assert torch.load(os.path.join(d, "consolidated.01.pth"))["tok_embeddings.weight"].shape == (V, D // 2)
    ck = load_checkpoint(d)
    cfg = ck.model.config
    assert (cfg.vocab_size, cfg.hidden_dim, cfg.n_kv_heads, cfg.rope_theta) == (V, META_HIDDEN, N_KV, THETA)
    assert ck.tokenizer is not None and ck.tokenizer.model_proto() == tok.model_proto()
    ids = batch_ids(V, seed=6)
    with torch.no_grad():
        logits = ck.model(ids)
    assert_matches_reference(logits, p, ids, rope_complex)
    wrong = reference(p, ids[0].tolist(), rope_rotate_half)
    assert (logits[0].double() - wrong).abs().max() > 1e-2


def rope_complex_llama3(x, theta, factor=8.0, low=1.0, high=4.0, old_len=8192):
    """Meta's llama3 reference (apply_scaling): each frequency by its wavelength, one at a time."""
    T, _, hd = x.shape
    freqs = []
    for f in (1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)).tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old_len / high:
            freqs.append(f)
        elif wavelen > old_len / low:
            freqs.append(f / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            freqs.append((1 - smooth) * f / factor + smooth * f)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), torch.tensor(freqs, dtype=torch.float64))
    xc = torch.view_as_complex(x.reshape(T, -1, hd // 2, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)


def test_meta_llama3_two_shards_with_scaled_rope(tmp_path, tok):
    """Llama 3: the embedding is split on the vocab (dim 0), and use_scaled_rope means llama3 RoPE."""
    V, theta = tok.vocab_size, 5e5
    p = random_weights(V, META_HIDDEN, V, seed=8)
    d = write_meta(str(tmp_path / "llama3"), p, n_shards=2, embedding_split=0,
                   params_extra={"vocab_size": V, "rope_theta": theta, "use_scaled_rope": True,
                                 "rope_scaling_factor": 8.0})
    assert torch.load(os.path.join(d, "consolidated.01.pth"))["tok_embeddings.weight"].shape == (V // 2, D)
    ck = load_checkpoint(d)
    assert ck.model.config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    ids = torch.randint(4, V, (1, 200), generator=torch.Generator().manual_seed(9))   # long: scaling matters
    with torch.no_grad():
        logits = ck.model(ids)
    want = reference(p, ids[0].tolist(), rope_complex_llama3, theta=theta)
    torch.testing.assert_close(logits[0].double(), want, rtol=0, atol=5e-5)   # fp32 over 200 positions
    unscaled = reference(p, ids[0].tolist(), rope_complex, theta=theta)
    assert (unscaled - want).abs().max() > 1e-2


def test_meta_tiktoken_tokenizer_warns_and_never_blocks_the_weights(tmp_path, tok, caplog):
    p = random_weights(tok.vocab_size, META_HIDDEN, tok.vocab_size, seed=7)
    d = write_meta(str(tmp_path / "llama3"), p, n_shards=1,
                   params_extra={"vocab_size": tok.vocab_size})
    tiktoken_path = os.path.join(d, "tokenizer.model")
    with open(tiktoken_path, "w") as f:  # Llama 3's format: base64 token, rank
        f.write("IQ== 0\nIg== 1\nIw== 2\n")
    ck = load_checkpoint(d)
    assert ck.tokenizer is None
    assert f"{tiktoken_path}: not a SentencePiece model" in caplog.text
    ids = batch_ids(tok.vocab_size)
    assert_matches_reference(ck.model(ids), p, ids, rope_complex)


def test_meta_shards_that_disagree_name_the_shard(tmp_path, tok):
    p = random_weights(tok.vocab_size, META_HIDDEN, tok.vocab_size, seed=8)
    d = write_meta(str(tmp_path / "m"), p, n_shards=2)
    shard1 = os.path.join(d, "consolidated.01.pth")
    sd = torch.load(shard1)
    del sd["layers.1.ffn_norm.weight"]
    torch.save(sd, shard1)
    with pytest.raises(CheckpointError, match="consolidated.01.pth holds other tensors"):
        load_checkpoint(d)


# ---- export ------------------------------------------------------------------------------------------

def random_model(V, head, tied=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(dim=D, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV, vocab_size=V,
                      hidden_dim=HF_HIDDEN, rope_theta=THETA, norm_eps=EPS, max_seq_len=64, tie_embeddings=tied)
    model = Llama(cfg, head=head)
    with torch.no_grad():
        for param in model.parameters():   # wider than the 0.02 init, so that RoPE layout errors show
            param.normal_(0, 0.3)
    return model.to(dtype)


def assert_state_dicts_identical(a, b):
    assert list(a.state_dict()) == list(b.state_dict())
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("head,tied,dtype", [("lm", False, torch.float32), ("lm", True, torch.float32),
                                              ("reward", False, torch.float32), ("lm", False, torch.bfloat16)])
def test_export_then_import_is_exact(tmp_path, tok, head, tied, dtype):
    model = random_model(tok.vocab_size, head, tied, dtype)
    out = export_hf(model, tmp_path / "hf", tokenizer=tok)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == [{"lm": "LlamaForCausalLM", "reward": "LlamaForSequenceClassification"}[head]]
    assert config["tie_word_embeddings"] == tied and ("lm_head.weight" in load_file(os.path.join(out, "model.safetensors"))) == (head == "lm" and not tied)
    ck = load_checkpoint(out, dtype=None)                  # the file's dtype, bit for bit
    assert ck.model.head_kind == head and ck.tokenizer.model_proto() == tok.model_proto()
    assert_state_dicts_identical(model, ck.model)
    assert (ck.model.head.weight is ck.model.tok_embeddings.weight) == tied


def test_exported_files_are_hf_layout(tmp_path, tok):
    # The exported tensors, read with HF's names and HF's RoPE, give our model's logits / rewards.
    V = tok.vocab_size
    for head in ("lm", "reward"):
        model = random_model(V, head, seed=9)
        out = export_hf(model, tmp_path / head)
        t = load_file(os.path.join(out, "model.safetensors"))
        p = dict(emb=t["model.embed_tokens.weight"], norm=t["model.norm.weight"],
                 out=t["lm_head.weight" if head == "lm" else "score.weight"],
                 layers=[{key: t[f"model.layers.{i}.{hf}.weight"] for key, hf, _ in LAYER_NAMES}
                         for i in range(N_LAYERS)])
        ids = batch_ids(V, seed=10)
        with torch.no_grad():
            ours = model(ids)
        if head == "lm":
            assert_matches_reference(ours, p, ids, rope_rotate_half)
            continue
        # HF's score has no bias: the side file holds it, and HF's score = our reward - bias.
        with open(os.path.join(out, "rmlab_reward_bias.json")) as f:
            bias = json.load(f)["bias"]
        assert bias == model.head.bias.item()
        hf_scores = torch.stack([reference(p, ids[b].tolist(), rope_rotate_half)[-1, 0] for b in range(2)])
        torch.testing.assert_close(ours.double() - bias, hf_scores, rtol=0, atol=1e-5)


# ---- bad HF dirs -------------------------------------------------------------------------------------

def test_hf_errors_name_the_file(tmp_path, tok):
    V = tok.vocab_size
    p = random_weights(V, HF_HIDDEN, V, seed=11)
    tensors = hf_tensors(p, "lm_head.weight")

    d = write_hf(str(tmp_path / "scaled"), tensors, hf_config(V, rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    with pytest.raises(CheckpointError, match=r"scaled/config.json: field 'rope_scaling'"):
        load_checkpoint(d)

    d = write_hf(str(tmp_path / "labels"), hf_tensors(p, "score.weight"),
                 hf_config(V, arch="LlamaForSequenceClassification"))   # HF's default num_labels is 2
    with pytest.raises(CheckpointError, match=r"labels/config.json: .*num_labels=1"):
        load_checkpoint(d)

    d = write_hf(str(tmp_path / "shape"), tensors, hf_config(V, num_key_value_heads=4))
    with pytest.raises(CheckpointError, match=r"shape/model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' "
                                              r"has shape \(16, 32\), but the config implies \(32, 32\)"):
        load_checkpoint(d)

    d = write_hf(str(tmp_path / "sharded"), tensors, hf_config(V), layout="sharded")
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match=r"sharded/model-00002-of-00002.safetensors: file not found"):
        load_checkpoint(d)

    extra = {**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(D)}
    del extra["model.norm.weight"]
    d = write_hf(str(tmp_path / "names"), extra, hf_config(V))
    with pytest.raises(CheckpointError, match=r"names/model.safetensors: .*missing \['model.norm.weight'\]; "
                                              r"unexpected \['model.layers.0.self_attn.q_proj.bias'\]"):
        load_checkpoint(d)

    d = write_hf(str(tmp_path / "noweights"), {}, hf_config(V))
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"noweights/config.json: found, but no weights"):
        load_checkpoint(d)


def test_against_transformers(tmp_path, tok):
    import transformers   # a test requirement (requirements.txt): this must run in CI, not skip
    V = tok.vocab_size
    ids = batch_ids(V, seed=12)
    for head, cls in (("lm", transformers.LlamaForCausalLM), ("reward", transformers.LlamaForSequenceClassification)):
        model = random_model(V, head, seed=13)
        hf = cls.from_pretrained(export_hf(model, tmp_path / head), torch_dtype=torch.float32).eval()
        with torch.no_grad():
            ours, theirs = model(ids), hf(ids).logits
        if head == "reward":
            ours = ours - model.head.bias   # HF's score has no bias (see rmlab_reward_bias.json)
            theirs = theirs[:, 0]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
