"""What a reward model's scalar means, and how two of them are combined (Llama 2, §3.2.2).

Our reward models output raw scores R (logits). Llama 2's output σ-scores, so its PPO reward

    R̃ = WHITEN(LOGIT(R_c))

undoes the sigmoid first. For us LOGIT(σ(R)) is R itself; computing it literally overflows
(σ(R) rounds to 1.0 in fp32 for R ≳ 17 and LOGIT(1.0) = inf), so it is never computed.

Safety first: the safety model's score is used when the prompt is a safety prompt, or when
the response looks unsafe to the safety model (σ(R_s) < 0.15); otherwise the helpfulness
score. σ(R_s) < 0.15  ⟺  R_s < logit(0.15) = log(0.15 / 0.85) ≈ −1.7346, compared in logit
space so that nothing rounds.

The pairwise loss never fixes a reward's offset, so train.py shifts each model's head bias
until its validation rewards have mean 0 before these thresholds mean anything. Nor does it
fix the scale in a useful way: a model that fits its training pairs well learns gaps of ten
or more, so σ(R) sits at 0 or 1 and the 0.15 test flags any response a little below average.
train.py therefore also divides each model by a temperature fitted on its validation pairs
(fit_temperature; Guo et al. 2017), after which σ(R_c − R_r) is a calibrated preference
probability and σ(R) < 0.15 means "clearly worse than a typical response".
"""
import math

import torch

from kernels import pairwise_margin_loss

SAFETY_THRESHOLD = 0.15
SAFETY_LOGIT = math.log(SAFETY_THRESHOLD / (1.0 - SAFETY_THRESHOLD))   # ≈ -1.7346


def select_reward(r_safety, r_helpful, is_safety):
    """Llama 2's R_c. All (n,) tensors; returns (R_c (n,), used_safety (n,) bool)."""
    is_safety = torch.as_tensor(is_safety, dtype=torch.bool, device=r_safety.device)
    use_safety = is_safety | (r_safety < SAFETY_LOGIT)
    return torch.where(use_safety, r_safety, r_helpful), use_safety


def fit_temperature(gaps, min_scale: float = 0.0) -> float:
    """The scale s that makes σ(s·gap) calibrated on held-out pairs: the minimiser of
    mean(softplus(−s·gap)), gap = R_chosen − R_rejected. The loss is convex in s and its slope,
    −mean(gap·σ(−s·gap)), rises with s, so bisection on the slope finds it. s is kept in
    [min_scale, 1]: calibration only ever softens an overconfident model (a model that
    separates every pair would otherwise get s → ∞), and a model that ranks the pairs no
    better than chance (s → 0 would erase it) keeps min_scale.
    """
    gaps = torch.as_tensor(gaps, dtype=torch.float64).flatten()
    if gaps.numel() == 0 or not torch.isfinite(gaps).all():
        raise ValueError("fit_temperature: gaps must be a non-empty set of finite numbers")
    if not 0.0 <= min_scale <= 1.0:
        raise ValueError(f"fit_temperature: need 0 <= min_scale <= 1, got {min_scale}")
    slope = lambda s: float(-(gaps * torch.sigmoid(-s * gaps)).mean())
    lo, hi = min_scale, 1.0
    if slope(hi) <= 0:               # the loss still falls at 1: keep the model's own scale
        return 1.0
    if slope(lo) >= 0:               # the loss already rises at min_scale: chance or worse
        return min_scale
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def whiten(x, mean: float, std: float):
    """(x - mean) / std in fp32, by the statistics the caller gives (π₀'s, the batch's, validation's)."""
    return (x.float() - mean) / (std + 1e-8)


def sigmoid_prob(r):
    """σ(R), for display (score.py's prob* fields)."""
    return torch.sigmoid(torch.as_tensor(r).float())


class PairwiseRewardLoss(torch.nn.Module):
    """A reward model's training loss, Σ pair_weight · −log σ(r_c − r_r − m) over a Batch's pairs,
    as one module (trunk + the fused gather → RMSNorm → head → loss kernel), so that DDP and FSDP
    see every parameter used. The trunk stops before its final norm: the kernel normalises only
    the R scored rows, never the other N·T positions.

    With `first_layer` f > 0 the embedding and blocks below f are frozen and their output comes
    in as `hidden` (N, T, D), the input of block f laid out as the batch (data/features.py):
    only blocks f..n-1 run."""

    def __init__(self, model, impl, first_layer: int = 0):
        super().__init__()
        self.model, self.impl, self.first_layer = model, impl, first_layer

    def forward(self, batch, hidden=None):
        m = self.model
        if self.first_layer:
            h = m.blocks(hidden, batch.attention_mask, batch.position_ids,
                         first=self.first_layer)                                       # (N, T, D)
        else:
            h = m.trunk(batch.input_ids, batch.attention_mask, batch.position_ids, final_norm=False)
        return pairwise_margin_loss(h, batch.end_idx, m.head.weight[0], m.head.bias[0], batch.pairs,
                                    margin=batch.margin, pair_weight=batch.pair_weight,
                                    norm_weight=m.norm.weight, eps=m.config.norm_eps, impl=self.impl,
                                    reduction="sum")
