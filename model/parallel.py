"""A model on many processes: DDP or FSDP2 wrapping, whole weights back, and exact reductions.

Every function is a no-op on one process (no process group), so the same code runs either way.
"""
import ctypes
import math
import os

import torch
import torch.distributed as dist

from .checkpoint import rng_state, save_checkpoint, set_rng_state
from .files import CheckpointError
from .llama import Llama, TransformerBlock


def init_processes(device_flag, threads):
    """(rank, world size, device): joins torchrun's process group when it started us, and picks
    this process's device (device_flag has checked that CUDA is there) or its CPU threads:
    `threads`, else OMP_NUM_THREADS, which wins over the core count (spinning threads on busy
    cores are slow), else cores / processes."""
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() and device_flag != "cpu" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = device_flag
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    else:
        torch.set_num_threads(threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or
                              max(1, (os.cpu_count() or 1) // world))
        reuse_freed_memory()
    return rank, world, torch.device(device)


def reuse_freed_memory():
    """On a CPU, keep the memory a step frees for the next step instead of handing it back.

    glibc gives every allocation over its mmap threshold (at most 32 MB) pages of its own and
    unmaps them on free, so each training step page-faults its big activations in anew, and on
    a VM a fault is dear. With mmap off and trimming off, freed tensors go back to the heap and
    the next step reuses them: bench/bench_vs_hf.py's packed step at SmolLM2's shape (16 pairs x
    512, bf16, 2 threads) ran 1.3x faster for 0.5 GB more peak memory (numbers in README). The
    cost: resident memory stays near its high-water mark. Limits: mallopt takes an int, so once
    2 GiB or more lie free at the heap's top glibc still returns them (GLIBC_TUNABLES=
    glibc.malloc.trim_threshold=..., set before start, lifts that); it covers the main thread's
    arena, where the CPU forward and backward allocate. Skipped when the user chose an allocator
    (LD_PRELOAD, MALLOC_* variables, malloc tunables) and where libc is not glibc.
    """
    if ("LD_PRELOAD" in os.environ or "malloc" in os.environ.get("GLIBC_TUNABLES", "")
            or any(k.startswith("MALLOC_") for k in os.environ)):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4                   # glibc's mallopt parameter numbers
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(values, device):
    """Σ over ranks of a list of floats: exact metrics are Σ/Σ, never a mean of means."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather(obj):
    """[every rank's obj], in rank order; [obj] on one process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def global_mean_std(x):
    """Mean and population std of every rank's values of x (std 1 for a single value)."""
    x = x.double()
    n, total, squares = all_sum([x.numel(), float(x.sum()), float((x ** 2).sum())], x.device)
    mean = total / n
    return mean, math.sqrt(max(squares / n - mean ** 2, 0.0)) if n > 1 else 1.0


def wrap(module, fsdp, device):
    """DDP, or FSDP2 with one unit per transformer block, or the module itself on one process.
    Both average gradients over ranks (the caller multiplies its loss by the world size)."""
    if not dist.is_initialized():
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in [m for m in module.modules() if isinstance(m, TransformerBlock)]:
            fully_shard(block)
        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def whole(model):
    """The model itself, or under FSDP a plain copy with the full weights (every rank joins the
    gather), for evaluation and for a checkpoint that loads in a single process."""
    if not any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return model
    from torch.distributed.checkpoint import state_dict as dcp   # 1.5 s to import: only when used
    state = dcp.get_model_state_dict(model, options=dcp.StateDictOptions(full_state_dict=True))
    plain = Llama(model.config, head=model.head_kind).to(next(iter(state.values())).device)
    plain.load_state_dict(state)
    return plain


def save_model(path, model, tok, meta, rank, train_state=None):
    """save_checkpoint of the whole model, written by rank 0 once every rank has joined the gather."""
    model = whole(model)
    if rank == 0:
        save_checkpoint(path, model, tokenizer=tok, meta=meta, train_state=train_state)
    barrier()


def training_state(model, opt, step):
    """What a checkpoint needs to resume a stage exactly: the optimizer as whole tensors keyed by
    name (any sharding loads them), the step and every random generator."""
    from torch.distributed.checkpoint import state_dict as dcp
    options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"optimizer": dcp.get_optimizer_state_dict(model, opt, options=options), "step": step,
            "rng": rng_state()}


def restore_training(saved, model, opt):
    """Loads a Checkpoint written with training_state into `model` (plain, DDP or FSDP) and `opt`;
    returns the step to resume at."""
    from torch.distributed.checkpoint import state_dict as dcp
    full = dcp.StateDictOptions(full_state_dict=True)
    try:                 # every rank reads the same file: all raise, or none
        dcp.set_model_state_dict(model, saved.model.state_dict(), options=full)
        dcp.set_optimizer_state_dict(model, opt, saved.train_state["optimizer"], options=full)
        set_rng_state(saved.train_state["rng"])
        return int(saved.train_state["step"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:      # another stage's, or damaged
        raise CheckpointError(f"the checkpoint's training state does not fit this stage ({type(e).__name__}: "
                              f"{e}); --redo the stage") from None
