"""--dtype: which precision auto picks, and what bf16 autocast costs in accuracy on the real model."""
import pytest
import torch
import torch.nn.functional as F

from model.precision import autocast, has_bf16_matrix_units, resolve_dtype

CPU = torch.device("cpu")


def test_resolve_dtype():
    assert resolve_dtype("fp32", CPU) == ("fp32", "as asked")
    assert resolve_dtype("bf16", CPU) == ("bf16", "as asked")
    chosen, why = resolve_dtype("auto", CPU)
    assert chosen == ("bf16" if has_bf16_matrix_units(CPU) else "fp32") and why.startswith("auto")
    with pytest.raises(ValueError, match="--dtype 'fp16'"):
        resolve_dtype("fp16", CPU)
    # auto on a CPU: bf16 only for models wide enough to gain (the default preset is 128 wide,
    # SmolLM2 576); an explicit choice is never overridden
    assert resolve_dtype("auto", CPU, 128)[0] == "fp32" and resolve_dtype("bf16", CPU, 128)[0] == "bf16"
    assert resolve_dtype("auto", CPU, 576)[0] == ("bf16" if has_bf16_matrix_units(CPU) else "fp32")


def test_amx_detection_agrees_with_the_cpu_flags():
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    assert has_bf16_matrix_units(CPU) == ("amx_bf16" in flags and "amx_tile" in flags)


def test_bf16_autocast_on_the_real_model(smollm2):
    """Next-token loss within 2e-2 of fp32 and the same argmax almost everywhere; rewards read
    through the scalar head stay fp32 (not rounded to bf16's 1/32 steps near 8)."""
    model, tok = smollm2.model, smollm2.tokenizer
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 6)])
    with torch.no_grad():
        fp32 = model(ids)
        with autocast("bf16", CPU):
            bf16 = model(ids)
    loss = lambda logits: F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    assert abs(float(loss(bf16)) - float(loss(fp32))) < 2e-2
    assert (bf16.argmax(-1) == fp32.argmax(-1)).float().mean() > 0.95


def test_the_scalar_head_stays_fp32_under_autocast():
    from model import Llama, get_preset
    torch.manual_seed(0)
    rm = Llama(get_preset("tiny"), head="reward")
    torch.nn.init.normal_(rm.head.weight, std=2.0)                       # rewards of order 10
    h = torch.randn(2, 9, rm.config.dim).to(torch.bfloat16)
    with autocast("bf16", CPU):
        rewards = rm.values(h)
    assert rewards.dtype == torch.float32
    torch.testing.assert_close(rewards, rm.values(h.float()), rtol=0, atol=1e-5)


def test_a_bf16_checkpoint_computes_in_fp32_when_fp32_is_asked(tmp_path):
    """Hub checkpoints are mostly bf16 on disk. load_checkpoint casts to fp32 by default (training
    steps fp32 weights; --dtype bf16 is autocast over them), so --dtype fp32 computes in fp32."""
    from model import Llama, LlamaConfig
    from model.checkpoint import export_hf, load_checkpoint
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48,
                              max_seq_len=16)).to(torch.bfloat16)
    export_hf(model, tmp_path / "hf")
    loaded = load_checkpoint(tmp_path / "hf").model
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert load_checkpoint(tmp_path / "hf", dtype=None).model.tok_embeddings.weight.dtype == torch.bfloat16
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.float()(x)              # the same bf16 values, computed in fp32
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)


def test_cuda_before_ampere_has_no_bf16_matrix_units(monkeypatch):
    """torch.cuda.is_bf16_supported() is True on a Turing GPU (emulated bf16); auto must stay fp32
    there."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert not has_bf16_matrix_units(torch.device("cuda"))
    assert resolve_dtype("auto", torch.device("cuda"))[0] == "fp32"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_dtype("auto", torch.device("cuda"))[0] == "bf16"
