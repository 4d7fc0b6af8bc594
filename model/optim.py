"""The optimizer recipe of every trained stage, Llama 2's: AdamW with β = (0.9, 0.95), eps 1e-5,
weight decay on matrices only; a linear warm-up (at least 5 steps), then cosine decay to 10%."""
import math

import torch


def make_optimizer(model, lr, weight_decay):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-5)


def set_lr(opt, step, total, peak, warmup_frac, min_frac=0.1):
    """Sets the learning rate of `step` (of `total`) in every group of `opt`, and returns it."""
    warmup = max(5, int(warmup_frac * total))
    progress = min(1.0, max(0, step - warmup) / max(1, total - warmup))
    lr = (peak * (step + 1) / warmup if step < warmup
          else peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress))))
    for group in opt.param_groups:
        group["lr"] = lr
    return lr
