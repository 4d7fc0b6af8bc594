"""kernels/logprobs.py: the fused token log-prob kernels (through the interpreter, fp32) and
the PyTorch reference, against log_softmax(h @ W.T / τ).gather written out here in float64.

The interpreter runs one program at a time, so shapes are small; V is never a power of two
and the cases cross row blocks, vocabulary blocks, vocabulary splits and D blocks. bf16 is
covered by the reference path here and by the compile test (tests/test_kernel_build.py).
"""
import pytest
import torch

from kernels import _dispatch
from kernels import logprobs as lp
from kernels.logprobs import token_logprobs, token_logprobs_reference

needs_interpreter = pytest.mark.skipif(
    not _dispatch.interpreter_on() and not torch.cuda.is_available(),
    reason="Triton path needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100


def make_case(lead_shape, V, D, logit_scale=1.0, n_ignored=1, seed=0):
    """h (*lead_shape, D), W (V, D) with logits of std ~logit_scale, targets (*lead_shape).

    The first targets are pinned to 0 and V-1 (the first and the ragged last vocabulary
    block); the last n_ignored positions are ignore_index."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead_shape, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * (logit_scale / D ** 0.5)
    targets = torch.randint(0, V, lead_shape, generator=gen)
    flat = targets.view(-1)
    flat[0], flat[1] = 0, V - 1
    if n_ignored:
        flat[-n_ignored:] = IGNORE
    return h, weight, targets


def float64_logprobs(h, weight, targets, temperature):
    """The spec, written independently of kernels/logprobs.py, in float64."""
    keep = targets != IGNORE
    logits = h.double() @ weight.double().T / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * keep


def value_and_grads(fn, h, weight, targets, temperature, dtype=None, seed=1):
    """fn's output and the gradients of sum(g * out) w.r.t. h and W, g a fixed random (...)."""
    h = h.to(DEVICE, dtype or h.dtype).detach().requires_grad_()
    weight = weight.to(DEVICE, dtype or weight.dtype).detach().requires_grad_()
    out = fn(h, weight, targets.to(DEVICE), temperature)
    grad_out = torch.randn(targets.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    dh, dweight = torch.autograd.grad((out * grad_out).sum(), (h, weight))
    return out, dh, dweight


def triton_path(h, weight, targets, temperature):
    return token_logprobs(h, weight, targets, temperature=temperature, impl="triton")


def assert_close(actual, expected, rtol, atol, what):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


CASES = {
    # name: (lead shape, V, D, temperature, logit scale)
    "BxT_V1000_4splits": ((2, 3), 1000, 24, 0.7, 1.0),
    "two_row_blocks_V37": ((70,), 37, 100, 1.0, 1.0),
    "V129_ragged_split": ((5,), 129, 24, 2.0, 1.0),
    "peaked_logits": ((6,), 300, 40, 1.0, 40.0),   # logits ~±100: the online max must hold
}


@needs_interpreter
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_float64_log_softmax_gather(name):
    lead, V, D, temperature, scale = CASES[name]
    h, weight, targets = make_case(lead, V, D, logit_scale=scale)
    out, dh, dweight = value_and_grads(triton_path, h, weight, targets, temperature)
    ref, ref_dh, ref_dweight = value_and_grads(float64_logprobs, h, weight, targets, temperature,
                                               dtype=torch.float64)
    assert out.dtype == torch.float32 and out.shape == targets.shape
    assert dh.dtype == h.dtype and dweight.dtype == weight.dtype
    assert_close(out, ref, rtol=1e-5, atol=2e-5 * scale, what="logp")
    assert_close(dh, ref_dh, rtol=1e-4, atol=2e-5 * scale, what="dh")
    assert_close(dweight, ref_dweight, rtol=1e-4, atol=2e-5, what="dW")
    # ignored positions: exactly 0, and exactly no gradient into their hidden state
    ignored = targets == IGNORE
    assert torch.all(out[ignored.to(out.device)] == 0)
    assert torch.all(dh.reshape(-1, D)[ignored.reshape(-1).to(dh.device)] == 0)


@needs_interpreter
def test_triton_frozen_weight_and_no_grad():
    """π₀ is frozen: only dh is computed; under no_grad the forward alone runs."""
    h, weight, targets = make_case((9,), 77, 24, n_ignored=0)
    h_leaf = h.to(DEVICE).requires_grad_()
    out = token_logprobs(h_leaf, weight.to(DEVICE), targets.to(DEVICE), impl="triton")
    (dh,) = torch.autograd.grad(out.sum(), h_leaf)
    h64 = h.double().requires_grad_()
    (ref_dh,) = torch.autograd.grad(float64_logprobs(h64, weight.double(), targets, 1.0).sum(), h64)
    assert_close(dh, ref_dh, rtol=1e-4, atol=2e-5, what="dh")
    with torch.no_grad():
        again = token_logprobs(h.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), impl="triton")
    assert torch.equal(again, out.detach())


@needs_interpreter
def test_triton_all_ignored_and_empty():
    h, weight, targets = make_case((4,), 50, 16, n_ignored=0)
    targets[:] = IGNORE
    out, dh, dweight = value_and_grads(triton_path, h, weight, targets, 1.0)
    assert torch.all(out == 0) and torch.all(dh == 0) and torch.all(dweight == 0)
    empty = token_logprobs(h[:0].to(DEVICE), weight.to(DEVICE), targets[:0].to(DEVICE), impl="triton")
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_reference_bf16_against_float64():
    """bf16 inputs, fp32 compute: only the bf16 rounding of h and W should be visible, and
    that rounding is taken out by feeding the float64 spec the same bf16 values."""
    h, weight, targets = make_case((3, 5), 211, 64, logit_scale=3.0)
    h, weight = h.bfloat16(), weight.bfloat16()
    fn = lambda *a: token_logprobs(*a, impl="reference")
    out, dh, dweight = value_and_grads(fn, h, weight, targets, 0.9)
    ref, ref_dh, ref_dweight = value_and_grads(float64_logprobs, h, weight, targets, 0.9, dtype=torch.float64)
    assert out.dtype == torch.float32 and dh.dtype == torch.bfloat16 and dweight.dtype == torch.bfloat16
    assert_close(out, ref, rtol=1e-5, atol=1e-4, what="logp")
    assert_close(dh, ref_dh, rtol=1e-2, atol=1e-3, what="dh")          # bf16 output rounding
    assert_close(dweight, ref_dweight, rtol=1e-2, atol=1e-3, what="dW")


def test_default_cpu_path_is_the_reference(monkeypatch):
    """On CPU the kernels run only when asked for; TRITON_INTERPRET=1 alone never routes there."""
    h, weight, targets = make_case((2, 4), 90, 16)

    def no_kernels(*args):
        raise AssertionError("the Triton path ran")

    monkeypatch.setattr(lp._TokenLogprobs, "apply", no_kernels)
    monkeypatch.delenv("RMLAB_KERNELS", raising=False)
    out = token_logprobs(h, weight, targets, temperature=1.3)
    assert torch.equal(out, token_logprobs_reference(h, weight, targets, 1.3))
    assert_close(out, float64_logprobs(h, weight, targets, 1.3), rtol=1e-5, atol=2e-5, what="logp")
    if not _dispatch.interpreter_on():
        return
    monkeypatch.setenv("RMLAB_KERNELS", "triton")
    with pytest.raises(AssertionError, match="the Triton path ran"):
        token_logprobs(h, weight, targets)


BAD_INPUTS = {
    # name: (change to the good inputs, words the message must contain)
    "weight_D": (lambda c: {**c, "weight": c["weight"][:, :-1]}, "weight"),
    "weight_1d": (lambda c: {**c, "weight": c["weight"][0]}, "weight"),
    "weight_dtype": (lambda c: {**c, "weight": c["weight"].double()}, "weight dtype"),
    "h_int": (lambda c: {**c, "h": c["h"].long()}, "h dtype"),
    "targets_shape": (lambda c: {**c, "targets": c["targets"][:, :-1]}, "targets shape"),
    "targets_float": (lambda c: {**c, "targets": c["targets"].float()}, "targets must be int64"),
    "target_is_V": (lambda c: {**c, "targets": c["targets"].fill_(40)}, "targets must be in [0, V)"),
    "target_negative": (lambda c: {**c, "targets": c["targets"].fill_(-1)}, "targets must be in [0, V)"),
    "temperature_zero": (lambda c: {**c, "temperature": 0.0}, "temperature"),
    "temperature_nan": (lambda c: {**c, "temperature": float("nan")}, "temperature"),
    "ignore_index_positive": (lambda c: {**c, "ignore_index": 3}, "ignore_index"),
    "impl": (lambda c: {**c, "impl": "cuda"}, "impl"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_argument(name):
    h, weight, targets = make_case((2, 3), 40, 8)
    good = dict(h=h, weight=weight, targets=targets, temperature=1.0, ignore_index=IGNORE, impl="reference")
    change, words = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        token_logprobs(**change(good))


@needs_interpreter
def test_triton_path_rejects_float64():
    h, weight, targets = make_case((3,), 40, 8)
    with pytest.raises(ValueError, match="h dtype"):
        token_logprobs(h.double(), weight.double(), targets, impl="triton")


def test_reference_stays_fp32_under_bf16_autocast():
    """Under a caller's bf16 autocast the reference (the CPU path) still computes its logits in
    fp32 (it drifted by 0.04 when autocast ran its matmul in bf16)."""
    h, weight, targets = make_case((3, 5), 70, 24)
    want = token_logprobs_reference(h, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_logprobs_reference(h, weight, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_interpreter
def test_interpreter_refuses_bf16_dots():
    """Triton's interpreter computes a bf16 tl.dot wrongly (errors ~1e10 against fp32, fp16 exact;
    a bare tl.dot shows it), so a bf16 call there is refused instead of returning garbage."""
    if torch.cuda.is_available():
        pytest.skip("compiled kernels on CUDA compute bf16 correctly")
    h, weight, targets = make_case((2, 3), 40, 16)
    with pytest.raises(ValueError, match="interpreter"):
        token_logprobs(h.bfloat16(), weight.bfloat16(), targets, impl="triton")
