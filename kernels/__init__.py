"""Fused Triton kernels with PyTorch reference paths (see kernels/_dispatch.py for path choice)."""
from kernels.logprobs import token_logprobs
from kernels.pairwise_loss import PairwiseLossOutput, pairwise_margin_loss

__all__ = ["pairwise_margin_loss", "PairwiseLossOutput", "token_logprobs"]
