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
until its validation rewards have mean 0 before these thresholds mean anything.
"""
import math

import torch

SAFETY_THRESHOLD = 0.15
SAFETY_LOGIT = math.log(SAFETY_THRESHOLD / (1.0 - SAFETY_THRESHOLD))   # ≈ -1.7346


def select_reward(r_safety, r_helpful, is_safety):
    """Llama 2's R_c. All (n,) tensors; returns (R_c (n,), used_safety (n,) bool)."""
    is_safety = torch.as_tensor(is_safety, dtype=torch.bool, device=r_safety.device)
    use_safety = is_safety | (r_safety < SAFETY_LOGIT)
    return torch.where(use_safety, r_safety, r_helpful), use_safety


def whiten(x, mean=None, std=None, eps: float = 1e-8):
    """(x - mean) / std, with the batch's own statistics when none are given."""
    x = x.float()
    if mean is None:
        mean = x.mean()
    if std is None:
        std = x.std(unbiased=False) if x.numel() > 1 else torch.ones((), device=x.device)
    return (x - mean) / (torch.as_tensor(std, dtype=x.dtype, device=x.device) + eps)


def sigmoid_prob(r):
    """σ(R), for display (score.py's prob* fields)."""
    return torch.sigmoid(torch.as_tensor(r).float())
