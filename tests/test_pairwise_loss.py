"""kernels/pairwise_loss.py: the Triton kernels (through the interpreter, fp32) and the
PyTorch reference, against float64 autograd and against losses written out by hand here.

The interpreter runs one program at a time, so shapes are small and odd; bf16/fp16 are
covered by the reference path here and by the compile test (tests/test_kernel_build.py).
"""
import itertools
import math

import pytest
import torch

from kernels import _dispatch, pairwise_margin_loss
from kernels.pairwise_loss import pairwise_margin_loss_reference

needs_interpreter = pytest.mark.skipif(
    not _dispatch.interpreter_on() and not torch.cuda.is_available(),
    reason="Triton path needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(N, T, D, R, P, norm, bias=True, seed=0, dtype=torch.float32):
    """Random inputs; end_idx always holds a duplicated position when R > 2."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, T, D, generator=gen)
    w = torch.randn(D, generator=gen) / math.sqrt(D)
    b = torch.randn(1, generator=gen) if bias else None
    end_idx = torch.randint(0, N * T, (R,), generator=gen)
    if R > 2:
        end_idx[-1] = end_idx[0]
    chosen = torch.randint(0, R, (P,), generator=gen)
    rejected = (chosen + torch.randint(1, R, (P,), generator=gen)) % R  # never == chosen
    pairs = torch.stack([chosen, rejected], dim=1)
    margin = torch.randn(P, generator=gen)
    pair_weight = torch.rand(P, generator=gen) + 0.1
    norm_weight = torch.rand(D, generator=gen) + 0.5 if norm else None
    cast = lambda t: None if t is None else t.to(dtype)
    return dict(h=cast(h), end_idx=end_idx, w=cast(w), b=cast(b), pairs=pairs, margin=margin,
                pair_weight=pair_weight, norm_weight=cast(norm_weight))


def run_with_grads(case, impl, to=None, seed=1):
    """Loss + random upstream grads on rewards and z (so every backward input is exercised).

    Returns (output, {name: grad}) with inputs optionally cast to `to` (torch.float64)."""
    leaves = {k: case[k].detach().to(to or case[k].dtype).requires_grad_()
              for k in ("h", "w", "b", "norm_weight") if case[k] is not None}
    others = {k: v for k, v in case.items() if k not in leaves}
    if to is not None:
        others = {k: (v.to(to) if v is not None and v.is_floating_point() else v) for k, v in others.items()}
    inputs = {k: (v.to(DEVICE) if v is not None else None) for k, v in {**others, **leaves}.items()}
    if impl == "float64":
        out = pairwise_margin_loss_reference(**inputs)
    else:
        out = pairwise_margin_loss(**inputs, impl=impl)
    gen = torch.Generator().manual_seed(seed)
    rbar = torch.randn(out.rewards.shape, generator=gen).to(out.rewards)
    zbar = torch.randn(out.z.shape, generator=gen).to(out.z)
    (out.loss + (out.rewards * rbar).sum() + (out.z * zbar).sum()).backward()
    return out, {k: v.grad for k, v in leaves.items()}


def assert_close(actual, expected, rtol, atol, what):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def assert_matches_float64(case, impl, rtol=2e-5, atol=2e-6):
    out, grads = run_with_grads(case, impl)
    ref, ref_grads = run_with_grads(case, "float64", to=torch.float64)
    for field in ("loss", "rewards", "z"):
        assert_close(getattr(out, field), getattr(ref, field), rtol, atol, field)
        assert getattr(out, field).dtype == torch.float32, field
    assert torch.equal(out.correct.cpu(), ref.correct.cpu()) and torch.equal(out.tie.cpu(), ref.tie.cpu())
    for name, grad in grads.items():
        assert grad.dtype == case[name].dtype, name
        assert_close(grad, ref_grads[name], rtol, atol, f"d{name}")
    return out, grads


# ----------------------------------------------------------------------------------------
# Forward and every gradient against float64 autograd.

SHAPES = [  # N, T, D, R, P
    (5, 7, 200, 6, 9),
    (3, 1, 1, 3, 2),
    (16, 33, 4096, 4, 3),   # a Llama-ish D, few scored rows: the interpreter stays cheap
]


@needs_interpreter
@pytest.mark.parametrize("norm", [False, True], ids=["head", "norm+head"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])))
def test_triton_matches_float64(shape, norm):
    case = make_case(*shape, norm=norm)
    _, grads = assert_matches_float64(case, "triton")
    # h's gradient is zero except at the gathered rows
    untouched = torch.ones(shape[0] * shape[1], dtype=torch.bool)
    untouched[case["end_idx"]] = False
    assert grads["h"].reshape(-1, shape[2])[untouched.to(grads["h"].device)].abs().max() == 0


@pytest.mark.parametrize("norm", [False, True], ids=["head", "norm+head"])
def test_reference_fp32_matches_float64(norm):
    assert_matches_float64(make_case(5, 7, 200, 6, 9, norm=norm), "reference")


@needs_interpreter
def test_triton_no_bias_head_shaped_weight_and_frozen_h():
    """The model passes head.weight (1, D) and may not need h's gradient."""
    case = make_case(4, 5, 33, 5, 4, norm=False, bias=False)
    w = case["w"].reshape(1, -1).to(DEVICE).requires_grad_()
    out = pairwise_margin_loss(case["h"].to(DEVICE), case["end_idx"].to(DEVICE), w, None,
                               case["pairs"].to(DEVICE), impl="triton")
    out.loss.backward()
    ref = pairwise_margin_loss_reference(case["h"].double(), case["end_idx"], case["w"].double(), None,
                                         case["pairs"], torch.zeros(4), torch.ones(4))
    # dw by hand: dw = sum_i g_i x_i, g_i = sum_p delta_p ([c_p = i] - [j_p = i])
    x = case["h"].double().reshape(-1, 33)[case["end_idx"]]
    delta = -torch.sigmoid(-ref.z) / 4                              # dL/dz_p, weights 1, P = 4
    g = torch.zeros(5, dtype=torch.float64).index_add_(0, case["pairs"][:, 0], delta)
    g.index_add_(0, case["pairs"][:, 1], -delta)
    assert w.grad.shape == (1, 33)
    assert_close(w.grad.reshape(-1), g @ x, 2e-5, 2e-6, "dw")
    assert_close(out.loss, ref.loss, 2e-5, 2e-6, "loss")


# ----------------------------------------------------------------------------------------
# Layouts: left- and right-padded batches of the same sequences give the same everything.

@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_interpreter), "reference"])
def test_left_and_right_padding_agree(impl):
    gen = torch.Generator().manual_seed(3)
    lengths, T, D = [4, 7, 1, 6], 7, 24
    N = len(lengths)
    content = [torch.randn(L, D, generator=gen) for L in lengths]
    w, b, norm_weight = torch.randn(D, generator=gen), torch.randn(1, generator=gen), torch.rand(D, generator=gen) + 0.5
    pairs = torch.tensor([[0, 1], [2, 3], [3, 0]])
    margin = torch.tensor([0.0, 1.0, 1 / 3])
    results = {}
    for side in ("left", "right"):
        h = 100 * torch.randn(N, T, D, generator=gen)   # loud padding: reading it would show
        end_idx = torch.empty(N, dtype=torch.long)
        for n, (L, rows) in enumerate(zip(lengths, content)):
            start = T - L if side == "left" else 0
            h[n, start:start + L] = rows
            end_idx[n] = n * T + start + L - 1
        h.requires_grad_()
        out = pairwise_margin_loss(h.to(DEVICE), end_idx.to(DEVICE), w.to(DEVICE), b.to(DEVICE),
                                   pairs.to(DEVICE), margin=margin.to(DEVICE), norm_weight=norm_weight.to(DEVICE),
                                   impl=impl)
        out.loss.backward()
        grad_last = torch.stack([h.grad[n].reshape(T, D)[int(end_idx[n]) - n * T] for n in range(N)])
        assert h.grad.abs().sum() == grad_last.abs().sum()       # nothing else got a gradient
        results[side] = (out.loss.detach().cpu(), out.rewards.detach().cpu(), grad_last)
    ref_h = torch.stack([rows[-1] for rows in content]).reshape(N, 1, D).double()
    ref = pairwise_margin_loss_reference(ref_h, torch.arange(N), w.double(), b.double(), pairs,
                                         margin.double(), torch.ones(3), norm_weight.double())
    for side, (loss, rewards, _) in results.items():
        assert_close(loss, ref.loss, 2e-5, 2e-6, f"{side} loss")
        assert_close(rewards, ref.rewards, 2e-5, 2e-6, f"{side} rewards")
    assert_close(results["left"][2], results["right"][2], 1e-6, 1e-7, "dh at the last tokens")


# ----------------------------------------------------------------------------------------
# Hand-written losses. Rewards are fed in directly: D = 1, w = 1, b = 0 makes r_i = h_i.

def rewards_as_hidden(rewards):
    h = torch.tensor(rewards, dtype=torch.float32).reshape(1, -1, 1)
    return h, torch.arange(len(rewards)), torch.ones(1)


def instructgpt_loss(rankings):
    """InstructGPT (Ouyang et al. 2022, eq. 1): for each prompt with K ranked responses,
    -1/C(K,2) * sum over all C(K,2) (better, worse) of log sigmoid(r_better - r_worse),
    averaged over prompts. `rankings`: one list of rewards per prompt, best first."""
    per_prompt = []
    for rewards in rankings:
        K = len(rewards)
        terms = [math.log1p(math.exp(-(rewards[i] - rewards[j]))) for i in range(K) for j in range(i + 1, K)]
        per_prompt.append(sum(terms) / math.comb(K, 2))
    return sum(per_prompt) / len(per_prompt)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_interpreter), "reference"])
def test_k_way_rankings_match_instructgpt(impl):
    gen = torch.Generator().manual_seed(4)
    rankings = [torch.randn(K, generator=gen).tolist() for K in range(2, 7)]   # K = 2..6, one prompt each
    flat, pairs, pair_weight, offset = [], [], [], 0
    for rewards in rankings:
        K = len(rewards)
        flat += rewards
        for i, j in itertools.combinations(range(K), 2):
            pairs.append((offset + i, offset + j))
            pair_weight.append(1 / math.comb(K, 2))
        offset += K
    h, end_idx, w = rewards_as_hidden(flat)
    h.requires_grad_()
    out = pairwise_margin_loss(h.to(DEVICE), end_idx.to(DEVICE), w.to(DEVICE), torch.zeros(1, device=DEVICE),
                               torch.tensor(pairs, device=DEVICE), pair_weight=torch.tensor(pair_weight, device=DEVICE),
                               impl=impl)
    assert out.loss.item() == pytest.approx(instructgpt_loss(rankings), rel=1e-6)
    # dL/dr by hand: a pair (better i, worse j) pushes r_i up and r_j down by sigmoid(-(r_i - r_j))
    expected_grad, offset = [], 0
    for rewards in rankings:
        K = len(rewards)
        scale = 1 / (math.comb(K, 2) * len(rankings))
        for k in range(K):
            sig = lambda a, b: 1 / (1 + math.exp(rewards[a] - rewards[b]))
            up = sum(sig(k, j) for j in range(k + 1, K))
            down = sum(sig(i, k) for i in range(k))
            expected_grad.append(scale * (down - up))
        offset += K
    out.loss.backward()
    assert h.grad.reshape(-1).tolist() == pytest.approx(expected_grad, rel=1e-5, abs=1e-7)


# Llama 2 (Touvron et al. 2023, Table 28): margin by preference rating.
LLAMA2_MARGINS = {
    "small": {"significantly better": 1.0, "better": 2 / 3, "slightly better": 1 / 3,
              "negligibly better": 0.0, "unsure": 0.0},
    "large": {"significantly better": 3.0, "better": 2.0, "slightly better": 1.0,
              "negligibly better": 0.0, "unsure": 0.0},
}


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_interpreter), "reference"])
@pytest.mark.parametrize("table", ["small", "large"])
def test_llama2_margins(table, impl):
    margins = list(LLAMA2_MARGINS[table].values())
    gaps = [0.5, 2.5, -0.25, 1.5, 0.0]                      # r_chosen - r_rejected per pair
    flat = [x for gap in gaps for x in (0.3 + gap, 0.3)]
    h, end_idx, w = rewards_as_hidden(flat)
    pairs = torch.tensor([(2 * p, 2 * p + 1) for p in range(len(gaps))])
    out = pairwise_margin_loss(h.to(DEVICE), end_idx.to(DEVICE), w.to(DEVICE), None, pairs.to(DEVICE),
                               margin=torch.tensor(margins, device=DEVICE), impl=impl)
    expected = [math.log1p(math.exp(-(gap - m))) for gap, m in zip(gaps, margins)]
    assert out.loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-6)
    assert out.z.tolist() == pytest.approx([gap - m for gap, m in zip(gaps, margins)], abs=1e-6)
    # "correct" is about the ranking, not the margin; a zero gap is a tie, not correct
    assert out.correct.tolist() == [g > 0 for g in gaps]
    assert out.tie.tolist() == [g == 0 for g in gaps]


# ----------------------------------------------------------------------------------------
# Numerics.

@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_interpreter), "reference"])
def test_extreme_z_is_stable(impl):
    # z = r_c - r_j - m: up to +-1e4 through the rewards, +-50 through the margins
    gaps = [1e4, -1e4, 30.0, -30.0, 10.0, 0.0, 50.0, -50.0]
    margins = [0.0, 0.0, 0.0, 0.0, 0.0, 50.0, -50.0, 50.0]
    flat = [x for gap in gaps for x in (gap / 2, -gap / 2)]
    h, end_idx, w = rewards_as_hidden(flat)
    h.requires_grad_()
    pairs = torch.tensor([(2 * p, 2 * p + 1) for p in range(len(gaps))])
    for p in range(len(gaps)):   # each pair alone, so a tiny loss is checked to relative precision
        out = pairwise_margin_loss(h.to(DEVICE), end_idx.to(DEVICE), w.to(DEVICE), None, pairs[p:p + 1].to(DEVICE),
                                   margin=torch.tensor(margins[p:p + 1], device=DEVICE), impl=impl)
        z = gaps[p] - margins[p]
        softplus = max(-z, 0.0) + math.log1p(math.exp(-abs(z)))
        assert out.loss.item() == pytest.approx(softplus, rel=1e-5, abs=1e-30), (gaps[p], margins[p])
        h.grad = None
        out.loss.backward()
        sigmoid_neg_z = 1 / (1 + math.exp(z)) if z < 700 else 0.0
        dr = h.grad.reshape(-1)[2 * p:2 * p + 2].tolist()
        assert dr == pytest.approx([-sigmoid_neg_z, sigmoid_neg_z], rel=1e-5, abs=1e-30)
        assert torch.isfinite(h.grad).all()


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_interpreter), "reference"])
def test_bias_gradient_cancels(impl):
    """b shifts every reward equally, so the pairwise loss cannot see it: db ~ 0 from the
    loss; with an upstream grad on the rewards, db is exactly what that grad sums to."""
    case = {k: (v.to(DEVICE) if v is not None else None) for k, v in make_case(5, 7, 200, 6, 9, norm=True).items()}
    b = case.pop("b").requires_grad_()
    h = case.pop("h").requires_grad_()
    out = pairwise_margin_loss(h, b=b, **case, impl=impl)
    out.loss.backward()
    assert abs(b.grad.item()) < 1e-6 * h.grad.abs().max().item()
    assert h.grad.abs().max() > 1e-3                        # the loss itself does have a gradient
    b.grad = None
    out = pairwise_margin_loss(h, b=b, **case, impl=impl)
    rbar = torch.linspace(-1, 2, 6, device=DEVICE)
    (out.loss + (out.rewards * rbar).sum()).backward()
    assert b.grad.item() == pytest.approx(rbar.sum().item(), abs=1e-5)


@needs_interpreter
def test_duplicate_positions_share_one_row():
    """Two responses read the same row: equal rewards, a tie, loss log 2, and their gradients
    (+delta and -delta) cancel on that row instead of one overwriting the other."""
    h = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(8)
    end_idx = torch.tensor([4, 4, 1])
    pairs = torch.tensor([[0, 1], [2, 0]])
    out = pairwise_margin_loss(h.to(DEVICE), end_idx.to(DEVICE), w.to(DEVICE), None, pairs.to(DEVICE),
                               pair_weight=torch.tensor([1.0, 0.0], device=DEVICE), impl="triton")
    assert out.tie.tolist() == [True, False]
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)
    out.loss.backward()
    assert h.grad.abs().max() < 1e-7
    # now with weight on the second pair, row 4 gets only that pair's push, summed once
    h.grad = None
    out = pairwise_margin_loss(h.to(DEVICE), end_idx.to(DEVICE), w.to(DEVICE), None, pairs.to(DEVICE), impl="triton")
    out.loss.backward()
    z = out.z[1].item()
    delta = -1 / (1 + math.exp(z)) / 2                      # dL/dz of pair (2, 0), weight 1/2
    row4 = h.grad.reshape(6, 8)[4]
    assert_close(row4, -delta * w, 1e-5, 1e-7, "dh at the shared row")


# ----------------------------------------------------------------------------------------
# Strides and int64 offsets.

@needs_interpreter
def test_offsets_beyond_2_31_elements():
    """A (2, 3, 8) view whose second row starts 2^31 + 16 elements into its storage: int32
    offsets would wrap. The storage is 8 GiB of virtual memory, of which 2 pages are touched."""
    try:
        storage = torch.empty(2**31 + 64, dtype=torch.float32)
    except RuntimeError as e:   # a host that does not overcommit memory
        pytest.skip(f"cannot reserve 8 GiB of address space: {e}")
    h = storage.as_strided((2, 3, 8), (2**31 + 16, 8, 1))
    with torch.no_grad():
        h.copy_(torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(5)))
    case = dict(h=h, end_idx=torch.tensor([5, 1, 3, 4]), w=torch.randn(8), b=torch.randn(1),
                pairs=torch.tensor([[0, 1], [2, 1], [3, 0]]), margin=torch.zeros(3), pair_weight=torch.ones(3),
                norm_weight=torch.rand(8) + 0.5)
    assert_matches_float64(case, "triton")


@needs_interpreter
def test_expanded_view():
    """A stride-0 batch dim (expand) is read through its strides, and autograd sums the dense
    grad back onto the one shared row block."""
    base = torch.randn(1, 5, 16)
    case = make_case(4, 5, 16, 5, 4, norm=True)
    case["h"] = base.expand(4, 5, 16)
    assert_matches_float64(case, "triton")


# ----------------------------------------------------------------------------------------
# Low precision on the reference path (the interpreter tests stay in fp32).

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_low_precision_matches_float64(dtype):
    case = make_case(5, 7, 200, 6, 9, norm=True, dtype=dtype)
    out, grads = run_with_grads(case, "reference")
    ref, ref_grads = run_with_grads(case, "float64", to=torch.float64)   # same rounded inputs
    assert out.rewards.dtype == torch.float32 and out.loss.dtype == torch.float32
    for field in ("loss", "rewards", "z"):
        assert_close(getattr(out, field), getattr(ref, field), 1e-5, 1e-5, field)   # fp32 math inside
    for name, grad in grads.items():
        assert grad.dtype == dtype, name
        assert_close(grad, ref_grads[name], 1e-2, 1e-3, f"d{name}")   # rounded to the input dtype


# ----------------------------------------------------------------------------------------
# Validation: every bad argument raises ValueError naming it, on both paths.

def good_args():
    return dict(h=torch.randn(2, 3, 4), end_idx=torch.tensor([0, 5]), w=torch.randn(4), b=torch.zeros(1),
                pairs=torch.tensor([[0, 1]]), margin=torch.zeros(1), pair_weight=torch.ones(1))


# (the argument the message must name, a case id, the bad arguments)
BAD = [
    ("end_idx", "past_end", dict(end_idx=torch.tensor([0, 6]))),
    ("end_idx", "negative", dict(end_idx=torch.tensor([-1, 2]))),
    ("end_idx", "float", dict(end_idx=torch.tensor([0.0, 5.0]))),
    ("end_idx", "int16", dict(end_idx=torch.tensor([0, 5], dtype=torch.int16))),
    ("pairs", "past_R", dict(pairs=torch.tensor([[0, 2]]))),
    ("pairs", "self", dict(pairs=torch.tensor([[1, 1]]))),
    ("pairs", "empty", dict(pairs=torch.zeros(0, 2, dtype=torch.long), margin=torch.zeros(0),
                            pair_weight=torch.ones(0))),
    # uint8 indexes as a boolean mask on the reference path: a silently wrong loss
    ("pairs", "uint8", dict(pairs=torch.tensor([[0, 1]], dtype=torch.uint8))),
    ("w", "shape", dict(w=torch.randn(5))),
    ("norm_weight", "shape", dict(norm_weight=torch.ones(3))),
    ("margin", "shape", dict(margin=torch.zeros(2))),
    ("pair_weight", "zero_sum", dict(pair_weight=torch.zeros(1))),
    ("pair_weight", "long", dict(pair_weight=torch.ones(1, dtype=torch.long))),
    ("h", "2d", dict(h=torch.randn(6, 4))),
    ("b", "two_values", dict(b=torch.zeros(2))),
    ("eps", "negative", dict(eps=-1.0)),
    # both paths compute in fp32: values that are fine in fp64 overflow or vanish there
    ("margin", "fp32_overflow", dict(margin=torch.tensor([1e300], dtype=torch.float64))),
    ("pair_weight", "fp32_underflow", dict(pair_weight=torch.tensor([1e-300], dtype=torch.float64))),
    ("pair_weight", "sum_overflows", dict(pairs=torch.tensor([[0, 1], [1, 0]]), margin=torch.zeros(2),
                                          pair_weight=torch.tensor([3e38, 3e38]))),
]


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_interpreter), "reference"])
@pytest.mark.parametrize("argument, bad", [(a, b) for a, _, b in BAD], ids=[f"{a}-{c}" for a, c, _ in BAD])
def test_bad_arguments_raise(argument, bad, impl):
    args = {**good_args(), **bad}
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(ValueError, match=argument):
        pairwise_margin_loss(**args, impl=impl)


@needs_interpreter
def test_triton_path_rejects_float64():
    args = {k: v.double() if v.is_floating_point() else v for k, v in good_args().items()}
    with pytest.raises(ValueError, match="h dtype"):
        pairwise_margin_loss(**args, impl="triton")


# ----------------------------------------------------------------------------------------
# Path choice: CPU defaults to the reference even with TRITON_INTERPRET=1 in the env.

def path_taken(out):
    return "triton" if "_PairwiseMarginLoss" in type(out.loss.grad_fn).__name__ else "reference"


def test_cpu_default_is_reference_even_with_interpreter_env(monkeypatch):
    monkeypatch.setattr(_dispatch, "INTERPRETED", True)      # as if TRITON_INTERPRET=1 at import
    monkeypatch.delenv("RMLAB_KERNELS", raising=False)
    args = good_args()
    args["w"].requires_grad_()
    assert path_taken(pairwise_margin_loss(**args)) == "reference"
    assert _dispatch.choose_impl("auto", torch.device("cpu")) == "reference"
    assert _dispatch.choose_impl("auto", torch.device("cuda")) == "triton"
    # both public functions pass their dtype: "auto" on CUDA leaves float64 to the reference
    # (token_logprobs used to choose the kernel and then refuse float64)
    assert _dispatch.choose_impl("auto", torch.device("cuda"), torch.float64) == "reference"
    assert _dispatch.choose_impl("auto", torch.device("cuda"), torch.bfloat16) == "triton"
    assert _dispatch.choose_impl("triton", torch.device("cuda"), torch.float64) == "triton"  # then refused
    monkeypatch.setattr(_dispatch, "INTERPRETED", False)     # as read when the kernels were imported
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _dispatch.choose_impl("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="impl"):
        pairwise_margin_loss(**args, impl="fast")


@needs_interpreter
def test_env_switch_selects_triton(monkeypatch):
    monkeypatch.setenv("RMLAB_KERNELS", "triton")
    args = good_args()
    args["w"].requires_grad_()
    assert path_taken(pairwise_margin_loss(**args)) == "triton"


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=needs_interpreter)])
def test_sum_reduction_is_the_mean_times_the_total_weight_with_its_gradients(impl):
    """reduction="sum" is what train.py divides by a whole batch's weight once: the loss and
    every gradient are the mean's times Σ pair_weight, and the float64 sum written out by hand."""
    case = make_case(5, 7, 200, 6, 9, norm=True)
    total = float(case["pair_weight"].sum())
    mean, mean_grads = run_with_grads(case, impl)

    leaves = {k: case[k].detach().clone().to(DEVICE).requires_grad_() for k in ("h", "w", "b", "norm_weight")}
    inputs = {k: v.to(DEVICE) for k, v in {**case, **leaves}.items()}
    summed = pairwise_margin_loss(**inputs, impl=impl, reduction="sum")
    # by hand, in float64: Σ_p π_p · softplus(−z_p) from the z the kernel returns
    z, pw = summed.z.detach().double().cpu(), case["pair_weight"].double()
    assert float(summed.loss) == pytest.approx(float((pw * torch.nn.functional.softplus(-z)).sum()), rel=1e-5)
    assert float(summed.loss) == pytest.approx(float(mean.loss) * total, rel=1e-5)
    summed.loss.backward()
    # the mean's grads came with random upstream grads on rewards and z: recompute them plainly
    plain = {k: case[k].detach().clone().to(DEVICE).requires_grad_() for k in ("h", "w", "b", "norm_weight")}
    pairwise_margin_loss(**{k: v.to(DEVICE) for k, v in {**case, **plain}.items()}, impl=impl).loss.backward()
    for k in plain:
        assert_close(leaves[k].grad, plain[k].grad * total, 1e-5, 1e-6, f"d{k}")
    with pytest.raises(ValueError, match="reduction"):
        pairwise_margin_loss(**{k: v.to(DEVICE) for k, v in case.items()}, impl=impl, reduction="none")


def test_reference_stays_fp32_under_bf16_autocast():
    """train.py computes the loss under its --dtype's autocast; the reference (the CPU path) must
    not let autocast run its head in bf16 (rewards were 0.03 off): it equals itself without."""
    case = make_case(3, 5, 24, R=4, P=3, norm=True)
    want, _ = run_with_grads(case, "reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = run_with_grads(case, "reference")
    for name in ("loss", "rewards", "z"):
        assert getattr(got, name).dtype == torch.float32
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_interpreter), "reference"])
def test_margins_and_weights_get_no_gradient_on_either_path(impl):
    """They are data. The kernel returns no gradient for them; the reference must not either, or
    a learnable margin would train on CPU and silently stop on CUDA."""
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in good_args().items()}
    args["margin"] = torch.tensor([0.5], device=DEVICE, requires_grad=True)
    args["pair_weight"] = torch.tensor([2.0], device=DEVICE, requires_grad=True)
    args["w"].requires_grad_()
    pairwise_margin_loss(**args, impl=impl).loss.backward()
    assert args["margin"].grad is None and args["pair_weight"].grad is None
    assert args["w"].grad is not None
