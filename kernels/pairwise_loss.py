"""Fused last-token gather + scalar reward head + pairwise margin loss.

A reward model scores a response by reading one hidden state, the one at the
response's last token, through a scalar head. Training compares responses in
pairs (chosen c, rejected j). Everything between the trunk and the loss is
therefore a gather of R rows out of N*T, a dot product per row, and a handful of
scalar ops per pair. A naive implementation runs the head on all N*T positions
first and throws all but R of them away; this file only touches the R rows.

Notation: h (N, T, D) hidden states, end_idx (R,) flat positions into N*T,
w (D,) head weight, b head bias, gamma (D,) optional final-RMSNorm weight,
pairs (P, 2) = (c_p, j_p) indices into the R responses, m (P,) margins,
pi (P,) pair weights.

Forward
    x_i  = h.view(N*T, D)[end_idx_i]                          (R, D)  gather first
    rho_i = (|x_i|^2 / D + eps)^(-1/2)      (rho_i = 1 and gamma = 1 without the norm)
    s_i  = x_i . (gamma * w)                                  one pass over D gives s_i and |x_i|^2
    r_i  = rho_i * s_i + b                                    = RMSNorm(x_i) . w + b     rewards (R,)
    z_p  = r_{c_p} - r_{j_p} - m_p
    L    = sum_p pi_p * softplus(-z_p) / S,   S = sum_p pi_p  = weighted mean of -log sigmoid(z)
           (reduction="sum": S = 1, the weighted sum; a caller that splits one batch over
           micro-batches and ranks divides by the whole batch's weight once, itself)

    softplus(-z) = max(-z, 0) + log1p(exp(-|z|)) never overflows, so |z| = 1e4 is fine.
    Per pair we also report correct_p = r_c > r_j and tie_p = r_c == r_j (the margin
    is not part of "correct": accuracy is about the ranking).

Backward (a bar is the upstream gradient of an output: Lbar, rbar (R,), zbar (P,))
    dL/dz_p = -pi_p * sigmoid(-z_p) / S                       =: delta_p     (saved by the forward)
    dbar_p  = Lbar * delta_p + zbar_p
    g_i     = rbar_i + sum_p dbar_p ([c_p = i] - [j_p = i])   dLoss/dr_i
    dx_i    = g_i * (rho_i * gamma * w  -  rho_i^3 * s_i / D * x_i)   (second term only with the norm)
    dh[pos] = sum over responses i with end_idx_i = pos of dx_i.  Duplicated positions share
              the same x, so dx is linear in g: the first response at a position owns the row
              and writes it with the summed g; every other row of dh stays zero.
    dw      = sum_i g_i * rho_i * (x_i * gamma)
    dgamma  = sum_i g_i * rho_i * (x_i * w)
    db      = sum_i g_i = sum_i rbar_i + sum_p dbar_p (1 - 1). From the loss alone b cancels,
              so its gradient is zero up to rounding; it is computed, not special-cased.
    Margins and pair weights get no gradient.

Kernels (all fp32 accumulation, int64 offsets, no atomics):
    _rewards_fwd_kernel   grid (R,)                 one program per scored row, loops over D
    _pair_loss_kernel     grid (1,)                 z, loss, delta, correct, tie for all P pairs
    _reward_grad_kernel   grid (R,)                 g per position; which response owns a row
    _hidden_grad_kernel   grid (R/BLOCK_R, D/BLOCK_D)   dh rows + per-program dw/dgamma partials,
                                                        then one torch sum: deterministic
The g kernel scans all R responses and all P pairs per program, O(R * (R + P)) loads from
L2. That is tiny for real batches (R, P in the hundreds) and, unlike index_add_ on CUDA
(atomics) or torch.unique (a host sync), it is deterministic and never leaves the device.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._dispatch import choose_impl, describe_shape, float_dtypes, need

# Block sizes, used by the launchers and by bench/build_report.py (so the compile report shows
# what runs); it checks that every kernel builds for sm_80 and sm_90 with no register spills.
FWD_BLOCK_D = 1024   # 4 warps x 32 threads x 8 contiguous elements: one 128-bit load per thread in bf16
FWD_WARPS = 4
PAIR_BLOCK = 1024
SCAN_BLOCK = 1024
BWD_BLOCK_R = 8
BWD_BLOCK_D = 512
BWD_WARPS = 4


class PairwiseLossOutput(NamedTuple):
    loss: torch.Tensor      # () fp32 weighted mean (or sum) of -log sigmoid(z)
    rewards: torch.Tensor   # (R,) fp32 r_i
    correct: torch.Tensor   # (P,) bool r_c > r_j
    tie: torch.Tensor       # (P,) bool r_c == r_j
    z: torch.Tensor         # (P,) fp32 r_c - r_j - m


# ----------------------------------------------------------------------------------------
# The reference: plain PyTorch, the spec every other path is tested against.

def pairwise_margin_loss_reference(h, end_idx, w, b, pairs, margin, pair_weight,
                                   norm_weight=None, eps=1e-5, reduction="mean") -> PairwiseLossOutput:
    """Gather first, then optional RMSNorm, then the head, then F.logsigmoid.

    Computes in fp32 (fp64 if h is fp64, which the tests use as ground truth), also under a
    caller's bf16 autocast, which would otherwise run the head's matmul in bf16. Margins and
    pair weights are data: no gradient, as in the kernels.
    """
    N, T, D = h.shape
    compute = torch.promote_types(h.dtype, torch.float32)
    with torch.autocast(h.device.type, enabled=False):
        # F.embedding is a row gather whose backward adds R rows into zeros; on CPU h[end_idx]
        # and index_select cost time in the size of h, forward or backward.
        x = F.embedding(end_idx, h.reshape(N * T, D)).to(compute)         # (R, D)
        if norm_weight is not None:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(compute)
        rewards = x @ w.to(compute)                                        # (R,)
        if b is not None:
            rewards = rewards + b.to(compute).reshape(())
        r_chosen, r_rejected = rewards[pairs[:, 0]], rewards[pairs[:, 1]]  # (P,)
        z = r_chosen - r_rejected - margin.detach().to(compute)
        pair_weight = pair_weight.detach().to(compute)
        loss = -(pair_weight * F.logsigmoid(z)).sum()
        if reduction == "mean":
            loss = loss / pair_weight.sum()
    return PairwiseLossOutput(loss, rewards, (r_chosen > r_rejected).detach(),
                              (r_chosen == r_rejected).detach(), z)


# ----------------------------------------------------------------------------------------
# Triton kernels.

@triton.jit
def _rewards_fwd_kernel(
    h_ptr,             # (N, T, D) hidden states, fp32/bf16/fp16, unit stride over D
    end_idx_ptr,       # (R,) int64 flat positions into N*T
    w_ptr,             # (D,) head weight
    b_ptr,             # (1,) head bias; read only if HAS_BIAS
    norm_w_ptr,        # (D,) RMSNorm weight gamma; read only if HAS_NORM
    rewards_ptr,       # (R,) fp32 out: r_i
    rstd_ptr,          # (R,) fp32 out: rho_i (1 without the norm), kept for backward
    dot_ptr,           # (R,) fp32 out: s_i = x_i . (gamma * w), kept for backward
    T, D,              # positions per row, hidden size
    stride_hn, stride_ht,  # strides of h in elements
    eps,               # RMSNorm epsilon
    HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    pos = tl.load(end_idx_ptr + i)                       # int64, so the row offset is int64
    row_ptr = h_ptr + (pos // T) * stride_hn + (pos % T) * stride_ht
    dot = tl.zeros([BLOCK_D], dtype=tl.float32)          # partial sums of x * gamma * w
    sumsq = tl.zeros([BLOCK_D], dtype=tl.float32)        # partial sums of x * x
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = d < D
        x = tl.load(row_ptr + d, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:
            v = v * tl.load(norm_w_ptr + d, mask=mask, other=0.0).to(tl.float32)
            sumsq += x * x
        dot += x * v
    s = tl.sum(dot, axis=0)
    rstd = 1.0
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(sumsq, axis=0) / D + eps)
    r = rstd * s
    if HAS_BIAS:
        r += tl.load(b_ptr).to(tl.float32)
    tl.store(rewards_ptr + i, r)
    tl.store(rstd_ptr + i, rstd)
    tl.store(dot_ptr + i, s)


@triton.jit
def _pair_loss_kernel(
    rewards_ptr,       # (R,) fp32 r_i
    pairs_ptr,         # (P, 2) int64 (chosen, rejected), contiguous
    margin_ptr,        # (P,) m_p
    pair_weight_ptr,   # (P,) pi_p
    loss_ptr,          # (1,) fp32 out: L
    z_ptr,             # (P,) fp32 out: z_p
    dz_ptr,            # (P,) fp32 out: delta_p = dL/dz_p
    correct_ptr,       # (P,) int8 out: r_c > r_j
    tie_ptr,           # (P,) int8 out: r_c == r_j
    P,                 # number of pairs
    BLOCK_P: tl.constexpr,
    SUM: tl.constexpr,  # reduction="sum": S = 1 instead of the total weight
):
    # One program: the pair count is small and a single program sums deterministically.
    weight_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        weight_acc += tl.load(pair_weight_ptr + p, mask=p < P, other=0.0).to(tl.float32)
    total_weight = tl.sum(weight_acc, axis=0)
    if SUM:
        total_weight = 1.0

    loss_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = p < P
        chosen = tl.load(pairs_ptr + 2 * p, mask=mask, other=0)
        rejected = tl.load(pairs_ptr + 2 * p + 1, mask=mask, other=0)
        r_chosen = tl.load(rewards_ptr + chosen, mask=mask, other=0.0)
        r_rejected = tl.load(rewards_ptr + rejected, mask=mask, other=0.0)
        pair_weight = tl.load(pair_weight_ptr + p, mask=mask, other=0.0).to(tl.float32)
        z = r_chosen - r_rejected - tl.load(margin_ptr + p, mask=mask, other=0.0).to(tl.float32)
        # u = exp(-|z|) is in (0, 1]: nothing below can overflow.
        u = tl.exp(-tl.abs(z))
        one_plus_u = 1.0 + u
        # log1p(u) without libdevice: log(1+u) * u / ((1+u) - 1) cancels the rounding of 1+u.
        log1p_u = tl.where(one_plus_u == 1.0, u,
                           tl.log(one_plus_u) * u / tl.where(one_plus_u == 1.0, 1.0, one_plus_u - 1.0))
        softplus_neg_z = tl.maximum(-z, 0.0) + log1p_u             # -log sigmoid(z)
        sigmoid_neg_z = tl.where(z >= 0, u, 1.0) / one_plus_u      # sigmoid(-z)
        loss_acc += pair_weight * softplus_neg_z
        tl.store(z_ptr + p, z, mask=mask)
        tl.store(dz_ptr + p, -pair_weight * sigmoid_neg_z / total_weight, mask=mask)
        tl.store(correct_ptr + p, (r_chosen > r_rejected).to(tl.int8), mask=mask)
        tl.store(tie_ptr + p, (r_chosen == r_rejected).to(tl.int8), mask=mask)
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0) / total_weight)


@triton.jit
def _reward_grad_kernel(
    end_idx_ptr,       # (R,) int64 flat positions
    grad_rewards_ptr,  # (R,) fp32 rbar_i
    pair_pos_ptr,      # (P, 2) int64 end_idx[pairs]: the positions of chosen and rejected
    dz_ptr,            # (P,) fp32 dbar_p = Lbar * delta_p + zbar_p
    g_ptr,             # (R,) fp32 out: summed g of all responses at this position (0 if not owner)
    owner_ptr,         # (R,) int8 out: 1 if response i is the first at its position
    R, P,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    pos = tl.load(end_idx_ptr + i)
    g_acc = tl.zeros([BLOCK], dtype=tl.float32)
    earlier = tl.zeros([BLOCK], dtype=tl.int32)          # responses j < i at the same position
    for j0 in range(0, R, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        mask = j < R
        same = tl.load(end_idx_ptr + j, mask=mask, other=-1) == pos
        g_acc += tl.where(same, tl.load(grad_rewards_ptr + j, mask=mask, other=0.0), 0.0)
        earlier += (same & (j < i)).to(tl.int32)
    for p0 in range(0, P, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        mask = p < P
        dz = tl.load(dz_ptr + p, mask=mask, other=0.0)
        chosen_here = tl.load(pair_pos_ptr + 2 * p, mask=mask, other=-1) == pos
        rejected_here = tl.load(pair_pos_ptr + 2 * p + 1, mask=mask, other=-1) == pos
        g_acc += tl.where(chosen_here, dz, 0.0) - tl.where(rejected_here, dz, 0.0)
    is_owner = tl.sum(earlier, axis=0) == 0
    tl.store(g_ptr + i, tl.where(is_owner, tl.sum(g_acc, axis=0), 0.0))
    tl.store(owner_ptr + i, is_owner.to(tl.int8))


@triton.jit
def _hidden_grad_kernel(
    h_ptr,             # (N, T, D) hidden states, unit stride over D
    end_idx_ptr,       # (R,) int64 flat positions
    w_ptr,             # (D,) head weight
    norm_w_ptr,        # (D,) gamma; read only if HAS_NORM
    g_ptr,             # (R,) fp32 g per owning response, 0 for the others
    owner_ptr,         # (R,) int8 1 where response i writes its row of dh
    rstd_ptr,          # (R,) fp32 rho_i from the forward
    dot_ptr,           # (R,) fp32 s_i from the forward
    dh_ptr,            # (N*T, D) out, contiguous and zero-filled by the launcher
    dw_part_ptr,       # (R/BLOCK_R, D) fp32 out: this row block's share of dw
    dnorm_part_ptr,    # (R/BLOCK_R, D) fp32 out: this row block's share of dgamma (if HAS_NORM)
    R, T, D,
    stride_hn, stride_ht,
    WRITE_DH: tl.constexpr, HAS_NORM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row_block = tl.program_id(0).to(tl.int64)
    d_block = tl.program_id(1).to(tl.int64)
    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)           # (BLOCK_R,)
    row_mask = rows < R
    d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)                # (BLOCK_D,)
    d_mask = d < D
    tile_mask = row_mask[:, None] & d_mask[None, :]

    pos = tl.load(end_idx_ptr + rows, mask=row_mask, other=0)    # int64
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    owner = tl.load(owner_ptr + rows, mask=row_mask, other=0) != 0
    row_off = (pos // T) * stride_hn + (pos % T) * stride_ht
    x = tl.load(h_ptr + row_off[:, None] + d[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    part_off = row_block * D + d
    if HAS_NORM:
        gamma = tl.load(norm_w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        dot = tl.load(dot_ptr + rows, mask=row_mask, other=0.0)
        c1 = g * rstd                                            # scales gamma * w
        c2 = c1 * rstd * rstd * dot / D                          # scales x (through rho)
        dx = c1[:, None] * (gamma * w)[None, :] - c2[:, None] * x
        c1x = tl.sum(c1[:, None] * x, axis=0)                    # sum_i g_i rho_i x_i
        tl.store(dw_part_ptr + part_off, c1x * gamma, mask=d_mask)
        tl.store(dnorm_part_ptr + part_off, c1x * w, mask=d_mask)
    else:
        dx = g[:, None] * w[None, :]
        tl.store(dw_part_ptr + part_off, tl.sum(g[:, None] * x, axis=0), mask=d_mask)
    if WRITE_DH:
        tl.store(dh_ptr + pos[:, None] * D + d[None, :], dx.to(dh_ptr.dtype.element_ty),
                 mask=tile_mask & owner[:, None])


# ----------------------------------------------------------------------------------------
# Launchers: inputs are validated by the public function; outputs live on h.device.

def _rewards_forward(h, end_idx, w, b, norm_weight, eps):
    """Returns rewards, rstd, dot, each (R,) fp32."""
    N, T, D = h.shape
    R = end_idx.shape[0]
    rewards, rstd, dot = (torch.empty(R, dtype=torch.float32, device=h.device) for _ in range(3))
    _rewards_fwd_kernel[(R,)](
        h, end_idx, w, w if b is None else b, w if norm_weight is None else norm_weight,
        rewards, rstd, dot, T, D, h.stride(0), h.stride(1), eps,
        HAS_BIAS=b is not None, HAS_NORM=norm_weight is not None,
        BLOCK_D=min(FWD_BLOCK_D, triton.next_power_of_2(D)), num_warps=FWD_WARPS,
    )
    return rewards, rstd, dot


def _pairs_forward(rewards, pairs, margin, pair_weight, reduce_sum):
    """Returns loss (), z, delta (P,) fp32, correct, tie (P,) bool."""
    P = pairs.shape[0]
    device = rewards.device
    loss = torch.empty((), dtype=torch.float32, device=device)
    z, delta = (torch.empty(P, dtype=torch.float32, device=device) for _ in range(2))
    correct, tie = (torch.empty(P, dtype=torch.int8, device=device) for _ in range(2))
    _pair_loss_kernel[(1,)](rewards, pairs, margin, pair_weight, loss, z, delta, correct, tie, P,
                            BLOCK_P=min(PAIR_BLOCK, triton.next_power_of_2(P)), SUM=reduce_sum)
    return loss, z, delta, correct.view(torch.bool), tie.view(torch.bool)


def _backward(h, end_idx, w, norm_weight, pair_pos, rstd, dot, grad_rewards, dbar, need_dh):
    """Returns dh (N, T, D) or None, dw (D,) fp32, dgamma (D,) fp32 or None, db () fp32."""
    N, T, D = h.shape
    R, P = end_idx.shape[0], pair_pos.shape[0]
    device = h.device
    g = torch.empty(R, dtype=torch.float32, device=device)
    owner = torch.empty(R, dtype=torch.int8, device=device)
    _reward_grad_kernel[(R,)](end_idx, grad_rewards, pair_pos, dbar, g, owner, R, P,
                              BLOCK=min(SCAN_BLOCK, triton.next_power_of_2(max(R, P))))

    block_d = min(BWD_BLOCK_D, triton.next_power_of_2(D))
    block_r = min(BWD_BLOCK_R, triton.next_power_of_2(R))
    n_row_blocks = triton.cdiv(R, block_r)
    # Both paths (this one and autograd through a gather) must hand back a dense grad of h:
    # this zero fill is the one (N, T, D) write the backward cannot avoid.
    dh = torch.zeros((N, T, D), dtype=h.dtype, device=device) if need_dh else None
    dw_part = torch.empty((n_row_blocks, D), dtype=torch.float32, device=device)
    dnorm_part = torch.empty_like(dw_part) if norm_weight is not None else None
    _hidden_grad_kernel[(n_row_blocks, triton.cdiv(D, block_d))](
        h, end_idx, w, w if norm_weight is None else norm_weight, g, owner, rstd, dot,
        dw_part if dh is None else dh, dw_part, dw_part if dnorm_part is None else dnorm_part,
        R, T, D, h.stride(0), h.stride(1),
        WRITE_DH=need_dh, HAS_NORM=norm_weight is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=BWD_WARPS,
    )
    return dh, dw_part.sum(0), None if dnorm_part is None else dnorm_part.sum(0), g.sum()


class _PairwiseMarginLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, end_idx, w, b, pairs, margin, pair_weight, norm_weight, eps, reduce_sum):
        rewards, rstd, dot = _rewards_forward(h, end_idx, w, b, norm_weight, eps)
        loss, z, delta, correct, tie = _pairs_forward(rewards, pairs, margin, pair_weight, reduce_sum)
        ctx.save_for_backward(h, end_idx, w, b, norm_weight, end_idx[pairs], rstd, dot, delta)
        ctx.mark_non_differentiable(correct, tie)
        return loss, rewards, correct, tie, z

    @staticmethod
    def backward(ctx, grad_loss, grad_rewards, _grad_correct, _grad_tie, grad_z):
        h, end_idx, w, b, norm_weight, pair_pos, rstd, dot, delta = ctx.saved_tensors
        dbar = (grad_loss.float() * delta + grad_z.float()).contiguous()       # (P,)
        dh, dw, dnorm, db = _backward(h, end_idx, w, norm_weight, pair_pos, rstd, dot,
                                      grad_rewards.float().contiguous(), dbar,
                                      need_dh=ctx.needs_input_grad[0])
        return (dh, None, dw.to(w.dtype), None if b is None else db.to(b.dtype).reshape(b.shape),
                None, None, None, None if norm_weight is None else dnorm.to(norm_weight.dtype), None, None)


# ----------------------------------------------------------------------------------------
# The public function: validate, then pick a path.

def _validate(h, end_idx, w, b, pairs, margin, pair_weight, norm_weight, eps, kernel_path):
    """Raises ValueError naming the argument. One host sync for the value checks."""
    need(isinstance(h, torch.Tensor) and h.dim() == 3,
         f"h must be a (N, T, D) tensor, got {describe_shape(h)}")
    allowed = float_dtypes(kernel_path)
    need(h.dtype in allowed, f"h dtype must be one of {allowed}, got {h.dtype}")
    N, T, D = h.shape
    need(N * T * D > 0, f"h must be non-empty, got shape {tuple(h.shape)}")
    tensors = dict(end_idx=end_idx, w=w, b=b, pairs=pairs, margin=margin,
                   pair_weight=pair_weight, norm_weight=norm_weight)
    for name, t in tensors.items():
        if t is None:
            continue
        need(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
        need(t.device == h.device, f"{name} is on {t.device} but h is on {h.device}")
        if name in ("end_idx", "pairs"):         # uint8 would index as a boolean mask
            need(t.dtype in (torch.int64, torch.int32), f"{name} must be int64 or int32, got {t.dtype}")
        elif name in ("margin", "pair_weight"):   # no gradient: any float, the kernels read them as fp32
            need(t.is_floating_point(), f"{name} must be a float tensor, got {t.dtype}")
        else:                                     # w, b, norm_weight
            need(t.dtype in allowed, f"{name} dtype must be one of {allowed}, got {t.dtype}")
    need(end_idx.dim() == 1 and end_idx.numel() > 0,
         f"end_idx must be (R,) with R >= 1, got {describe_shape(end_idx)}")
    R = end_idx.shape[0]
    need(w.shape == (D,), f"w must be (D,) = ({D},), got {describe_shape(w)}")
    need(b is None or b.numel() == 1, f"b must hold one value, got {describe_shape(b)}")
    need(norm_weight is None or norm_weight.shape == (D,),
         f"norm_weight must be ({D},), got {describe_shape(norm_weight)}")
    need(pairs.dim() == 2 and pairs.shape[1] == 2, f"pairs must be (P, 2), got {describe_shape(pairs)}")
    P = pairs.shape[0]
    need(P > 0, "pairs is empty: the loss needs at least one (chosen, rejected) pair")
    need(margin.shape == (P,), f"margin must be (P,) = ({P},), got {describe_shape(margin)}")
    need(pair_weight.shape == (P,), f"pair_weight must be (P,) = ({P},), got {describe_shape(pair_weight)}")
    need(isinstance(eps, (int, float)) and eps > 0, f"eps must be a positive float, got {eps!r}")

    # Triton does not bounds-check: every index must be checked here, with one sync. Margins
    # and weights are checked as both paths read them, in fp32 (1e300 passes in fp64).
    margin, pair_weight = margin.float(), pair_weight.float()
    total_weight = pair_weight.sum()
    bad_if = {   # message: a bool tensor, True if the input is bad
        f"end_idx out of range: every flat position must be in [0, N*T) = [0, {N * T})":
            ((end_idx < 0) | (end_idx >= N * T)).any(),
        f"pairs out of range: every response index must be in [0, R) = [0, {R})":
            ((pairs < 0) | (pairs >= R)).any(),
        "pairs: a pair compares a response with itself (chosen == rejected)":
            (pairs[:, 0] == pairs[:, 1]).any(),
        "margin must be finite":
            ~torch.isfinite(margin).all(),
        "pair_weight must be finite and >= 0":
            ((pair_weight < 0) | ~torch.isfinite(pair_weight)).any(),
        "pair_weight must have a positive, finite sum in fp32":
            ~(torch.isfinite(total_weight) & (total_weight > 0)),
    }
    for msg, bad in zip(bad_if, torch.stack(list(bad_if.values())).tolist()):
        need(not bad, msg)


def pairwise_margin_loss(h, end_idx, w, b, pairs, margin=None, pair_weight=None,
                         norm_weight=None, eps=1e-5, impl="auto", reduction="mean") -> PairwiseLossOutput:
    """Weighted mean (reduction="mean") or weighted sum ("sum") of -log sigmoid(r_c - r_j - m)
    over pairs, rewards read at end_idx.

    h (N, T, D) fp32/bf16/fp16 (pre-norm if norm_weight is given); end_idx (R,) int64 (or int32)
    flat positions into N*T; w (D,) (a (1, D) head weight is accepted); b a one-value tensor or
    None; pairs (P, 2) int64 or int32 (chosen, rejected) into R; margin (P,) default 0; pair_weight
    (P,) default 1; norm_weight (D,) applies RMSNorm (fp32) to the gathered rows only.
    impl: "auto" | "triton" | "reference" (see kernels/_dispatch.py).
    Returns PairwiseLossOutput(loss, rewards, correct, tie, z).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == 1:
        w = w.reshape(-1)                  # the model's head.weight is (1, D)
    if not isinstance(pairs, torch.Tensor) or pairs.dim() != 2:
        raise ValueError(f"pairs must be a (P, 2) tensor, got {describe_shape(pairs)}")
    P = pairs.shape[0]
    device = h.device if isinstance(h, torch.Tensor) else torch.device("cpu")
    if margin is None:
        margin = torch.zeros(P, dtype=torch.float32, device=device)
    if pair_weight is None:
        pair_weight = torch.ones(P, dtype=torch.float32, device=device)
    path = choose_impl(impl, device, getattr(h, "dtype", None))
    _validate(h, end_idx, w, b, pairs, margin, pair_weight, norm_weight, eps, path == "triton")
    if path == "reference":
        return pairwise_margin_loss_reference(h, end_idx, w, b, pairs, margin, pair_weight,
                                              norm_weight, eps, reduction)
    if h.stride(2) != 1:
        h = h.contiguous()                 # the kernels read rows with unit stride over D
    out = _PairwiseMarginLoss.apply(
        h, end_idx.long().contiguous(), w.contiguous(),
        None if b is None else b.reshape(1).contiguous(), pairs.long().contiguous(),
        margin.float().contiguous(), pair_weight.float().contiguous(),
        None if norm_weight is None else norm_weight.contiguous(), float(eps), reduction == "sum")
    return PairwiseLossOutput(*out)
