"""Which implementation a kernel call takes.

Three paths, one public function per op:

1. compiled Triton   - inputs on a CUDA device (default there);
2. Triton interpreter - CPU inputs, only when the Triton path is asked for
   explicitly (impl="triton" or RMLAB_KERNELS=triton) *and* TRITON_INTERPRET=1
   was set before triton was imported;
3. PyTorch reference - everything else on CPU (the default).

TRITON_INTERPRET=1 alone never routes work through the (slow) interpreter, so a
test environment that leaks into a training subprocess keeps CPU training fast.
"""
import os

import torch

IMPLS = ("auto", "triton", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# @triton.jit builds an interpreted function or a compiled one when the kernel modules are
# imported, which is when this module is: the variable set later changes nothing.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_on() -> bool:
    return INTERPRETED


def choose_impl(impl: str, device: torch.device, dtype=None) -> str:
    """Returns "triton" or "reference" for a call whose tensors live on `device`. "auto" leaves
    float64 (the tests' ground truth) to the reference: the kernels take fp32/bf16/fp16."""
    if impl == "auto":
        impl = os.environ.get("RMLAB_KERNELS", "auto")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r} (argument impl or RMLAB_KERNELS)")
    if device.type == "cuda" and impl != "reference":
        return "reference" if impl == "auto" and dtype == torch.float64 else "triton"
    if impl != "triton":
        return "reference"
    if not interpreter_on():
        raise ValueError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton "
                         "is imported")
    return "triton"


# Input checks shared by the public functions: bad input raises one ValueError naming the argument.

def float_dtypes(kernel_path: bool) -> tuple:
    """The float dtypes a path takes: the kernels fp32/bf16/fp16, the reference also fp64
    (the tests' ground truth)."""
    return KERNEL_DTYPES if kernel_path else KERNEL_DTYPES + (torch.float64,)


def need(cond, msg: str):
    if not cond:
        raise ValueError(msg)


def describe_shape(t):
    """A tensor's shape for an error message, or the type's name if it is not a tensor."""
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
