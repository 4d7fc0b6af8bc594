"""Fused token log-probs: log π(a_t | x, a_<t) straight from hidden states and the LM head.

PPO needs one number per sampled token, the log-prob of that token, under π_θ, π₀ and
the reference policy of the KL term. The plain way builds the logits of every position
against every vocabulary entry, a (N, V) tensor (262 MB in fp32 at N=2048, V=32000), then
log_softmax, then gather. This file computes the same numbers with the vocabulary swept
in blocks, so nothing larger than a (BLOCK_N, BLOCK_V) tile of logits ever exists.

Notation, for one row n (a position) with hidden state h_n (D,), head weight W (V, D),
temperature τ and target token t_n:

    z_nv   = h_n · W_v / τ                        logits, one BLOCK_V slice at a time
    lse_n  = log Σ_v exp(z_nv)                    online: running max m and sum s,
                                                    m' = max(m, max_v z),  s' = s·e^(m-m') + Σ_v e^(z-m')
    logp_n = z_{n,t_n} - lse_n                    the target logit is picked up in the same sweep

Backward, with upstream gradient g_n and p_nv = exp(z_nv - lse_n) (the softmax, recomputed
blockwise from the saved lse_n, never stored):

    dz_nv  = g_n · (1[v = t_n] - p_nv)
    dh_n   = Σ_v dz_nv W_v / τ          = (W_{t_n} - Σ_v p_nv W_v) · g_n / τ
    dW_v   = Σ_n dz_nv h_n / τ

Rows whose target is `ignore_index` give logp = 0 and no gradient.

Kernels (fp32 accumulation, int64 block offsets, no atomics, deterministic):
    _logprobs_fwd_kernel     grid (N/BLOCK_N, S)   a block of rows against one of S vocabulary
                                                   splits: partial (max, Σexp, target logit);
                                                   torch merges the S partials into lse, logp
    _logprobs_bwd_dh_kernel  grid (N/BLOCK_N,)     owns dh[rows], sweeps the whole vocabulary
    _logprobs_bwd_dw_kernel  grid (V/BLOCK_V,)     owns dW[cols], sweeps all rows
The vocabulary split (flash-decoding style) keeps the GPU full when N is small: S is picked
so that about two programs run per SM. Each backward program adds into fp32 tiles that only
it writes, in a fixed order, so dh and dW come out the same on every run.

Work and memory: the forward does the matmul once (2·N·V·D flops); the backward recomputes
the logits twice, once in the dh kernel and once in the dW kernel, so forward + backward
cost 10·N·V·D flops against 6·N·V·D for the unfused path, in exchange for O(N·S + (N + V)·D)
extra memory instead of O(N·V). Known limit: the dh kernel is not split, so below
~2·SMs·BLOCK_N rows it leaves SMs idle (the dW kernel has V/BLOCK_V programs and is full).

The matmuls use tl.dot: bf16/fp16 inputs on tensor cores with fp32 accumulation (the
backward casts the (BLOCK_N, BLOCK_V) gradient tile to the input type for its two dots, as
flash attention does with P); fp32 inputs use "tf32x3" (three TF32 products, about fp32
accuracy, unlike plain TF32's 10-bit mantissa).
"""
import torch
import triton
import triton.language as tl

from kernels._dispatch import choose_impl, describe_shape, float_dtypes, need

# Tile sizes per input dtype, used by the launchers and by bench/build_report.py (so the compile
# report shows what runs). BLOCK_N, BLOCK_V >= 16 (tl.dot's smallest tile). Chosen so that every
# kernel builds for sm_80 and sm_90 with no register spills (`python bench/build_report.py`):
# fp32's three-product dots need more registers, hence the narrower BLOCK_D.
TILES = {
    torch.float32: dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=16, num_warps=8),
    torch.bfloat16: dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, num_warps=8),
    torch.float16: dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, num_warps=8),
}
# The forward splits the vocabulary until about this many programs per SM run.
PROGRAMS_PER_SM = 2
CPU_PROGRAMS = 4   # the interpreter's stand-in for the SM count, so tests cover the split

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------
# PyTorch reference: the spec. Materialises the (..., V) logits in fp32.

def token_logprobs_reference(h, weight, targets, temperature=1.0, ignore_index=IGNORE_INDEX):
    """log_softmax(h @ W.T / τ).gather(targets); 0 where targets == ignore_index.

    Computes in fp32 (fp64 if h is fp64, which the tests use as ground truth), also under a
    caller's bf16 autocast, which would otherwise run the matmul in bf16.
    """
    compute = torch.promote_types(h.dtype, torch.float32)
    with torch.autocast(h.device.type, enabled=False):
        logits = (h.to(compute) @ weight.to(compute).T) / temperature   # (..., V): what the kernels avoid
    keep = targets != ignore_index                                  # (...)
    safe_targets = torch.where(keep, targets, 0).unsqueeze(-1)      # gather needs a valid id
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe_targets).squeeze(-1)
    return torch.where(keep, logp, 0.0)


# ----------------------------------------------------------------------------------------
# Triton kernels. Tensors are row-major and contiguous (the launchers make them so), so a
# row's stride is D. A tile is addressed as an int64 scalar base (block start * D, safe past
# 2**31 elements) plus int32 offsets inside the block, which keeps the pointer tiles small.

@triton.jit
def _logits_tile(h_block, w_block, row_mask, col_mask, D, inv_temperature,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """z = h_block @ w_block.T / τ as a (BLOCK_N, BLOCK_V) fp32 tile, -inf on masked columns.

    h_block, w_block point at the first row of a block of h (BLOCK_N rows) and of W
    (BLOCK_V rows); row_mask (BLOCK_N,), col_mask (BLOCK_V,) say which rows exist.
    """
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_V)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_mask = dims < D
        h_tile = tl.load(h_block + rows[:, None] * D + dims[None, :],
                         mask=row_mask[:, None] & dim_mask[None, :], other=0.0)   # (BLOCK_N, BLOCK_D)
        w_tile = tl.load(w_block + cols[:, None] * D + dims[None, :],
                         mask=col_mask[:, None] & dim_mask[None, :], other=0.0)   # (BLOCK_V, BLOCK_D)
        acc = tl.dot(h_tile, tl.trans(w_tile), acc, input_precision="tf32x3")   # see the module docstring
    return tl.where(col_mask[None, :], acc * inv_temperature, float("-inf"))


@triton.jit
def _load_rows(target_ptr, lse_ptr, grad_ptr, row_start, row_mask, ignore_index,
               BLOCK_N: tl.constexpr):
    """Backward inputs of a block of rows; rows past N or ignored get grad 0.

    Targets come back as int32 (V < 2**31), so comparing them with column ids stays cheap.
    """
    rows = tl.arange(0, BLOCK_N)
    targets = tl.load(target_ptr + row_start + rows, mask=row_mask, other=ignore_index).to(tl.int32)
    lse = tl.load(lse_ptr + row_start + rows, mask=row_mask, other=0.0)       # (BLOCK_N,) fp32
    grad = tl.load(grad_ptr + row_start + rows, mask=row_mask, other=0.0)     # (BLOCK_N,) fp32
    grad = tl.where(targets == ignore_index, 0.0, grad)
    return targets, lse, grad


@triton.jit
def _dlogits_tile(h_block, w_block, row_mask, col_mask, local_targets, lse, grad, D,
                  inv_temperature,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """g · (1[v = t] - softmax_v) / τ, the gradient with respect to h·W_v, (BLOCK_N, BLOCK_V) fp32.

    local_targets: each row's target minus the block's first column (out of [0, BLOCK_V)
    when the target lies in another block).
    """
    logits = _logits_tile(h_block, w_block, row_mask, col_mask, D, inv_temperature,
                          BLOCK_N, BLOCK_V, BLOCK_D)
    probs = tl.exp(logits - lse[:, None])                   # 0 on masked columns (exp(-inf))
    is_target = tl.arange(0, BLOCK_V)[None, :] == local_targets[:, None]
    return grad[:, None] * (tl.where(is_target, 1.0, 0.0) - probs) * inv_temperature


@triton.jit
def _add_product_rows(out_block, out_mask, lhs, rhs_block, rhs_mask, D,
                      OUT_ROWS: tl.constexpr, INNER: tl.constexpr, BLOCK_D: tl.constexpr):
    """out += lhs @ rhs over all D columns, BLOCK_D at a time: a read-add-write of fp32 tiles.

    out_block: OUT_ROWS rows of an (·, D) fp32 buffer that only this program writes;
    lhs (OUT_ROWS, INNER) in the input dtype; rhs_block: INNER rows of h or W.
    """
    out_rows = tl.arange(0, OUT_ROWS)
    inner = tl.arange(0, INNER)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_mask = dims < D
        rhs_tile = tl.load(rhs_block + inner[:, None] * D + dims[None, :],
                           mask=rhs_mask[:, None] & dim_mask[None, :], other=0.0)     # (INNER, BLOCK_D)
        out_ptrs = out_block + out_rows[:, None] * D + dims[None, :]
        tile_mask = out_mask[:, None] & dim_mask[None, :]
        out_tile = tl.load(out_ptrs, mask=tile_mask, other=0.0)          # (OUT_ROWS, BLOCK_D) fp32
        out_tile = tl.dot(lhs, rhs_tile, out_tile, input_precision="tf32x3")
        tl.store(out_ptrs, out_tile, mask=tile_mask)
        # The next call reads this tile back; the barrier makes the write visible to
        # whichever thread of this program loads it (a no-op in the interpreter).
        tl.debug_barrier()


@triton.jit
def _logprobs_fwd_kernel(
    h_ptr,            # (N, D) hidden states, fp32/bf16/fp16
    w_ptr,            # (V, D) LM head weight, same dtype as h
    target_ptr,       # (N,) int64 target token ids, or ignore_index
    part_max_ptr,     # (S, N) fp32 out: max logit of the row within this split
    part_sum_ptr,     # (S, N) fp32 out: Σ exp(z - part_max) within this split
    part_target_ptr,  # (S, N) fp32 out: the target's logit if it falls in this split, else 0
    N, V, D,          # rows, vocabulary size, hidden size
    vocab_per_split,  # vocabulary rows per split, a multiple of BLOCK_V
    inv_temperature,  # fp32 1/τ
    ignore_index,     # target id that marks a row to skip (negative)
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (i, s): rows [i*BLOCK_N, (i+1)*BLOCK_N) against vocabulary split s.
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_N
    split = tl.program_id(1)
    v_begin = split * vocab_per_split
    v_end = tl.minimum(V, v_begin + vocab_per_split)
    rows = tl.arange(0, BLOCK_N)
    row_mask = rows < N - row_start
    h_block = h_ptr + row_start * D
    w_block = w_ptr + v_begin.to(tl.int64) * D   # advanced by BLOCK_V rows per step
    targets = tl.load(target_ptr + row_start + rows, mask=row_mask, other=ignore_index).to(tl.int32)

    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)     # Σ exp(z - running_max)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        col_mask = tl.arange(0, BLOCK_V) < v_end - v0
        logits = _logits_tile(h_block, w_block, row_mask, col_mask, D,
                              inv_temperature, BLOCK_N, BLOCK_V, BLOCK_D)   # (BLOCK_N, BLOCK_V)
        # Every block holds at least one real column, so new_max is finite from the first
        # block on and exp(running_max - new_max) is exp(-inf) = 0 there, never NaN.
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = (running_sum * tl.exp(running_max - new_max)
                       + tl.sum(tl.exp(logits - new_max[:, None]), axis=1))
        running_max = new_max
        is_target = tl.arange(0, BLOCK_V)[None, :] == (targets - v0)[:, None]
        target_logit += tl.sum(tl.where(is_target, logits, 0.0), axis=1)
        w_block += BLOCK_V * D

    out = split.to(tl.int64) * N + row_start + rows          # row of the (S, N) partials
    tl.store(part_max_ptr + out, running_max, mask=row_mask)
    tl.store(part_sum_ptr + out, running_sum, mask=row_mask)
    tl.store(part_target_ptr + out, target_logit, mask=row_mask)


@triton.jit
def _logprobs_bwd_dh_kernel(
    h_ptr, w_ptr,     # (N, D), (V, D) as in the forward
    target_ptr,       # (N,) int64
    lse_ptr,          # (N,) fp32 from the forward
    grad_ptr,         # (N,) fp32 upstream gradient dL/dlogp
    dh_ptr,           # (N, D) fp32 out, zero on entry: dL/dh
    N, V, D, inv_temperature, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per BLOCK_N rows, the only one that writes dh[rows]: deterministic, no atomics.
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_N
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_V)
    row_mask = rows < N - row_start
    h_block = h_ptr + row_start * D
    dh_block = dh_ptr + row_start * D
    targets, lse, grad = _load_rows(target_ptr, lse_ptr, grad_ptr, row_start, row_mask,
                                    ignore_index, BLOCK_N)
    w_block = w_ptr   # advanced by BLOCK_V rows per step
    for v0 in range(0, V, BLOCK_V):
        col_mask = cols < V - v0
        dlogits = _dlogits_tile(h_block, w_block, row_mask, col_mask, targets - v0, lse, grad,
                                D, inv_temperature, BLOCK_N, BLOCK_V, BLOCK_D)  # (BLOCK_N, BLOCK_V)
        dlogits = dlogits.to(w_ptr.dtype.element_ty)        # the tensor-core input type
        _add_product_rows(dh_block, row_mask, dlogits, w_block, col_mask, D,
                          BLOCK_N, BLOCK_V, BLOCK_D)               # dh[rows] += dz @ W_block
        w_block += BLOCK_V * D


@triton.jit
def _logprobs_bwd_dw_kernel(
    h_ptr, w_ptr,     # (N, D), (V, D) as in the forward
    target_ptr,       # (N,) int64
    lse_ptr,          # (N,) fp32 from the forward
    grad_ptr,         # (N,) fp32 upstream gradient dL/dlogp
    dw_ptr,           # (V, D) fp32 out, zero on entry: dL/dW
    N, V, D, inv_temperature, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # The mirror image of the dh kernel: one program per BLOCK_V vocabulary rows owns dW[cols].
    col_start = tl.program_id(0).to(tl.int64) * BLOCK_V
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_V)
    col_mask = cols < V - col_start
    w_block = w_ptr + col_start * D
    dw_block = dw_ptr + col_start * D
    h_block = h_ptr   # advanced by BLOCK_N rows per step
    for n0 in range(0, N, BLOCK_N):
        row_mask = rows < N - n0
        targets, lse, grad = _load_rows(target_ptr, lse_ptr, grad_ptr, n0, row_mask,
                                        ignore_index, BLOCK_N)
        dlogits = _dlogits_tile(h_block, w_block, row_mask, col_mask,
                                targets - col_start.to(tl.int32), lse, grad,
                                D, inv_temperature, BLOCK_N, BLOCK_V, BLOCK_D)  # (BLOCK_N, BLOCK_V)
        dlogits = dlogits.to(h_ptr.dtype.element_ty)
        _add_product_rows(dw_block, col_mask, tl.trans(dlogits), h_block, row_mask, D,
                          BLOCK_V, BLOCK_N, BLOCK_D)               # dW[cols] += dz.T @ h_block
        h_block += BLOCK_N * D


# ----------------------------------------------------------------------------------------
# Launchers. Inputs are validated and flattened: h (N, D), weight (V, D), targets (N,) int64,
# all contiguous. Outputs live on h.device.

def _forward(h, weight, targets, inv_temperature, ignore_index):
    """Returns (logp (N,) fp32, lse (N,) fp32)."""
    N, D = h.shape
    V = weight.shape[0]
    tiles = TILES[h.dtype]
    n_row_blocks = triton.cdiv(N, tiles["BLOCK_N"])
    n_vocab_blocks = triton.cdiv(V, tiles["BLOCK_V"])
    if h.device.type == "cuda":
        programs = PROGRAMS_PER_SM * torch.cuda.get_device_properties(h.device).multi_processor_count
    else:
        programs = CPU_PROGRAMS
    splits = min(n_vocab_blocks, triton.cdiv(programs, n_row_blocks))
    vocab_per_split = triton.cdiv(n_vocab_blocks, splits) * tiles["BLOCK_V"]
    splits = triton.cdiv(V, vocab_per_split)                  # no split is left empty
    partials = torch.empty(3, splits, N, dtype=torch.float32, device=h.device)
    part_max, part_sum, part_target = partials.unbind(0)      # each (S, N)
    _logprobs_fwd_kernel[(n_row_blocks, splits)](
        h, weight, targets, part_max, part_sum, part_target, N, V, D, vocab_per_split,
        inv_temperature, ignore_index, **tiles)
    # Merge the splits: lse = M + log Σ_s sum_s · exp(max_s - M), with M the overall max.
    row_max = part_max.max(dim=0).values                                       # (N,)
    lse = row_max + torch.log((part_sum * torch.exp(part_max - row_max)).sum(dim=0))
    logp = torch.where(targets == ignore_index, 0.0, part_target.sum(dim=0) - lse)
    return logp, lse


def _backward(h, weight, targets, lse, grad_logp, inv_temperature, ignore_index, need_dh, need_dw):
    """Returns (dh (N, D) in h's dtype or None, dW (V, D) in weight's dtype or None)."""
    N, D = h.shape
    V = weight.shape[0]
    tiles = TILES[h.dtype]
    args = (h, weight, targets, lse, grad_logp.float().contiguous())
    sizes = (N, V, D, inv_temperature, ignore_index)
    dh = dw = None
    if need_dh:
        dh = torch.zeros(N, D, dtype=torch.float32, device=h.device)   # fp32 accumulator
        _logprobs_bwd_dh_kernel[(triton.cdiv(N, tiles["BLOCK_N"]),)](*args, dh, *sizes, **tiles)
        dh = dh.to(h.dtype)
    if need_dw:
        dw = torch.zeros(V, D, dtype=torch.float32, device=h.device)
        _logprobs_bwd_dw_kernel[(triton.cdiv(V, tiles["BLOCK_V"]),)](*args, dw, *sizes, **tiles)
        dw = dw.to(weight.dtype)
    return dh, dw


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, inv_temperature, ignore_index):
        logp, lse = _forward(h, weight, targets, inv_temperature, ignore_index)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.inv_temperature = inv_temperature
        ctx.ignore_index = ignore_index
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        h, weight, targets, lse = ctx.saved_tensors
        dh, dw = _backward(h, weight, targets, lse, grad_logp, ctx.inv_temperature,
                           ctx.ignore_index, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dh, dw, None, None, None


# ----------------------------------------------------------------------------------------
# Public function.

def _validate(h, weight, targets, temperature, ignore_index, kernel_path):
    """Raises ValueError naming the argument. One host sync, for the target range check."""
    need(isinstance(h, torch.Tensor) and h.dim() >= 1,
         f"h must be a (..., D) tensor, got {describe_shape(h)}")
    need(isinstance(weight, torch.Tensor) and weight.dim() == 2,
         f"weight must be a (V, D) tensor, got {describe_shape(weight)}")
    need(isinstance(targets, torch.Tensor),
         f"targets must be an int64 tensor, got {describe_shape(targets)}")
    allowed = float_dtypes(kernel_path)
    need(h.dtype in allowed, f"h dtype must be one of {allowed}, got {h.dtype}")
    need(weight.dtype == h.dtype, f"weight dtype {weight.dtype} must match h dtype {h.dtype}")
    need(not (kernel_path and h.device.type == "cpu" and h.dtype == torch.bfloat16),
         "the Triton interpreter multiplies bf16 tiles wrongly (tl.dot, off by ~1e10 in triton 3.9): "
         "use fp32 or fp16 there, or impl='reference'")
    need(targets.dtype in (torch.int64, torch.int32),
         f"targets must be int64 (or int32), got {targets.dtype}")
    V, D = weight.shape
    need(V > 0 and D > 0, f"weight must be a non-empty (V, D) tensor, got {tuple(weight.shape)}")
    need(h.shape[-1] == D, f"h has D = {h.shape[-1]} but weight is (V, D) = {tuple(weight.shape)}")
    need(tuple(targets.shape) == tuple(h.shape[:-1]),
         f"targets shape {tuple(targets.shape)} must be h.shape[:-1] = {tuple(h.shape[:-1])}")
    need(h.device == weight.device == targets.device,
         f"h, weight and targets must share a device, got {h.device}, {weight.device}, {targets.device}")
    need(isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
         and 0.0 < temperature < float("inf"),
         f"temperature must be a positive finite number, got {temperature!r}")
    need(isinstance(ignore_index, int) and not isinstance(ignore_index, bool) and -2**31 <= ignore_index < 0,
         f"ignore_index must be a negative int32 (token ids are >= 0), got {ignore_index!r}")
    # Triton does not bounds-check: a target id past V would read nothing and give -lse.
    out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(out_of_range.any()):
        raise ValueError(f"targets must be in [0, V) = [0, {V}) or ignore_index = {ignore_index}, "
                         f"found {targets[out_of_range][0].item()}")


def token_logprobs(h, weight, targets, temperature=1.0, ignore_index=IGNORE_INDEX, impl="auto"):
    """log π(targets | h) under the LM head `weight`, without building the (..., V) logits.

    h (..., D) fp32/bf16/fp16, weight (V, D) same dtype, targets (...) int64 token ids.
    Returns (...) fp32: log_softmax(h @ weight.T / temperature).gather(targets), and 0
    (with no gradient) where targets == ignore_index. Differentiable in h and weight.
    impl: "auto" | "triton" | "reference" (see kernels/_dispatch.py).
    """
    device = h.device if isinstance(h, torch.Tensor) else torch.device("cpu")
    path = choose_impl(impl, device, getattr(h, "dtype", None))
    _validate(h, weight, targets, temperature, ignore_index, path == "triton")
    if path == "reference" or targets.numel() == 0:   # no rows: nothing to launch
        return token_logprobs_reference(h, weight, targets, temperature, ignore_index)
    D = h.shape[-1]
    logp = _TokenLogprobs.apply(h.reshape(-1, D).contiguous(), weight.contiguous(),
                                targets.reshape(-1).to(torch.int64).contiguous(),
                                1.0 / float(temperature), ignore_index)
    return logp.reshape(targets.shape)
