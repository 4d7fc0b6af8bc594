"""--dtype auto | fp32 | bf16: the precision a run computes in, chosen once at start and logged.

bf16 means autocast: the weights and the optimizer stay fp32, matmuls and attention run in
bf16, and what is sensitive stays fp32 by construction (RMSNorm computes in fp32 in
model/llama.py, the pairwise loss and token log-probs accumulate in fp32 in kernels/, and
softmax inside SDPA accumulates in fp32).

auto picks bf16 where the hardware multiplies bf16 matrices natively and fp32 elsewhere:
  CUDA with bf16 support (Ampere and later);
  CPUs with AMX tiles (Intel Sapphire Rapids and later), where a bf16 matmul runs ~6x faster
  than fp32 (2,350 against 357 GFLOP/s for 2048^3 on 2 cores here). AVX512-BF16 without AMX
  only converts faster, so it stays fp32.
On a CPU, a model narrower than MIN_BF16_WIDTH_CPU stays fp32 even with AMX: its matmuls are
too small for the tiles to pay for autocast's casts (measured below). The check reads CPU flags
and the model's width, not a timing probe, so the choice is the same on every run.
"""
from contextlib import nullcontext
from typing import Optional, Tuple

import torch

DTYPES = ("auto", "fp32", "bf16")


def has_bf16_matrix_units(device: torch.device) -> bool:
    if device.type == "cuda":
        # Ampere and later: torch.cuda.is_bf16_supported() also counts emulated bf16 (Turing)
        return torch.cuda.get_device_capability(device)[0] >= 8
    return bool(torch.cpu._is_amx_tile_supported())


# On a CPU, AMX pays for autocast's casts only when the matmuls are wide enough. Measured here
# (2 cores): at width 128 (the default preset) bf16 made `python train.py` slower, 5 min 39 s
# against 3 min 45 s in fp32; at SmolLM2's 576 an RM step ran 1.9x faster in bf16.
MIN_BF16_WIDTH_CPU = 512


def resolve_dtype(flag: str, device: torch.device, width: Optional[int] = None) -> Tuple[str, str]:
    """("fp32" | "bf16", why) for --dtype `flag` on `device`, for a model of `width` (its dim;
    None: unknown, as for score.py before it loads)."""
    if flag not in DTYPES:
        raise ValueError(f"--dtype {flag!r}: choose one of {', '.join(DTYPES)}")
    if flag != "auto":
        return flag, "as asked"
    if not has_bf16_matrix_units(device):
        return "fp32", "auto: no bf16 matrix units on this device"
    if device.type == "cpu" and width is not None and width < MIN_BF16_WIDTH_CPU:
        return "fp32", (f"auto: this CPU has AMX bf16 tiles, but at width {width} (< {MIN_BF16_WIDTH_CPU}) "
                        "the casts cost more than they save")
    return "bf16", f"auto: {'CUDA bf16' if device.type == 'cuda' else 'AMX bf16 tiles on this CPU'}"


def autocast(dtype: str, device: torch.device):
    """The context every forward runs in: bf16 autocast, or nothing for fp32."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
