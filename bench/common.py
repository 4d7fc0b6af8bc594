"""Timing and memory helpers shared by the benchmarks in bench/.

median_ms   median wall time of fn: triton.testing.do_bench on a GPU (it flushes L2 and
            syncs), perf_counter with a warm-up on CPU
peak_bytes  peak extra memory fn allocates: the CUDA allocator's peak on a GPU, a dispatch-mode
            tracker of live tensor storages on CPU (PeakCPUMemory)
copy_gbps   device copy bandwidth measured in the same run: the roof bytes-moved is read against
device_banner  the first lines of every table: which device, and a plain note when no GPU
            timings were taken
return_freed_memory  hand freed heap pages back to the OS between timed steps (glibc)
flag_error  a bad flag that shows only once the data or model is loaded: the parser's one line
"""
import ctypes
import os
import statistics
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from data.cli import EXIT_BAD_INPUT


def flag_error(message):
    """For a flag whose bad value shows only after loading (data, a model): the one line a parser
    error prints, "script.py: error: ...", and exit 2, before any timed work."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def median_ms(fn, device, grad_to_none=None, reps=None):
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
    fn()                                                     # warm-up
    times = []
    deadline = time.perf_counter() + 2.0
    while len(times) < (reps or 15) and (len(times) < 3 or time.perf_counter() < deadline):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


class PeakCPUMemory(TorchDispatchMode):
    """Peak bytes of tensor storages allocated inside the block and still alive, on CPU.

    Every op output is counted once per storage, and uncounted when the last tensor created
    on that storage inside the block dies (weakref.finalize)."""

    def __enter__(self):
        self.live, self.peak, self.refs = 0, 0, {}
        return super().__enter__()

    def _release(self, key, nbytes):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > 0:
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if key in inputs and key not in self.refs:
                    continue                    # a view of (or in place on) memory from before
                if key not in self.refs:
                    self.refs[key] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key, nbytes)
        return out


def peak_bytes(fn, device):
    """Peak memory allocated by fn beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with PeakCPUMemory() as tracker:
        fn()
    return tracker.peak


def return_freed_memory():
    """glibc's malloc_trim(0), called between steps and never inside a timed one. Long CPU runs at
    big shapes free and reallocate tens of MB-sized activations each step; glibc keeps the freed
    pages and the process's resident memory creeps up (19 -> 24 GB over a few steps of the 16 x 512
    bench, then the OOM killer). Trimming returns them; the next step page-faults them back, which
    its timing then includes. A no-op where libc is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def model_flops(model, batch):
    """Model FLOPs of one forward + backward on the batch's real tokens: 6 * P * real tokens, P =
    the matmul parameters (not the token embedding, a lookup, nor the scalar head, R rows), plus
    attention's QK^T and AV, 12 * H * hd per layer for each (query, key) pair the mask allows (causal,
    within a packed row's blocks). Padding counts for nothing: a step that computes it pays in time."""
    cfg = model.config
    P = sum(p.numel() for name, p in model.named_parameters()
            if not name.startswith(("tok_embeddings", "head")))
    mask = batch.attention_mask.bool()
    if mask.dim() == 2:                                      # (N, T) padded rows: causal over n real tokens
        n = mask.sum(-1)
        attended = int((n * (n + 1) // 2).sum())
    else:             # (N, T, T) packed rows: the block mask, less each padding query seeing itself
        attended = int(mask.sum()) - (batch.n_computed_tokens - batch.n_real_tokens)
    return 6 * P * batch.n_real_tokens + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * attended


def matmul_peak(device, n, dtype):
    """FLOP/s of an (n, n) @ (n, n) matmul in `dtype`, measured now: the roof MFU is read against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / (median_ms(lambda: a @ b, device) / 1e3)


def copy_gbps(nbytes, device):
    """Device copy bandwidth: read + write of an nbytes buffer, in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_ms(lambda: dst.copy_(src), device) / 1e6


def device_banner(gpu: bool, what_cpu_compares: str):
    print(f"device: {torch.cuda.get_device_name() if gpu else f'CPU, {torch.get_num_threads()} threads'};"
          f" torch {torch.__version__}")
    if not gpu:
        print("No GPU: GPU timings were NOT taken. The fused Triton path is not timed on CPU (the"
              f" interpreter is a test tool); {what_cpu_compares}")
    print()
