"""Fused Triton kernels with PyTorch reference paths (see kernels/_dispatch.py for path choice)."""
from kernels.pairwise_loss import PairwiseLossOutput, pairwise_margin_loss

try:  # kernels/logprobs.py is written alongside; import it once it exists
    from kernels.logprobs import token_logprobs
except ModuleNotFoundError as e:
    if e.name != "kernels.logprobs":
        raise

__all__ = ["pairwise_margin_loss", "PairwiseLossOutput", "token_logprobs"]
