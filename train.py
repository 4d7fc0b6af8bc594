"""
rmlab train.py: from nothing to a KL-shaped PPO reward, in one file, top to bottom.

    tokenizer ─> lm (π₀) ─> rm: swap head → helpfulness RM, safety RM (offset and scale fixed on validation)
                         └─> reward: sample from π_θ, log-probs under π_θ and π₀ → per-token −β·KL_t,
                                      R_c by Llama 2's 0.15 rule, whitened, added at the last response token
                              └─> ppo (not a default stage): rollouts, that reward, GAE, clipped updates

    python train.py                                   # the built-in world, CPU, a few minutes
    python train.py --data safety=../shared/data/hh-rlhf/harmless-base/test.jsonl.gz,\
../shared/data/hh-rlhf/helpful-base/test.jsonl.gz --preset small --max-minutes 10
    torchrun --nproc_per_node=2 train.py --stages tokenizer,lm,rm

Each stage writes into its own folder under --out with the config it ran with (stage.json);
a finished stage whose config matches is reused, a changed flag is an error that names it.
"""
import argparse
import copy
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import DataError, builtin, encode_records, load_records, make_batch, split_records
from data.evaluate import accuracy_table, length_baseline, pair_outcomes, score_records
from kernels import pairwise_margin_loss, token_logprobs
from model import Llama, Tokenizer, get_preset, PRESETS
from model.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from model.rewards import fit_temperature, select_reward, whiten

STAGES = ("tokenizer", "lm", "rm", "reward", "ppo")


class Fatal(Exception):
    """One clear line for the user and a non-zero exit; no traceback."""


# -----------------------------------------------------------------------------------------
# Flags. Every flag is documented here; `python train.py --help` prints them.

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train a Llama LM, turn it into helpfulness/safety reward models, and compute "
                    "the KL-shaped PPO reward.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/default", help="run directory; each stage writes a sub-folder")
    g.add_argument("--stages", default="tokenizer,lm,rm,reward", help=f"comma list from {STAGES}")
    g.add_argument("--redo", default="", help="comma list of stages to run again (and every later one)")
    g.add_argument("--resume", action="store_true", help="continue an unfinished stage from its checkpoint")
    g.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads per process (0 = OMP_NUM_THREADS if set, else cores / processes)")
    g.add_argument("--max-minutes", type=float, default=0.0,
                   help="per training stage: stop cleanly after this many minutes and save (0 = no limit)")
    g.add_argument("--max-steps", type=int, default=0, help="per training stage: cap on optimizer steps (0 = none)")
    g.add_argument("--stop-at-step", type=int, default=0,
                   help="stop a training stage after this many steps as if interrupted, keeping a "
                        "resumable checkpoint (for testing --resume)")
    g.add_argument("--log-every", type=int, default=20, help="one log line every N optimizer steps")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="",
                   help="comma list of preference files (JSONL, JSONL.gz, JSON); prefix a path with "
                        "safety= to mark its records as safety prompts (e.g. HH-RLHF harmless-base) or "
                        "helpful= to mark them helpful. Empty = the built-in world with an oracle")
    g.add_argument("--skip-bad", action="store_true", help="count and skip malformed lines instead of failing")
    g.add_argument("--builtin-prompts", type=int, default=4000, help="size knob of the built-in world")
    g.add_argument("--builtin-rejections", type=int, default=4, choices=(1, 2, 3, 4),
                   help="rejected responses per built-in helpful prompt, of distinct grades, each paired "
                        "with the good one (the packed layout computes the prompt once for all of them)")
    g.add_argument("--max-len", type=int, default=0,
                   help="tokens per sequence; longer prompts lose their start (0 = the preset's max_seq_len)")
    g.add_argument("--layout", choices=("packed", "padded"), default="packed",
                   help="packed: the prompt is computed once and its responses follow it in one row")
    g.add_argument("--pad-side", choices=("right", "left"), default="right", help="padding side of the padded layout")
    g.add_argument("--split", default="0.9,0.05,0.05",
                   help="train,val,test fractions for --data files; prompt-disjoint, by sha256 of the "
                        "prompt text (the built-in world splits its own prompt space 80/10/10)")
    g = p.add_argument_group("tokenizer and model")
    g.add_argument("--tokenizer", default="", help="use this SentencePiece .model instead of training one")
    g.add_argument("--vocab-size", type=int, default=0, help="pieces of the trained tokenizer (0 = the preset's)")
    g.add_argument("--preset", default="default", choices=sorted(PRESETS), help="model shape")
    g.add_argument("--init-from", default="", help="start the LM from a checkpoint (ours, Hugging Face or Meta)")
    g = p.add_argument_group("lm stage (π₀)")
    g.add_argument("--lm-steps", type=int, default=1000)
    g.add_argument("--lm-batch", type=int, default=32, help="sequences per optimizer step")
    g.add_argument("--lm-lr", type=float, default=3e-3)
    g.add_argument("--demo-refusals", type=float, default=None,
                   help="share of the helpful SFT demonstrations replaced by a needless refusal, as in an "
                        "over-cautious SFT set: what RLHF then fixes (built-in world only; default 0.3 there)")
    g = p.add_argument_group("rm stage (Llama 2's recipe unless said otherwise)")
    g.add_argument("--rm-mode", choices=("auto", "single", "two"), default="auto",
                   help="two = helpfulness and safety models (auto: when the data has safety labels)")
    g.add_argument("--margin", choices=("auto", "none", "small", "large", "field"), default="auto",
                   help="auto: a record's margin field, else its rating through Llama 2's small table, else 0")
    g.add_argument("--helpful-safety-share", type=float, default=1.0,
                   help="safety pairs in the helpfulness model's mix, as a fraction of its helpful pairs "
                        "(1 = Llama 2's equal share, 0 = helpful pairs only; on HH-RLHF, whose safety pairs "
                        "prefer the shorter response, 0 is better)")
    g.add_argument("--epochs", type=float, default=3.0,
                   help="passes over the RM training pairs (Llama 2 used 1 on millions of pairs; the "
                        "built-in world, with 4 rejections per prompt, needs about 3 at this size)")
    g.add_argument("--batch-pairs", type=int, default=64, help="pairs per optimizer step (global)")
    g.add_argument("--micro-pairs", type=int, default=64, help="pairs per forward pass; accumulate up to --batch-pairs")
    g.add_argument("--rm-lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--warmup", type=float, default=0.03, help="warm-up fraction of steps (at least 5 steps)")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--center-coef", type=float, default=0.0,
                   help="reward-centering term c·mean((r_c + r_r)²) (0 = off)")
    g.add_argument("--kernel", choices=("auto", "triton", "reference"), default="auto",
                   help="pairwise loss implementation (auto: Triton on CUDA, the PyTorch reference on CPU)")
    g = p.add_argument_group("reward stage (the KL-shaped PPO reward)")
    g.add_argument("--policy", default="", help="π_θ checkpoint (default: π₀ itself, so the KL is 0)")
    g.add_argument("--reward-prompts", type=int, default=64, help="held-out prompts to sample")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--kl-coef", type=float, default=0.01, help="β in R = R̃ − β·KL")
    g.add_argument("--kl-estimator", choices=("k1", "k2", "k3"), default="k1",
                   help="per-token KL estimate with k1 = log π_θ − log π₀; k2 = ½k1²; k3 = e^(−k1) − 1 + k1. "
                        "Only k1 gives the right policy gradient when the KL is used as a reward")
    g.add_argument("--whiten", choices=("batch", "saved"), default="batch",
                   help="whiten R_c with the batch's statistics (Llama 2) or each model's saved validation stats")
    g.add_argument("--missing-eos-penalty", type=float, default=0.0,
                   help="subtract this from the score of a sample that hit the length limit without EOS")
    g.add_argument("--show", type=int, default=6, help="samples printed in the reward table")
    g = p.add_argument_group("ppo stage (not a default stage: add it with --stages ...,ppo)")
    g.add_argument("--ppo-iters", type=int, default=100, help="rollout + update iterations (~3 min on 2 CPU cores)")
    g.add_argument("--ppo-batch", type=int, default=64, help="responses sampled per rollout")
    g.add_argument("--ppo-group", type=int, default=4,
                   help="responses per prompt; >1 subtracts each prompt's leave-one-out mean score "
                        "(RLOO), so the advantage says which response was better, not which prompt was easier")
    g.add_argument("--ppo-epochs", type=int, default=2, help="passes over each rollout")
    g.add_argument("--ppo-minibatch", type=int, default=32, help="rollouts per update")
    g.add_argument("--ppo-lr", type=float, default=1e-4, help="policy learning rate")
    g.add_argument("--value-lr", type=float, default=1e-4, help="value model learning rate")
    g.add_argument("--clip", type=float, default=0.2, help="PPO ratio clip ε")
    g.add_argument("--vf-clip", type=float, default=0.2, help="value clip")
    g.add_argument("--gamma", type=float, default=1.0, help="GAE discount γ")
    g.add_argument("--lam", type=float, default=0.95, help="GAE λ")
    g.add_argument("--ppo-kl-coef", type=float, default=0.1,
                   help="β of the PPO stage's reward. The reward stage's --kl-coef (0.01, Llama 2's) is what it "
                        "displays; with whitened scores a 1M-parameter policy outruns 0.01 (the KL passes 3 nats "
                        "in 100 iterations and the win-rate falls back: see the README), so PPO defaults to 0.1")
    g.add_argument("--kl-target", type=float, default=0.0,
                   help="adapt β toward this KL per sample (nats; 0 = keep --kl-coef fixed)")
    g.add_argument("--kl-horizon", type=int, default=10000,
                   help="samples over which the adaptive β moves by at most a factor e^0.2 (Ziegler et al.)")
    g.add_argument("--value-init", choices=("rm", "lm"), default="rm",
                   help="value model from a reward model (InstructGPT) or from π₀ with a fresh head")
    g.add_argument("--ppo-eval-prompts", type=int, default=400,
                   help="held-out prompts for the win-rate (all 400 test prompts of the built-in world)")
    g.add_argument("--ppo-eval-every", type=int, default=10, help="evaluate every N iterations")
    g.add_argument("--ppo-eval-samples", type=int, default=2,
                   help="samples per held-out prompt from π_θ and from π₀; the win-rate compares every pair")
    args = p.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    for s in args.stages + [s for s in args.redo.split(",") if s]:
        if s not in STAGES:
            p.error(f"unknown stage {s!r}; choose from {', '.join(STAGES)}")
    try:
        args.split = tuple(float(x) for x in args.split.split(","))
        assert len(args.split) == 3 and abs(sum(args.split) - 1) < 1e-6 and min(args.split) > 0
    except (ValueError, AssertionError):
        p.error(f"--split must be three positive fractions summing to 1, got {args.split!r}")
    if args.ppo_group < 1 or args.ppo_batch % args.ppo_group:
        p.error(f"--ppo-batch ({args.ppo_batch}) must be a multiple of --ppo-group ({args.ppo_group}) >= 1")
    if args.helpful_safety_share < 0:
        p.error(f"--helpful-safety-share must be >= 0, got {args.helpful_safety_share}")
    if min(args.ppo_eval_prompts, args.ppo_eval_samples, args.ppo_eval_every) < 1:
        p.error("--ppo-eval-prompts, --ppo-eval-samples and --ppo-eval-every must be >= 1")
    if args.demo_refusals is not None and not 0.0 <= args.demo_refusals <= 1.0:
        p.error(f"--demo-refusals must be in [0, 1], got {args.demo_refusals}")
    return args


# -----------------------------------------------------------------------------------------
# Setup: device, processes, logging.

def setup(args):
    if "RANK" in os.environ:            # started by torchrun
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if args.device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise Fatal("--device cuda: no CUDA device is visible")
        torch.cuda.set_device(torch.device(device))
    else:
        # Respect OMP_NUM_THREADS when set: on a loaded machine, OpenMP threads that spin on
        # busy cores make small models many times slower than one thread.
        threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or (os.cpu_count() or 1) // world
        torch.set_num_threads(max(1, threads))
    torch.manual_seed(args.seed)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,
                        format="%(message)s", stream=sys.stdout, force=True)
    return rank, world, torch.device(device)


log = logging.getLogger("rmlab.train").info


def autocast(device):
    """bf16 autocast on CUDA; full fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(values, device):
    """Σ over ranks of a list of floats (exact metrics: Σcorrect / Σn, never a mean of means)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# -----------------------------------------------------------------------------------------
# Stages: each one a folder with stage.json = {"config": ..., "done": bool, "summary": ...}.

def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)          # atomic: a reader sees the old file or the new one


# Flags added after run dirs already existed, with the value those older runs implicitly ran
# with: a stage record without the key matches a config that holds that value.
ADDED_LATER = {"demo_refusals": 0.0, "helpful_safety_share": 1.0}


class Stage:
    def __init__(self, args, name, config, rank):
        self.name, self.config, self.rank = name, config, rank
        self.dir = os.path.join(args.out, name)
        self.meta_path = os.path.join(self.dir, "stage.json")
        self.t0 = time.time()
        redo = {s for s in args.redo.split(",") if s}
        redo_from = min((STAGES.index(s) for s in redo), default=len(STAGES))
        saved = None
        barrier()                      # every rank reads the stage record before rank 0 rewrites it
        if os.path.exists(self.meta_path):
            try:
                with open(self.meta_path) as f:
                    saved = json.load(f)
            except (OSError, ValueError) as e:
                raise Fatal(f"{self.meta_path}: unreadable stage record ({e}); use --redo {name}")
        if STAGES.index(name) >= redo_from or saved is None:
            self.mode = "fresh"
        else:
            before = {**{k: v for k, v in ADDED_LATER.items() if k in config}, **saved["config"]}
            diffs = sorted(k for k in set(before) | set(config) if before.get(k) != config.get(k))
            if diffs:
                said = "; ".join(f"--{k.replace('_', '-')} was {before.get(k)!r}, now "
                                 f"{config.get(k)!r}" for k in diffs)
                raise Fatal(f"stage {name}: {self.dir} was made with other flags ({said}). "
                            f"Pass --redo {name} to run it again, or use another --out")
            if saved.get("done"):
                self.mode = "reuse"
            elif args.resume:
                self.mode = "resume"
            else:
                raise Fatal(f"stage {name}: {self.dir} holds an unfinished run; pass --resume to "
                            f"continue it or --redo {name} to start over")
        barrier()
        if self.mode == "fresh" and rank == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
            os.makedirs(self.dir)
            write_json(self.meta_path, {"config": config, "done": False})
        barrier()
        self.summary = saved.get("summary", {}) if self.mode == "reuse" else {}
        log(f"[{name}] {'reusing the finished stage in' if self.mode == 'reuse' else self.mode + ' run in'} {self.dir}")

    def finish(self, summary):
        self.summary = {**summary, "seconds": round(time.time() - self.t0, 1)}
        if self.rank == 0:
            write_json(self.meta_path, {"config": self.config, "done": True, "summary": self.summary})
        barrier()


# -----------------------------------------------------------------------------------------
# The optimizer and the schedule (Llama 2: AdamW β=(0.9, 0.95), eps 1e-5, wd 0.1, cosine to 10%).

def make_optimizer(model, lr, weight_decay):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-5)


def lr_at(step, total, peak, warmup_frac, min_frac=0.1):
    """Linear warm-up over max(5, warmup_frac·total) steps, then cosine decay to min_frac·peak."""
    warmup = max(5, int(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def plan_steps(n_items, items_per_step, epochs, seed):
    """The global data order: a list of item-index lists, one per optimizer step.

    Deterministic given the seed, so a resumed run and every rank agree on it; rank r of
    W takes items[r::W] of each step, so the global batch is the same for any W.
    """
    g = torch.Generator().manual_seed(seed)
    order = []
    for _ in range(math.ceil(epochs)):
        order += torch.randperm(n_items, generator=g).tolist()
    order = order[:max(1, int(round(epochs * n_items)))]
    return [order[i:i + items_per_step] for i in range(0, len(order), items_per_step)]


def fit(stage, args, model, train_model, steps, micro_step, peak_lr, device, rank, world):
    """The training loop shared by the lm and rm stages.

    steps:       list of global item-index lists, one per optimizer step (plan_steps).
    micro_step:  fn(items_of_this_rank_for_one_forward, step_items_total) -> (loss to backprop,
                 dict of summable metrics).  The loss is already scaled so that the sum over
                 micro-batches and ranks is the step's loss.
    Saves a resumable checkpoint on interrupt, on the time budget and at the end.
    """
    ckpt_dir = os.path.join(stage.dir, "model")
    opt = make_optimizer(model, peak_lr, args.weight_decay if stage.name == "rm" else 0.1)
    start = 0
    if stage.mode == "resume":
        saved = load_checkpoint(ckpt_dir, map_location=device)
        if saved.train_state is None:
            raise Fatal(f"stage {stage.name}: {ckpt_dir} has no resumable state; use --redo {stage.name}")
        model.load_state_dict(saved.model.state_dict())
        opt.load_state_dict(saved.train_state["optimizer"])
        set_rng_state(saved.train_state["rng"])
        start = int(saved.train_state["step"])
        log(f"[{stage.name}] resuming at step {start}/{len(steps)}")
    total = len(steps)
    if args.max_steps:
        steps = steps[:args.max_steps]
    metrics_path = os.path.join(stage.dir, "metrics.jsonl")
    t_start, tokens_seen, history = time.time(), 0, []
    bar = make_progress(total, start, rank)

    def save(step, done):
        if rank == 0:
            train_state = None if done else {"optimizer": opt.state_dict(), "step": step, "rng": rng_state()}
            save_checkpoint(ckpt_dir, model, tokenizer=stage.tokenizer, meta=stage.ckpt_meta,
                            train_state=train_state)
        barrier()

    # Ctrl-C sets a flag that the loop reads between steps, so the checkpoint it saves is
    # never taken halfway through an optimizer update. A second Ctrl-C stops at once.
    stop_requested = []

    def on_sigint(signum, frame):
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested.append(signum)

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        for step in range(start, len(steps)):
            lr = lr_at(step, total, peak_lr, args.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            items = steps[step][rank::world]
            micro = max(1, args.micro_pairs if stage.name == "rm" else args.lm_batch)
            chunks = [items[i:i + micro] for i in range(0, len(items), micro)] or [[]]
            sums = {}
            for i, chunk in enumerate(chunks):
                # DDP all-reduces gradients only on the last micro-batch of a step.
                sync = i == len(chunks) - 1 or not hasattr(train_model, "no_sync")
                with (nullcontext() if sync else train_model.no_sync()), autocast(device):
                    loss, m = micro_step(chunk, steps[step])
                loss.backward()
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
            sums["stop"] = float(bool(stop_requested))      # every rank stops at the same step
            keys = sorted(sums)
            sums = dict(zip(keys, all_sum([sums[k] for k in keys], device)))
            step_loss = sums["loss_sum"] / max(sums["weight"], 1e-12)
            if not math.isfinite(step_loss):
                raise Fatal(f"stage {stage.name}: loss is {step_loss} at step {step + 1}; stopped. "
                            f"The last good checkpoint (if any) is kept in {ckpt_dir}")
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens_seen += sums.get("tokens", 0)
            elapsed = time.time() - t_start
            row = {"step": step + 1, "loss": step_loss, "lr": lr, "tokens_per_s": tokens_seen / max(elapsed, 1e-9)}
            if "correct" in sums:
                row["accuracy"] = sums["correct"] / max(sums["n_pairs"], 1)
            history.append(row)
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.update(1)
                if (step + 1) % args.log_every == 0 or step + 1 == len(steps):
                    eta = elapsed / (step + 1 - start) * (len(steps) - step - 1)
                    acc = f" acc {row['accuracy']:.3f}" if "accuracy" in row else ""
                    bar.write(f"[{stage.name}] step {step + 1}/{len(steps)} loss {step_loss:.4f}{acc} "
                              f"lr {lr:.2e} {row['tokens_per_s']:.0f} tok/s eta {eta:.0f}s")
            if sums["stop"]:
                save(step + 1, done=False)
                raise Fatal(f"stage {stage.name}: interrupted after step {step + 1}; checkpoint saved in "
                            f"{ckpt_dir}; continue with --resume")
            if args.stop_at_step and step + 1 == args.stop_at_step and step + 1 < len(steps):
                save(step + 1, done=False)
                raise Fatal(f"stage {stage.name}: stopped at step {step + 1} (--stop-at-step); "
                            f"continue with --resume")
            if args.max_minutes and elapsed > 60 * args.max_minutes:
                log(f"[{stage.name}] --max-minutes reached after {step + 1} steps; stopping cleanly")
                break
    except KeyboardInterrupt:
        raise Fatal(f"stage {stage.name}: stopped by a second Ctrl-C during step {step + 1}; the last "
                    f"saved checkpoint (if any) is in {ckpt_dir}")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
    save(len(steps), done=True)
    plot_curves(metrics_path, stage.dir, rank)
    return history


def make_progress(total, start, rank):
    """A tqdm bar on a terminal; plain log lines otherwise."""
    if rank == 0 and sys.stderr.isatty():
        try:
            from tqdm import tqdm
            return tqdm(total=total, initial=start, leave=False, dynamic_ncols=True)
        except ImportError:
            pass

    class Quiet:
        def update(self, n): pass
        def write(self, s): log(s)
        def close(self): pass
    return Quiet()


def plot_curves(metrics_path, out_dir, rank):
    """loss and accuracy against step, as a PNG, when matplotlib is installed."""
    if rank != 0 or not os.path.exists(metrics_path):
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(metrics_path)]
    fig, axes = plt.subplots(1, 2 if "accuracy" in rows[-1] else 1, figsize=(9, 3.2), squeeze=False)
    axes[0, 0].plot([r["step"] for r in rows], [r["loss"] for r in rows])
    axes[0, 0].set(xlabel="step", ylabel="loss")
    if "accuracy" in rows[-1]:
        axes[0, 1].plot([r["step"] for r in rows], [r["accuracy"] for r in rows])
        axes[0, 1].set(xlabel="step", ylabel="train accuracy")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=90)
    plt.close(fig)


# -----------------------------------------------------------------------------------------
# Data: files or the built-in world, split by prompt.

def load_data(args):
    """Returns ({"train","val","test"} -> records, has_oracle, summary lines)."""
    if not args.data:
        splits = builtin.make_dataset(n_prompts=args.builtin_prompts, seed=args.seed, n_rejected=args.builtin_rejections)
        return splits, True, [f"data: built-in world, {args.builtin_prompts} prompts, {args.builtin_rejections} "
                              f"rejection(s) per helpful prompt, seed {args.seed}"]
    records, lines = [], []
    for entry in args.data.split(","):
        tag, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
        if tag not in ("", "safety", "helpful"):
            raise Fatal(f"--data: unknown tag {tag!r} in {entry!r}; use safety=PATH or helpful=PATH")
        if path != "-" and not os.path.exists(path):
            raise Fatal(f"--data: no such file: {path}")
        recs, stats = load_records(path, skip_bad=args.skip_bad, tag=tag or None)
        records += recs
        lines.append(f"data: {path}: {stats.summary()}")
    if not records:
        raise Fatal("--data: no usable records")
    return split_records(records, fractions=dict(zip(("train", "val", "test"), args.split))), False, lines



# -----------------------------------------------------------------------------------------
# Stage 1: the tokenizer.

def stage_tokenizer(args, splits, rank):
    cfg = {"data": args.data, "builtin_prompts": args.builtin_prompts, "seed": args.seed,
           "tokenizer": args.tokenizer, "vocab_size": args.vocab_size, "preset": args.preset,
           "split": list(args.split), **({} if args.data else {"builtin_rejections": args.builtin_rejections})}
    stage = Stage(args, "tokenizer", cfg, rank)
    path = os.path.join(stage.dir, "tokenizer.model")
    if stage.mode != "reuse":
        if rank == 0:
            if args.tokenizer:
                Tokenizer(args.tokenizer)                   # fails clearly if it is not SentencePiece
                shutil.copyfile(args.tokenizer, path)
            else:
                texts = [t for r in splits["train"] for t in [r.prompt, *r.responses]]
                vocab = args.vocab_size or get_preset(args.preset).vocab_size
                Tokenizer.train(texts, os.path.join(stage.dir, "tokenizer"), vocab_size=vocab)
        barrier()
        tok = Tokenizer(path)
        stage.finish({"vocab_size": tok.vocab_size})
    return cfg, Tokenizer(path)


# -----------------------------------------------------------------------------------------
# Stage 2: the language model π₀ (next-token loss on prompt + good response).

def lm_sequences(records, tok, max_len, refusals=0.0, seed=0):
    """BOS + prompt + response + EOS token lists; a long prompt loses its start."""
    seqs = []
    for prompt, response in builtin.sft_corpus(records, refusals, seed):
        p, r = tok.encode(prompt), tok.encode(response)
        keep = max(0, max_len - 2 - len(r))
        if len(r) + 2 > max_len:
            continue
        seqs.append([tok.bos_id] + p[len(p) - keep:] + r + [tok.eos_id])
    return seqs


def stage_lm(args, tok_cfg, tok, splits, device, rank, world):
    cfg = {**tok_cfg, "init_from": args.init_from, "lm_steps": args.lm_steps, "lm_batch": args.lm_batch,
           "lm_lr": args.lm_lr, "max_len": args.max_len, "demo_refusals": args.demo_refusals}
    stage = Stage(args, "lm", cfg, rank)
    ckpt_dir = os.path.join(stage.dir, "model")
    if stage.mode == "reuse":
        return cfg, ckpt_dir
    max_len = args.max_len or get_preset(args.preset).max_seq_len
    if args.init_from:
        model = load_model_or_die(args.init_from, head="lm")
    else:
        model = Llama(get_preset(args.preset, vocab_size=tok.vocab_size, max_seq_len=max(max_len, 128)), head="lm")
    model.to(device)
    seqs = lm_sequences(splits["train"], tok, max_len, args.demo_refusals, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[lm] {len(seqs)} sequences, {n_params / 1e6:.2f}M parameters, device {device}, "
        f"{torch.get_num_threads()} threads, ~{args.lm_batch * sum(map(len, seqs)) / max(1, len(seqs)):.0f} tokens/step")
    steps = plan_steps(len(seqs), args.lm_batch, epochs=args.lm_steps * args.lm_batch / max(1, len(seqs)), seed=args.seed)
    train_model = ddp(model, device)

    def micro_step(items, step_items):
        batch = [seqs[i] for i in items]
        T = max(map(len, batch))
        ids = torch.full((len(batch), T), tok.pad_id, dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, :len(s)] = torch.tensor(s)
        ids = ids.to(device)
        targets = ids[:, 1:].masked_fill(ids[:, 1:] == tok.pad_id, -100)
        mask = (ids != tok.pad_id).long()
        logits = train_model(ids, attention_mask=mask)[:, :-1]
        nll_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                  ignore_index=-100, reduction="sum")
        n_tokens = int((targets != -100).sum())
        n_global = sum(len(seqs[i]) - 1 for i in step_items)   # every rank knows the whole step's plan
        return nll_sum / n_global * world, {"loss_sum": float(nll_sum.detach()), "weight": n_tokens, "tokens": int(mask.sum())}

    stage.tokenizer, stage.ckpt_meta = tok, {"stage": "lm"}
    history = fit(stage, args, model, train_model, steps, micro_step, args.lm_lr, device, rank, world)
    stage.finish({"final_loss": history[-1]["loss"] if history else None, "steps": len(history)})
    return cfg, ckpt_dir


def ddp(model, device):
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def load_model_or_die(path, head=None, device="cpu"):
    try:
        return load_checkpoint(path, head=head, map_location=device).model
    except (CheckpointError, FileNotFoundError) as e:
        raise Fatal(str(e))


# -----------------------------------------------------------------------------------------
# Stage 3: reward models. π₀'s trunk + a fresh scalar head, trained on pairs with
# -log σ(r_c − r_r − m) through kernels.pairwise_margin_loss.

class PairwiseRewardLoss(torch.nn.Module):
    """Trunk + the fused gather → RMSNorm → head → loss kernel, as one module, so that DDP
    sees every parameter used. The trunk stops before its final norm: the kernel normalises
    only the R scored rows, never the other N·T positions."""

    def __init__(self, model, impl):
        super().__init__()
        self.model, self.impl = model, impl

    def forward(self, batch):
        m = self.model
        h = m.trunk(batch.input_ids, batch.attention_mask, batch.position_ids, final_norm=False)  # (N, T, D)
        return pairwise_margin_loss(h, batch.end_idx, m.head.weight[0], m.head.bias[0], batch.pairs,
                                    margin=batch.margin, pair_weight=batch.pair_weight,
                                    norm_weight=m.norm.weight, eps=m.config.norm_eps, impl=self.impl)


def rm_mixes(encoded, mode, seed, helpful_safety_share=1.0):
    """Llama 2's data mixes: {"helpful": ..., "safety": ...}, or {"reward": all} for one model.

    safety model:      all safety pairs + helpful pairs at 90/10;
    helpfulness model: all helpful pairs + helpful_safety_share × as many safety pairs
                       (1 = Llama 2's equal share; capped at the safety pairs there are).
    """
    safety = [i for i, e in enumerate(encoded) if e.is_safety]
    helpful = [i for i, e in enumerate(encoded) if not e.is_safety]
    if mode == "single" or (mode == "auto" and (not safety or not helpful)):
        return {"reward": list(range(len(encoded)))}
    if not safety or not helpful:
        raise Fatal("--rm-mode two needs both safety and helpful records (tag a file with safety=PATH)")
    g = torch.Generator().manual_seed(seed)
    pick = lambda pool, n: sorted(pool[i] for i in torch.randperm(len(pool), generator=g)[:n].tolist())
    return {"helpful": sorted(helpful + pick(safety, round(helpful_safety_share * len(helpful)))),
            "safety": sorted(safety + pick(helpful, len(safety) // 9))}


def stage_rm(args, lm_cfg, lm_dir, tok, splits, device, rank, world):
    cfg = {**lm_cfg, **{k: getattr(args, k) for k in (
        "rm_mode", "helpful_safety_share", "margin", "epochs", "batch_pairs", "micro_pairs", "rm_lr",
        "weight_decay", "warmup", "grad_clip", "center_coef", "layout", "pad_side")}}
    stage = Stage(args, "rm", cfg, rank)
    if stage.mode == "reuse":
        return cfg, stage.summary
    max_len = args.max_len or get_preset(args.preset).max_seq_len
    encoded = {}
    for split in ("train", "val", "test"):
        encoded[split], stats = encode_records(splits[split], tok, max_len, margin_mode=args.margin)
        log(f"[rm] {split}: {stats.summary()}")
    mixes = rm_mixes(encoded["train"], args.rm_mode, args.seed, args.helpful_safety_share)
    summary = {"models": {}}
    for kind, idx in mixes.items():
        summary["models"][kind] = train_one_rm(args, stage, kind, [encoded["train"][i] for i in idx],
                                               encoded, splits["test"], lm_dir, tok, max_len, device,
                                               rank, world)
    stage.finish(summary)
    return cfg, stage.summary


MIN_SCALE = 0.05     # the calibration never shrinks a reward model by more than 20x


def train_one_rm(args, stage, kind, train_enc, encoded, splits_test, lm_dir, tok, max_len, device, rank, world):
    t0 = time.time()
    # Seed here, not once per process: the fresh head's draw (and the batch order) must not depend
    # on whether π₀ was trained in this process or reused from disk, so reruns give the same model.
    torch.manual_seed(args.seed)
    ck = load_checkpoint(lm_dir, head="reward", map_location=device)
    model = ck.model
    log(f"[rm:{kind}] from π₀ ({lm_dir}); newly initialised: {ck.new_params}; "
        f"{len(train_enc)} training records, {sum(len(e.pairs) for e in train_enc)} pairs")
    loss_module = PairwiseRewardLoss(model, args.kernel)
    train_model = ddp(loss_module, device)
    mean_pairs = sum(len(e.pairs) for e in train_enc) / max(1, len(train_enc))
    per_step = max(1, round(args.batch_pairs / max(mean_pairs, 1e-9)))
    steps = plan_steps(len(train_enc), per_step, args.epochs, args.seed)
    sub = os.path.join("rm", kind)

    def micro_step(items, step_items):
        if not items:   # a rank with nothing this step still joins the all-reduce
            zero = sum(p.sum() * 0.0 for p in model.parameters())
            return zero, {"loss_sum": 0.0, "weight": 0.0, "correct": 0, "n_pairs": 0, "tokens": 0}
        batch = make_batch([train_enc[i] for i in items], layout=args.layout, pad_side=args.pad_side,
                           max_len=max_len, pad_id=tok.pad_id).to(device)
        out = train_model(batch)
        w_local = batch.pair_weight.sum()
        # Normalise by the step's global Σ pair weight (every rank knows the whole step's plan),
        # times world size because DDP averages gradients over ranks.
        w_global = sum(sum(train_enc[i].pair_weight) for i in step_items)
        loss = out.loss * w_local / w_global * world
        if args.center_coef:
            r_c, r_r = out.rewards[batch.pairs[:, 0]], out.rewards[batch.pairs[:, 1]]
            loss = loss + args.center_coef * (batch.pair_weight * (r_c + r_r) ** 2).sum() / w_global * world
        return loss, {"loss_sum": float(out.loss.detach() * w_local), "weight": float(w_local),
                      "correct": int(out.correct.sum()), "n_pairs": len(out.correct),
                      "tokens": int(batch.n_computed_tokens)}

    kind_stage = KindStage(stage, kind)
    done_path = os.path.join(kind_stage.dir, "summary.json")
    if kind_stage.mode == "resume" and os.path.exists(done_path):
        log(f"[rm:{kind}] finished before the stop; reusing it")
        with open(done_path) as f:
            return json.load(f)
    kind_stage.tokenizer, kind_stage.ckpt_meta = tok, {"stage": "rm", "kind": kind}
    history = fit(kind_stage, args, model, train_model, steps, micro_step, args.rm_lr, device, rank, world)

    # Fix the offset: the pairwise loss never sets it (b cancels), so shift the head bias until
    # the validation rewards have mean 0. Then fix the scale: divide by the temperature that makes
    # σ(R_c − R_r) calibrated on the validation pairs (model/rewards.py says why the 0.15 rule
    # needs it). Both are one affine map of the head, so rankings and accuracy do not change.
    model.eval()
    val_scores = score_records(model, encoded["val"], tok.pad_id, max_len, device)
    flat = torch.tensor([s for rec in val_scores for s in rec], dtype=torch.float64)
    shift = -float(flat.mean())
    scale = fit_temperature([row["gap"] for row in pair_outcomes(encoded["val"], val_scores)], min_scale=MIN_SCALE)
    if scale == MIN_SCALE:
        log(f"[rm:{kind}] warning: the validation pairs are ranked no better than chance; "
            f"the scale is floored at {MIN_SCALE} instead of erasing the model")
    with torch.no_grad():
        model.head.bias += shift
        model.head.weight *= scale
        model.head.bias *= scale
    val_scores = [[(s + shift) * scale for s in rec] for rec in val_scores]
    flat = (flat + shift) * scale
    val_table = accuracy_table(pair_outcomes(encoded["val"], val_scores))
    lengths = [len(ids) for e in encoded["val"] for ids in e.response_ids]
    corr = float(torch.corrcoef(torch.stack([flat, torch.tensor(lengths, dtype=torch.float64)]))[0, 1])
    test_scores = score_records(model, encoded["test"], tok.pad_id, max_len, device)
    test_table = accuracy_table(pair_outcomes(encoded["test"], test_scores))
    meta = {"stage": "rm", "kind": kind, "bias_shift": shift, "scale": scale, "val_reward_mean": 0.0,
            "val_reward_std": float(flat.std()), "val_accuracy": val_table["accuracy"]}
    if rank == 0:
        save_checkpoint(os.path.join(kind_stage.dir, "model"), model, tokenizer=tok, meta=meta)
    barrier()
    log(f"[rm:{kind}] validation accuracy {val_table['accuracy']:.3f} (ties {val_table['ties']:.3f}), "
        f"gap {val_table['mean_gap']:.3f}, corr(reward, length) {corr:+.3f}; test accuracy "
        f"{test_table['accuracy']:.3f}; bias shifted by {shift:+.4f}, then scaled by {scale:.3f} (calibration)")
    summary = {"dir": os.path.join(kind_stage.dir, "model"), "steps": len(history),
               "final_train_loss": history[-1]["loss"] if history else None,
               "val": val_table, "test": test_table, "corr_reward_length": corr,
               "length_baseline_test": length_baselines([splits_test[e.index] for e in encoded["test"]]),
               "bias_shift": shift, "scale": scale, "val_reward_std": meta["val_reward_std"],
               "seconds": round(time.time() - t0, 1)}
    if rank == 0:
        write_json(done_path, summary)
    return summary


def length_baselines(records):
    """"The longer response wins" on the same pairs, overall and on helpful / safety prompts."""
    out = {"overall": length_baseline(records)}
    for kind, want in (("helpful", False), ("safety", True)):
        subset = [r for r in records if bool(r.is_safety) == want]
        if subset:
            out[kind] = length_baseline(subset)
    return out


class KindStage:
    """One reward model's sub-folder of the rm stage, seen by fit() like a stage of its own."""

    def __init__(self, stage, kind):
        self.name, self.mode = "rm", stage.mode
        self.dir = os.path.join(stage.dir, kind)
        if self.mode == "resume" and not os.path.exists(os.path.join(self.dir, "model")):
            self.mode = "fresh"          # this model's run had not started when the stage stopped
        os.makedirs(self.dir, exist_ok=True)


# -----------------------------------------------------------------------------------------
# Stage 4: the KL-shaped PPO reward (Llama 2 eq. 1-4, InstructGPT's per-token KL penalty)
#
#     R(g | p) = R̃_c(g | p) − β · KL(π_θ(g | p) ‖ π₀(g | p)),     R̃_c = WHITEN(LOGIT(R_c))
#
# spread over tokens: every response token t gets −β·KL_t, and the last response token
# (EOS, or the last sampled token when the length limit cut it) also gets R̃_c.

class Rollouts:
    """Prompt + response token rows, right-padded, and where each response token is predicted.

    ids, mask (B, T); targets, resp_mask (B, L) for the L = longest response; pred_pos (B, L)
    is the flat index into (B·T) of the hidden state that predicts response token t, i.e. the
    position just before it. Log-probs, values and the KL all read these same positions.
    """

    def __init__(self, prompt_ids, responses, pad_id, device):
        B = len(prompt_ids)
        T = max(len(p) + len(r) for p, r in zip(prompt_ids, responses))
        L = max(1, max(len(r) for r in responses))
        self.ids = torch.full((B, T), pad_id, dtype=torch.long)
        self.mask = torch.zeros(B, T, dtype=torch.long)
        self.targets = torch.zeros(B, L, dtype=torch.long)
        self.resp_mask = torch.zeros(B, L, dtype=torch.bool)
        self.pred_pos = torch.zeros(B, L, dtype=torch.long)
        for i, (p, r) in enumerate(zip(prompt_ids, responses)):
            s = p + r
            self.ids[i, :len(s)], self.mask[i, :len(s)] = torch.tensor(s), 1
            self.targets[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            self.resp_mask[i, :len(r)] = True
            self.pred_pos[i] = i * T + len(p) - 1 + torch.arange(L).clamp(max=max(len(r) - 1, 0))
        for name in ("ids", "mask", "targets", "resp_mask", "pred_pos"):
            setattr(self, name, getattr(self, name).to(device))
        self.lengths = [len(r) for r in responses]


def rollout_logprobs(model, roll):
    """log π(a_t | p, a_<t), (B, L) fp32, 0 at padding; differentiable when grad is enabled.

    The fused kernel reads only the L predicting positions and never builds a (T, V) log-softmax.
    """
    h = model.trunk(roll.ids, attention_mask=roll.mask)                              # (B, T, D)
    h_pred = h.reshape(-1, h.shape[-1])[roll.pred_pos]                              # (B, L, D)
    return token_logprobs(h_pred, model.head.weight, roll.targets.masked_fill(~roll.resp_mask, -100))


def rollout_values(value_model, roll):
    """V(p, a_<t) at the same positions, (B, L) fp32: the scalar head on every response position."""
    h = value_model.trunk(roll.ids, attention_mask=roll.mask, final_norm=False)       # (B, T, D)
    return value_model.values(h.reshape(-1, h.shape[-1])[roll.pred_pos]) * roll.resp_mask


def response_logprobs(model, prompt_ids, responses, device, pad_id=0):
    """log π(a_t | p, a_<t) of each response token, one full forward pass over prompt + response.

    Both π_θ and π₀ go through this one function, so π_θ = π₀ gives a KL of exactly 0.
    Returns a list of (len(response),) fp32 tensors.
    """
    roll = Rollouts(prompt_ids, responses, pad_id, device)
    with torch.no_grad(), autocast(device):
        logp = rollout_logprobs(model, roll).float().cpu()
    return [logp[i, :n] for i, n in enumerate(roll.lengths)]


def kl_estimate(logp_policy, logp_ref, estimator):
    """Per-token KL(π_θ ‖ π₀) estimates from samples of π_θ (Schulman's k1, k2, k3)."""
    k1 = logp_policy - logp_ref
    if estimator == "k1":
        return k1
    if estimator == "k2":
        return 0.5 * k1 ** 2
    return torch.exp(-k1) - 1 + k1


def shaped_rewards(kl_per_token, final_reward, kl_coef):
    """Per-token rewards: −β·KL_t everywhere, plus the whitened score at the last token."""
    out = []
    for kl, r in zip(kl_per_token, final_reward):
        rew = -kl_coef * kl
        if len(rew):
            rew[-1] += r
        out.append(rew)
    return out


def score_sequences(model, seqs, pad_id, device):
    """Rewards (B,) of full token sequences, read at each one's last token."""
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    with torch.no_grad(), autocast(device):
        return model(ids.to(device), attention_mask=mask.to(device)).float().cpu()


def final_scores(args, rms, seqs, is_safety, hit_eos, pad_id, device):
    """Scores at the EOS (or the last token, flagged), then Llama 2's selection and whitening.

    Returns (raw scores per model, R_c (n,), used_safety (n,) bool, R̃ = WHITEN(R_c) (n,)).
    """
    raw = {kind: score_sequences(ck.model, seqs, pad_id, device) for kind, ck in rms.items()}
    if "safety" in raw:
        r_c, used_safety = select_reward(raw["safety"], raw["helpful"], torch.tensor(is_safety, dtype=torch.bool))
    else:
        (kind,) = raw
        r_c, used_safety = raw[kind], torch.zeros(len(seqs), dtype=torch.bool)
    r_c = r_c - args.missing_eos_penalty * (~torch.tensor(hit_eos, dtype=torch.bool)).float()
    if args.whiten == "batch":
        r_white = whiten(r_c)
    else:   # each value with the validation std of the model that produced it (mean 0 after the shift)
        std = torch.tensor([rms["safety" if u else ("helpful" if "helpful" in rms else "reward")]
                            .meta.get("val_reward_std", 1.0) for u in used_safety.tolist()])
        r_white = whiten(r_c, 0.0, std)
    return raw, r_c, used_safety, r_white


def spread(records, n):
    """n records evenly spaced over the list (all of them when n >= len). Files are loaded one
    after another, so the first n held-out records of HH-RLHF would all be harmless-base ones."""
    if n >= len(records):
        return list(records)
    return [records[i * len(records) // n] for i in range(n)]


def stage_reward(args, rm_cfg, rm_summary, lm_dir, tok, splits, has_oracle, device, rank):
    cfg = {**rm_cfg, **{k: getattr(args, k) for k in (
        "policy", "reward_prompts", "max_new_tokens", "kl_coef", "kl_estimator", "whiten",
        "missing_eos_penalty")}}
    stage = Stage(args, "reward", cfg, rank)
    if stage.mode == "reuse" or rank != 0:
        barrier()
        return cfg, stage.summary
    ref = load_model_or_die(lm_dir, device=device).eval()
    policy = load_model_or_die(args.policy or lm_dir, head="lm", device=device).eval()
    rms = {kind: load_checkpoint(m["dir"], map_location=device) for kind, m in rm_summary["models"].items()}
    max_len = args.max_len or get_preset(args.preset).max_seq_len

    # Held-out prompts, one per test record, each truncated from the start to leave room.
    records = spread(splits["test"], args.reward_prompts)
    room = max_len - args.max_new_tokens - 1
    prompt_ids = [[tok.bos_id] + tok.encode(r.prompt)[-room:] for r in records]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    samples, hit_eos = policy.generate(prompt_ids, args.max_new_tokens, temperature=1.0, top_p=1.0,
                                       eos_id=tok.eos_id, pad_id=tok.pad_id, generator=gen)
    lp_policy = response_logprobs(policy, prompt_ids, samples, device)
    lp_ref = response_logprobs(ref, prompt_ids, samples, device)
    kl = [kl_estimate(a, b, args.kl_estimator) for a, b in zip(lp_policy, lp_ref)]

    seqs = [p + s for p, s in zip(prompt_ids, samples)]
    raw, r_c, used_safety, r_white = final_scores(args, rms, seqs, [r.is_safety for r in records], hit_eos,
                                                  tok.pad_id, device)
    per_token = shaped_rewards(kl, r_white.tolist(), args.kl_coef)

    rows = []
    for i, rec in enumerate(records):
        row = {"prompt": rec.prompt, "response": tok.decode(samples[i]), "hit_eos": bool(hit_eos[i]),
               "is_safety": bool(rec.is_safety), "used_safety_rm": bool(used_safety[i]),
               **{f"R_{k}": float(v[i]) for k, v in raw.items()}, "R_c": float(r_c[i]),
               "R_white": float(r_white[i]), "kl_sum": float(kl[i].sum()),
               "reward_sum": float(per_token[i].sum()), "per_token_reward": per_token[i].tolist()}
        if has_oracle:
            row["oracle"] = builtin.oracle(rec.prompt, row["response"])
        rows.append(row)
    with open(os.path.join(stage.dir, "samples.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print_reward_table(rows[:args.show], list(raw))
    kl_sums = torch.tensor([r["kl_sum"] for r in rows])
    summary = {"n": len(rows), "kl_coef": args.kl_coef, "kl_estimator": args.kl_estimator,
               "mean_kl": float(kl_sums.mean()), "mean_R_c": float(r_c.mean()), "std_R_c": float(r_c.std()),
               "mean_reward_sum": float(torch.tensor([r["reward_sum"] for r in rows]).mean()),
               "frac_hit_eos": float(torch.tensor(hit_eos).float().mean()),
               "frac_used_safety_rm": float(used_safety.float().mean())}
    if has_oracle:
        summary["mean_oracle"] = float(torch.tensor([r["oracle"] for r in rows]).mean())
    log("[reward] " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    stage.finish(summary)
    barrier()
    return cfg, stage.summary


def print_reward_table(rows, kinds):
    cols = [f"R_{k}" for k in kinds] + ["R_c", "R_white", "kl_sum", "reward_sum"]
    log("\nKL-shaped reward for sampled responses (R = WHITEN(R_c) at the last token − β·Σ KL_t)")
    log(f"{'prompt':<34} {'response':<34} {'eos':>3} " + " ".join(f"{c:>9}" for c in cols))
    for r in rows:
        short = lambda s: (s.replace("\n", " ")[-32:]).ljust(34)
        log(f"{short(r['prompt'])} {short(r['response'])} {'y' if r['hit_eos'] else 'n':>3} "
            + " ".join(f"{r[c]:>9.3f}" for c in cols))


# -----------------------------------------------------------------------------------------
# Stage 5 (not a default): PPO on the KL-shaped reward (InstructGPT; Llama 2 §3.2.3).
#
#   rollout:  a ~ π_θ(·|p) at temperature 1, --ppo-group responses per prompt;
#             per-token reward r_t = −β·KL_t (+ R̃_c − mean of the prompt's other R̃_c, at the last token)
#   GAE:      δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   returns G_t = A_t + V_t
#   policy:   L = E[max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))],   ρ = π_θ(a_t) / π_old(a_t)
#   value:    L = ½·E[max((V − G)², (V_old + clip(V − V_old, ±ε_v) − G)²)]
#   β:        fixed, or adapted toward --kl-target (Ziegler et al. 2019): β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon)

def gae(rewards, values, mask, gamma, lam):
    """Advantages and returns, (B, L) each; positions past a response's end contribute nothing."""
    B, L = rewards.shape
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros(B)
    next_value = torch.zeros(B)
    for t in reversed(range(L)):
        m = mask[:, t].float()
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m
        next_value = values[:, t] * m
        adv[:, t] = next_adv
    return adv, adv + values


def group_baseline(scores, group):
    """Each score minus the mean of the other scores of its prompt (RLOO, Ahmadian et al. 2024).

    scores (B,) hold `group` consecutive responses per prompt. Unbiased: a response's own score
    is not in its baseline. = group/(group − 1) · (score − prompt mean).
    """
    if group < 1 or scores.numel() % group:
        raise ValueError(f"group_baseline: group must divide the {scores.numel()} scores, got {group}")
    if group == 1:
        return scores
    g = scores.view(-1, group)                                                   # (B/group, group)
    return (g - (g.sum(1, keepdim=True) - g) / (group - 1)).reshape(-1)


def masked_whiten(x, mask):
    """Whitens the real positions of x (B, L) with their own mean and std."""
    real = x[mask]
    return ((x - real.mean()) / (real.std(unbiased=False) + 1e-8)) * mask


def ppo_losses(logp, old_logp, adv, values, old_values, returns, mask, clip, vf_clip):
    """The clipped policy loss, the clipped value loss, and the fraction of clipped ratios."""
    n = mask.sum().clamp(min=1)
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    v_clipped = old_values + (values - old_values).clamp(-vf_clip, vf_clip)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    clipped = ((ratio - 1).abs() > clip).float()
    return (pg * mask).sum() / n, (vf * mask).sum() / n, (clipped * mask).sum() / n


class KLController:
    """Fixed β, or Ziegler et al.'s proportional controller toward a target KL (nats per sample)."""

    def __init__(self, beta, target=0.0, horizon=10000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n_samples):
        if self.target > 0:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + error * n_samples / self.horizon


def oracle_scores(prompts, samples):
    """The built-in oracle's score of every sample; samples[i] is the list of texts for prompts[i]."""
    return [[builtin.oracle(p, t) for t in group] for p, group in zip(prompts, samples)]


def oracle_win_rate(prompts, responses, baseline):
    """P(the oracle prefers a π_θ response to a π₀ response for the same prompt), ties = ½.

    responses[i], baseline[i]: lists of samples for prompts[i]. See win_rate."""
    return win_rate(oracle_scores(prompts, responses), oracle_scores(prompts, baseline))


def win_rate(scores, baseline_scores):
    """Win-rate of scores[i] over baseline_scores[i] (lists of scores per prompt), ties = ½.

    Every π_θ sample meets every π₀ sample of its prompt (n×m comparisons, a lower-variance
    estimate than one pair each). Returns (win-rate, half-width of its 95% CI): prompts are the
    independent units, so the standard error is the spread of the per-prompt win-rates over
    √(number of prompts).
    """
    per_prompt = [sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b) / (len(a) * len(b))
                  for a, b in zip(scores, baseline_scores)]
    rates = torch.tensor(per_prompt, dtype=torch.float64)
    half = 1.96 * float(rates.std()) / math.sqrt(len(rates)) if len(rates) > 1 else float("nan")
    return float(rates.mean()), half


def value_model_init(value_init, rms, lm_dir, device):
    """The value model: a trunk with the scalar head read at every response position.

    "rm": a copy of the helpfulness (or only) reward model of `rms` ({kind: Checkpoint}), as
    InstructGPT and OpenRLHF do, with its head
    divided by the RM's validation std: the RM speaks raw reward units (std ~4-6 here) and the
    returns are whitened scores (std ~1), so V starts in the returns' units instead of a value
    loss ~20× too large. "lm": π₀'s trunk with a fresh head (V ≈ 0).
    """
    if value_init == "lm":
        return load_model_or_die(lm_dir, head="reward", device=device)
    ck = rms["helpful" if "helpful" in rms else next(iter(rms))]
    value_model = copy.deepcopy(ck.model).to(device).train()     # trained; the RM itself stays as it is
    std = ck.meta.get("val_reward_std", 1.0)
    with torch.no_grad():
        value_model.head.weight /= std
        value_model.head.bias /= std
    return value_model


def stage_ppo(args, reward_cfg, rm_summary, lm_dir, tok, splits, has_oracle, device, rank):
    cfg = {**reward_cfg, **{k: getattr(args, k) for k in (
        "ppo_iters", "ppo_batch", "ppo_group", "ppo_epochs", "ppo_minibatch", "ppo_lr", "value_lr", "clip", "vf_clip",
        "gamma", "lam", "ppo_kl_coef", "kl_target", "kl_horizon", "value_init", "ppo_eval_prompts", "ppo_eval_samples")}}
    stage = Stage(args, "ppo", cfg, rank)
    if stage.mode == "reuse" or rank != 0:
        barrier()
        return stage.summary
    torch.manual_seed(args.seed)
    ref = load_model_or_die(lm_dir, device=device).eval()
    policy = load_model_or_die(lm_dir, device=device)
    rms = {kind: load_checkpoint(m["dir"], map_location=device) for kind, m in rm_summary["models"].items()}
    for ck in rms.values():
        ck.model.eval()
    value_model = value_model_init(args.value_init, rms, lm_dir, device)
    opt_policy = make_optimizer(policy, args.ppo_lr, 0.0)
    opt_value = make_optimizer(value_model, args.value_lr, 0.0)
    kl_ctl = KLController(args.ppo_kl_coef, args.kl_target, args.kl_horizon)
    max_len = args.max_len or get_preset(args.preset).max_seq_len
    room = max_len - args.max_new_tokens - 1
    encode_prompt = lambda text: [tok.bos_id] + tok.encode(text)[-room:]
    train_recs, eval_recs = splits["train"], spread(splits["test"], args.ppo_eval_prompts)
    n_eval = args.ppo_eval_samples
    eval_recs_rep = [r for r in eval_recs for _ in range(n_eval)]     # a prompt's samples adjacent
    eval_prompts = [encode_prompt(r.prompt) for r in eval_recs_rep]
    per_prompt = lambda xs: [xs[i:i + n_eval] for i in range(0, len(xs), n_eval)]
    gen = torch.Generator().manual_seed(args.seed)

    def sample(model, prompt_ids, seed=None):
        g = torch.Generator().manual_seed(seed) if seed is not None else gen
        model.eval()
        out = model.generate(prompt_ids, args.max_new_tokens, temperature=1.0, top_p=1.0,
                             eos_id=tok.eos_id, pad_id=tok.pad_id, generator=g)
        model.train()
        return out

    def evaluate(it):
        """Proxy (reward model), oracle and KL on the held-out prompts, from fresh samples."""
        samples, hit = sample(policy, eval_prompts, seed=args.seed + 1)
        seqs = [p + s for p, s in zip(eval_prompts, samples)]
        _, r_c, _, _ = final_scores(args, rms, seqs, [r.is_safety for r in eval_recs_rep], hit, tok.pad_id, device)
        roll = Rollouts(eval_prompts, samples, tok.pad_id, device)
        with torch.no_grad():
            kl = ((rollout_logprobs(policy, roll) - rollout_logprobs(ref, roll)) * roll.resp_mask).sum(-1)
        row = {"iter": it, "eval_proxy": float(r_c.mean()), "eval_kl": float(kl.mean())}
        if has_oracle:
            scores = judge(samples)
            flat = [x for group in scores for x in group]
            row["eval_oracle"] = sum(flat) / len(flat)
            row["win_rate_vs_pi0"], row["win_rate_ci95"] = win_rate(scores, baseline_scores)
        return row

    judge = lambda samples: oracle_scores([r.prompt for r in eval_recs], per_prompt([tok.decode(s) for s in samples]))
    base_samples, _ = sample(ref, eval_prompts, seed=args.seed + 2)
    baseline_scores = judge(base_samples) if has_oracle else None      # π₀'s samples: judged once
    history = [evaluate(0)]
    log(f"[ppo] iter 0: " + ", ".join(f"{k} {v:.3f}" for k, v in history[0].items() if k != "iter"))
    metrics_path = os.path.join(stage.dir, "metrics.jsonl")
    for it in range(1, args.ppo_iters + 1):
        # 1. Rollouts from the current policy, on training prompts.
        idx = torch.randint(len(train_recs), (args.ppo_batch // args.ppo_group,), generator=gen).tolist()
        recs = [train_recs[i] for i in idx for _ in range(args.ppo_group)]     # a prompt's responses adjacent
        prompt_ids = [encode_prompt(r.prompt) for r in recs]
        samples, hit = sample(policy, prompt_ids)
        samples = [s if s else [tok.eos_id] for s in samples]
        roll = Rollouts(prompt_ids, samples, tok.pad_id, device)
        with torch.no_grad():
            old_logp = rollout_logprobs(policy, roll)
            ref_logp = rollout_logprobs(ref, roll)
            old_values = rollout_values(value_model, roll)
        # 2. The KL-shaped reward of the `reward` stage, per token.
        seqs = [p + s for p, s in zip(prompt_ids, samples)]
        _, r_c, _, r_white = final_scores(args, rms, seqs, [r.is_safety for r in recs], hit, tok.pad_id, device)
        kl = kl_estimate(old_logp, ref_logp, args.kl_estimator) * roll.resp_mask            # (B, L)
        rewards = -kl_ctl.beta * kl
        last = torch.tensor(roll.lengths) - 1
        rewards[torch.arange(len(samples)), last] += group_baseline(r_white, args.ppo_group)
        # 3. Advantages (GAE), whitened over the batch's real tokens.
        adv, returns = gae(rewards, old_values, roll.resp_mask, args.gamma, args.lam)
        adv = masked_whiten(adv, roll.resp_mask)
        # 4. Several epochs of clipped updates over minibatches.
        stats = []
        for _ in range(args.ppo_epochs):
            for mb in torch.randperm(len(samples), generator=gen).split(args.ppo_minibatch):
                sub = Rollouts([prompt_ids[i] for i in mb], [samples[i] for i in mb], tok.pad_id, device)
                L = sub.targets.shape[1]
                logp = rollout_logprobs(policy, sub)
                values = rollout_values(value_model, sub)
                pg_loss, vf_loss, clip_frac = ppo_losses(
                    logp, old_logp[mb, :L], adv[mb, :L], values, old_values[mb, :L], returns[mb, :L],
                    sub.resp_mask, args.clip, args.vf_clip)
                opt_policy.zero_grad(set_to_none=True)
                opt_value.zero_grad(set_to_none=True)
                (pg_loss + vf_loss).backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
                torch.nn.utils.clip_grad_norm_(value_model.parameters(), args.grad_clip)
                opt_policy.step()
                opt_value.step()
                stats.append((pg_loss.item(), vf_loss.item(), clip_frac.item()))
        mean_kl = float(kl.sum(-1).mean())
        kl_ctl.update(mean_kl, len(samples))
        if not math.isfinite(stats[-1][0] + stats[-1][1]):
            raise Fatal(f"stage ppo: loss is not finite at iteration {it}; stopped")
        row = {"iter": it, "score": float(r_c.mean()), "kl": mean_kl, "beta": kl_ctl.beta,
               "pg_loss": sum(s[0] for s in stats) / len(stats), "value_loss": sum(s[1] for s in stats) / len(stats),
               "clip_frac": sum(s[2] for s in stats) / len(stats)}
        if it % args.ppo_eval_every == 0 or it == args.ppo_iters:
            row.update(evaluate(it))
        history.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        log(f"[ppo] iter {it}/{args.ppo_iters} score {row['score']:+.3f} kl {row['kl']:.3f} β {row['beta']:.4f} "
            f"clip {row['clip_frac']:.3f} vloss {row['value_loss']:.4f}"
            + (f" | held-out: proxy {row['eval_proxy']:+.3f} kl {row['eval_kl']:.3f}" if "eval_proxy" in row else "")
            + (f" oracle {row['eval_oracle']:.3f} win-rate {row['win_rate_vs_pi0']:.3f} ± {row['win_rate_ci95']:.3f}"
               if "win_rate_vs_pi0" in row else ""))
    save_checkpoint(os.path.join(stage.dir, "policy"), policy, tokenizer=tok, meta={"stage": "ppo"})
    evals = [h for h in history if "eval_proxy" in h]
    plot_ppo(evals, stage.dir)
    summary = {"iters": args.ppo_iters, "final": evals[-1], "start": evals[0],
               "judge": "oracle" if has_oracle else "reward model (no oracle for real data)"}
    stage.finish(summary)
    barrier()
    return stage.summary


def plot_ppo(evals, out_dir):
    """Proxy (reward model) and oracle score against KL: the over-optimisation gap (Gao et al. 2022).

    The two scores have different units (raw RM logits, oracle in [0, 1]), so each has its own axis.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    kl = [e["eval_kl"] for e in evals]
    axes[0].plot(kl, [e["eval_proxy"] for e in evals], "o-", color="C0", label="proxy (RM)")
    axes[0].set(xlabel="KL(π_θ ‖ π₀) per sample (nats)", ylabel="proxy: mean RM score")
    axes[0].yaxis.label.set_color("C0")
    if "eval_oracle" in evals[0]:
        oracle_ax = axes[0].twinx()
        oracle_ax.plot(kl, [e["eval_oracle"] for e in evals], "s-", color="C1", label="oracle")
        oracle_ax.set_ylabel("oracle: mean true score", color="C1")
        oracle_ax.set_ylim(0, 1)                 # fixed [0, 1] scales, so runs compare at a glance
        axes[1].errorbar([e["iter"] for e in evals], [e["win_rate_vs_pi0"] for e in evals],
                         yerr=[e.get("win_rate_ci95", 0.0) for e in evals], fmt="o-", capsize=2)   # 95% CI
        axes[1].axhline(0.5, color="gray", lw=0.5)
        axes[1].set(xlabel="PPO iteration", ylabel="oracle win-rate vs π₀", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "ppo.png"), dpi=90)
    plt.close(fig)


# -----------------------------------------------------------------------------------------
# The report: printed, and report.json for other tools.

RATING_COLUMNS = ("significantly better", "better", "slightly better", "negligibly better", "unsure")


def print_report(report):
    rm = report.get("rm", {}).get("detail")
    if rm:
        log("\nReward models on held-out test pairs (accuracy; ties counted separately)")
        log("Per rating, as Llama 2's Table 8:")
        log(f"{'model':<9} {'n':>5} {'overall':>8} {'ties':>6} " + " ".join(f"{c[:12]:>12}" for c in RATING_COLUMNS)
            + f" {'helpful':>8} {'safety':>8} {'len-base':>8}")
        for m in rm["models"].values():     # rm stages written before the per-kind baseline hold one number
            if not isinstance(m["length_baseline_test"], dict):
                m["length_baseline_test"] = {"overall": m["length_baseline_test"]}
        for kind, m in rm["models"].items():
            t = m["test"]
            cell = lambda d, k: f"{d[k]['accuracy']:.3f}" if k in d else "-"
            log(f"{kind:<9} {t['n']:>5} {t['accuracy']:>8.3f} {t['ties']:>6.3f} "
                + " ".join(f"{cell(t['per_rating'], c):>12}" for c in RATING_COLUMNS)
                + f" {cell(t['by_kind'], 'helpful'):>8} {cell(t['by_kind'], 'safety'):>8}"
                + f" {m['length_baseline_test']['overall']:>8.3f}")
        for kind, m in rm["models"].items():
            t, lb = m["test"], m["length_baseline_test"]
            log(f"{kind:<9} 95% CI {t['ci95'][0]:.3f}-{t['ci95'][1]:.3f}; length baseline on the same pairs: "
                + ", ".join(f"{k} {v:.3f}" for k, v in lb.items()))
        cats = sorted({c for m in rm["models"].values() for c in m["test"]["per_category"]})
        if cats:
            log("Per category:")
            log(f"{'model':<9} " + " ".join(f"{c[:10]:>10}" for c in cats))
            for kind, m in rm["models"].items():
                pc = m["test"]["per_category"]
                log(f"{kind:<9} " + " ".join(f"{pc[c]['accuracy']:>10.3f}" if c in pc else f"{'-':>10}" for c in cats))
    if report.get("reward"):
        r = report["reward"]
        log(f"\nKL-shaped reward over {r['n']} samples: mean KL {r['mean_kl']:.4f} (β = {r['kl_coef']}), "
            f"mean R_c {r['mean_R_c']:.3f}, mean Σ reward {r['mean_reward_sum']:.3f}, "
            f"EOS hit {r['frac_hit_eos']:.2f}, safety RM used {r['frac_used_safety_rm']:.2f}")
    log("Stage wall time (s): " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()))


def stage_seconds(out, name, default):
    try:
        with open(os.path.join(out, name, "stage.json")) as f:
            return json.load(f)["summary"]["seconds"]
    except (OSError, KeyError, ValueError):
        return default


def report_json(rm_summary, reward_summary, seconds):
    out = {"seconds": seconds}
    if rm_summary:
        out["rm"] = {"models": {kind: {
            "test_accuracy": m["test"]["accuracy"], "test_ties": m["test"]["ties"], "test_n": m["test"]["n"],
            "test_ci95": m["test"]["ci95"],
            "per_rating": {k: v["accuracy"] for k, v in m["test"]["per_rating"].items()},
            "per_category": {k: v["accuracy"] for k, v in m["test"]["per_category"].items()},
            "by_kind": {k: v["accuracy"] for k, v in m["test"]["by_kind"].items()},
            "length_baseline_test": m["length_baseline_test"], "val_accuracy": m["val"]["accuracy"],
            "corr_reward_length": m["corr_reward_length"], "bias_shift": m["bias_shift"],
            "val_reward_std": m["val_reward_std"], "dir": m["dir"],
        } for kind, m in rm_summary["models"].items()}, "detail": rm_summary}
    if reward_summary:
        out["reward"] = reward_summary
    return out


# -----------------------------------------------------------------------------------------
# main: the stages in order.

def run(args, rank, world, device):
    t_all = time.time()
    os.makedirs(args.out, exist_ok=True)
    splits, has_oracle, lines = load_data(args)
    if args.demo_refusals is None:
        args.demo_refusals = 0.3 if has_oracle else 0.0
    elif args.demo_refusals and not has_oracle:
        raise Fatal("--demo-refusals needs the built-in world (it rewrites built-in demonstrations)")
    for line in lines:
        log(line)
    log(f"device {device}, {world} process(es), {torch.get_num_threads()} threads/process; splits "
        + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + " (prompt-disjoint, by sha256 of the prompt)")
    seconds, rm_summary, reward_summary = {}, None, None
    stages = [s for s in STAGES if s in args.stages]
    need = lambda s: s in stages or any(STAGES.index(t) > STAGES.index(s) for t in stages)

    t = time.time()
    tok_cfg, tok = stage_tokenizer(args, splits, rank)
    seconds["tokenizer"] = round(time.time() - t, 1)
    if need("lm"):
        t = time.time()
        lm_cfg, lm_dir = stage_lm(args, tok_cfg, tok, splits, device, rank, world)
        seconds["lm"] = round(time.time() - t, 1)
    if need("rm"):
        t = time.time()
        rm_cfg, rm_summary = stage_rm(args, lm_cfg, lm_dir, tok, splits, device, rank, world)
        seconds["rm"] = round(time.time() - t, 1)
    if "reward" in stages or "ppo" in stages:
        t = time.time()
        reward_cfg, reward_summary = stage_reward(args, rm_cfg, rm_summary, lm_dir, tok, splits, has_oracle, device, rank)
        seconds["reward"] = round(time.time() - t, 1)
    if "ppo" in stages:
        t = time.time()
        ppo_summary = stage_ppo(args, reward_cfg, rm_summary, lm_dir, tok, splits, has_oracle, device, rank)
        seconds["ppo"] = round(time.time() - t, 1)
    for name in list(seconds):          # a reused stage reports the time it took when it ran
        seconds[name] = stage_seconds(args.out, name, seconds[name])
    seconds["total"] = round(time.time() - t_all, 1)
    report = report_json(rm_summary, reward_summary, seconds)
    if "ppo" in stages:
        report["ppo"] = ppo_summary
    if rank == 0:
        write_json(os.path.join(args.out, "report.json"), report)
        print_report(report)
        log(f"report: {os.path.join(args.out, 'report.json')}")


def main(argv=None):
    args = parse_args(argv)
    try:
        rank, world, device = setup(args)
        run(args, rank, world, device)
    except Fatal as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, DataError) as e:      # bad input: one line, never a traceback
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
