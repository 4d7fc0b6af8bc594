"""A model on many processes: DDP or FSDP2 wrapping, whole weights back, and exact reductions.

Every function is a no-op on one process (no process group), so the same code runs either way.
"""
import math
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from .checkpoint import rng_state, save_checkpoint, set_rng_state
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
    return rank, world, torch.device(device)


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
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
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
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"optimizer": get_optimizer_state_dict(model, opt, options=options), "step": step,
            "rng": rng_state()}


def restore_training(saved, model, opt):
    """Loads a Checkpoint written with training_state into `model` (plain, DDP or FSDP) and `opt`;
    returns the step to resume at."""
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, saved.model.state_dict(), options=full)
    set_optimizer_state_dict(model, opt, saved.train_state["optimizer"], options=full)
    set_rng_state(saved.train_state["rng"])
    return int(saved.train_state["step"])
