"""
rmlab train.py: from nothing to PPO on Llama 2's KL-shaped reward, in one file, top to bottom.

    tokenizer ─> lm (π₀) ─> rm: swap head → helpfulness RM, safety RM (offset and scale fixed on validation)
                         └─> reward: sample, log-probs under π_θ and π₀ → per-token −β·KL_t, R̃_c at the end
                              └─> ppo: rollouts, that same reward, GAE, clipped updates, win-rate over π₀

    python train.py                                        # the built-in world, CPU, about 5 minutes
    torchrun --nproc_per_node=2 train.py                   # the same, data-parallel
    torchrun --nproc_per_node=8 train.py --fsdp --preset small   # one FSDP unit per block

Each stage writes its own folder under --out (data/runs.py): a finished stage with the same
inputs (its argparse group, every earlier stage's group, the data files' sha256) is reused;
anything else says why in one line and points to --resume or --redo.
"""
import json
import logging
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from data import DataError, builtin, encode_records, make_batch, split_records
from data.chat import ChatTemplateError, chat_format_of
from data.encode import fit_max_len, sampling_prompt
from data.batch import Rollouts, micro_batches, plan_batches
from data.cli import (DefaultsHelpFormatter, OneLineParser, comma_choices, data_files, device_flag,
                      fraction, seed_int, nonnegative_float, nonnegative_int, positive_float, positive_int,
                      kernel_flag, prompts_per_process, split_fractions, thread_count, vocab_size_flag)
from data.evaluate import MIN_SCALE, calibrate_and_evaluate, win_rate, win_rate_terms
from data.features import cache_features, check_train_layers, freeze_lower
from data.report import plot, print_report, print_reward_table
from data.runs import (Fatal, finish_stage, keep_metrics, open_stage, read_data_files, read_json,
                       stage_inputs, write_json, write_metrics)
from data.split import rm_mixes, spread
from model import Llama, Tokenizer, get_preset, PRESETS, read_tokenizer
from model.checkpoint import CheckpointError, has_checkpoint, load_checkpoint, pretrained_tokenizer
from model.optim import make_optimizer, set_lr
from model.precision import DTYPES, autocast, resolve_dtype
from model.formats import save_tokenizer
from model.parallel import (all_gather, all_sum, barrier, global_mean_std, init_processes, restore_training,
                            save_model, training_state, whole, wrap)
from model.ppo import (PolicyAndValue, final_scores, gae, group_baseline, kl_shaped_reward, masked_whiten,
                       ppo_losses, ppo_state, restore_ppo, rollout_logprobs, sample, value_model_init)
from model.rewards import PairwiseRewardLoss

STAGES = ("tokenizer", "lm", "rm", "reward", "ppo")
AUTO_LEN_CAP = 1024               # --max-len 0: at most 1,024 tokens (quadratic attention, memory)
STEPS_PER_EPOCH = 150             # --batch-pairs 0 sizes the batch for about this many steps an epoch
log = logging.getLogger("rmlab.train").info


# -----------------------------------------------------------------------------------------
# Flags: one group per stage (that stage's inputs), `data` (an input of every stage) and
# `run` (how to run, never what is computed: a run flag never makes a finished stage stale).

def build_parser():
    p = OneLineParser(prog="train.py", formatter_class=DefaultsHelpFormatter,
                      description="π₀, helpfulness and safety reward models, PPO on the KL-shaped reward.",
                      epilog="exit codes: 0 done; 2 bad input (a flag, a data file, a checkpoint: one line "
                      "on stderr, before any work); 1 any other stop (NaN, Ctrl-C), resumable with --resume")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/default", help="run directory; each stage writes a sub-folder")
    g.add_argument("--stages", type=comma_choices(STAGES, what="stage "), default=None,
                   help=f"comma list of {','.join(STAGES)} (default: all; with --init-from: rm,reward, "
                   "and lm only when named)")
    g.add_argument("--redo", type=comma_choices(STAGES, empty_ok=True, what="stage "), default="",
                   help="stages to run again from scratch, and every later one")
    g.add_argument("--resume", action="store_true", help="continue unfinished stages from their checkpoints")
    # --device, --dtype and --compile are not inputs: they change the rounding only (CPU and CUDA
    # differ by rounding and bf16 autocast), so a π₀ made on a CPU serves a GPU run.
    g.add_argument("--device", type=device_flag, default="auto",
                   help="auto (CUDA if present, else CPU), cpu or cuda")
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bf16 autocast on CUDA and on "
                   "AMX CPUs for models 512 wide or more, else fp32; the loss, norms and softmax stay fp32")
    g.add_argument("--compile", action="store_true", help="rm stage: torch.compile each block (README)")
    g.add_argument("--accept-drops", action="store_true", help="train even when --max-len drops more "
                   "than 20%% of the pairs for length (above 5%% a run warns)")
    g.add_argument("--fsdp", action="store_true", help="lm and rm stages: FSDP2, one unit per block, not DDP")
    g.add_argument("--kernel", type=kernel_flag, default="auto",
                   help="pairwise loss: auto (Triton on CUDA, else the PyTorch reference), triton, reference")
    g.add_argument("--threads", type=thread_count, default=0, help="CPU threads per process (0: "
                   "OMP_NUM_THREADS, else cores / processes; on a busy machine 1 is often much faster)")
    g.add_argument("--max-minutes", type=nonnegative_float, default=0.0, help="stop π₀'s, each RM's and "
                   "PPO's training after N minutes, resumable and not finished (0 = no limit)")
    g.add_argument("--max-steps", type=nonnegative_int, default=0,
                   help="the same after N steps (PPO: iterations)")
    g.add_argument("--save-every", type=nonnegative_int, default=0,
                   help="checkpoint every N steps or PPO iterations (0 = every 2 minutes)")
    g.add_argument("--stop-at-step", type=nonnegative_int, default=0,
                   help="stop as if interrupted after step N")
    g.add_argument("--log-every", type=positive_int, default=20, help="one log line every N optimizer steps")
    g.add_argument("--show", type=nonnegative_int, default=6, help="samples printed in the reward tables")
    g = p.add_argument_group("data")
    g.add_argument("--data", type=data_files, default="",
                   help="comma list of preference files (JSONL, JSONL.gz, JSON); "
                   "safety=PATH or helpful=PATH marks its prompts; empty: the built-in world and its oracle")
    g.add_argument("--skip-bad", action="store_true", help="count and skip malformed lines")
    g.add_argument("--builtin-prompts", type=positive_int, default=4000, help="prompts in the built-in world")
    g.add_argument("--builtin-rejections", type=int, default=4, choices=(1, 2, 3, 4),
                   help="rejected responses per built-in helpful prompt, of distinct grades")
    g.add_argument("--split", type=split_fractions, default="0.9,0.05,0.05",
                   help="train,val,test fractions of --data files, by prompt sha256 (built-in: 80/10/10)")
    g.add_argument("--seed", type=seed_int, default=1337, help="seeds the world, plans, heads and samples")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", default="", help="a tokenizer.json or SentencePiece .model to use instead "
                   "of training one; with --init-from, only for a checkpoint that carries none rmlab reads")
    g.add_argument("--vocab-size", type=vocab_size_flag, default=0,
                   help="pieces of the tokenizer (0: the preset's)")
    g.add_argument("--preset", default="default", choices=sorted(PRESETS), help="model shape")
    g = p.add_argument_group("lm")
    g.add_argument("--init-from", default="", help="π₀ from a pretrained checkpoint (ours, HF or Meta dir, "
                   "or .gguf) and its own tokenizer: the tokenizer stage never runs, lm only when named")
    g.add_argument("--lm-steps", type=nonnegative_int, default=None, help="optimizer steps of π₀ (default: "
                   "1000 in the built-in world, whose small grammar takes many passes; 0 with --data: one "
                   "pass over the demonstrations, as a second over a few thousand human texts memorises)")
    # --max-len is here, not in `data`: the tokenizer does not depend on it, π₀ is the first that does
    g.add_argument("--max-len", type=nonnegative_int, default=0, help="tokens per sequence, longer prompts "
                   "lose their start (0: with --data, the smallest keeping 98%% of the sequences whole, at "
                   f"most {AUTO_LEN_CAP} and the checkpoint's context, at least --max-new-tokens + 8; "
                   "built-in world: the preset's)")
    g.add_argument("--lm-batch", type=positive_int, default=32, help="sequences per optimizer step")
    g.add_argument("--lm-lr", type=positive_float, default=None, help="peak learning rate (default: 3e-3 "
                   "from scratch; 2e-5 with --init-from, Llama 2's SFT rate for a pretrained model)")
    # AdamW settings of every trained stage, in this group because π₀ is the first to use them
    g.add_argument("--weight-decay", type=nonnegative_float, default=0.1,
                   help="AdamW weight decay (lm and rm)")
    g.add_argument("--warmup", type=fraction(0.5), default=0.03,
                   help="warm-up fraction of the steps, ≥ 5 (lm, rm)")
    g.add_argument("--grad-clip", type=nonnegative_float, default=1.0,
                   help="max gradient norm, 0: none (lm, rm, ppo)")
    g.add_argument("--demo-refusals", type=float, default=None, help="share of helpful demonstrations "
                   "replaced by a needless refusal (built-in world: 0.3, files: 0)")
    g = p.add_argument_group("rm")
    g.add_argument("--rm-mode", choices=("auto", "single", "two"), default="auto",
                   help="two: helpfulness and safety models (auto: when the data has safety labels)")
    g.add_argument("--margin", choices=("auto", "none", "small", "large", "field"), default="auto",
                   help="auto: a record's margin field, else its rating in Llama 2's small table, else 0")
    g.add_argument("--helpful-safety-share", type=nonnegative_float, default=None, help="safety pairs in "
                   "the helpfulness model's mix per helpful pair (default: Llama 2's equal share, 1, in "
                   "the built-in world; 0 with --data, unlike Llama 2: in data like HH-RLHF a safety pair "
                   "prefers the harmless answer even when it helps less, teaching helpfulness the opposite)")
    g.add_argument("--epochs", type=positive_float, default=None, help="passes over each model's pairs; "
                   "below 1, a seeded share of them, the only ones --train-layers caches (default: 1 with "
                   "--data or --init-from, as Llama 2: longer over-fits; 3 built-in)")
    g.add_argument("--batch-pairs", type=nonnegative_int, default=0, help="pairs per optimizer step, whole "
                   f"prompts (0: the power of two nearest pairs / {STEPS_PER_EPOCH}, in [8, 64]: an epoch "
                   f"is about {STEPS_PER_EPOCH} steps, fewer under {8 * STEPS_PER_EPOCH} pairs)")
    g.add_argument("--micro-pairs", type=positive_int, default=64, help="pairs per forward pass, accumulated")
    g.add_argument("--rm-lr", type=positive_float, default=None, help="peak learning rate (default: from "
                   "scratch 1e-3 per 64 pairs a step, linear in --batch-pairs, as Goyal et al. scale it; "
                   "--init-from: 1e-5 as Llama 2 fine-tunes; 5e-4 with --train-layers, best on HH)")
    g.add_argument("--layout", choices=("packed", "padded"), default="packed", help="training batches "
                   "(evaluation packs): packed computes a prompt once, its responses follow it in the row")
    g.add_argument("--pad-side", choices=("right", "left"), default="right", help="padded layout's side")
    g.add_argument("--train-layers", type=nonnegative_int, default=0, help="train only the top k blocks, "
                   "the final norm and the head; the frozen blocks' outputs are cached in OUT/cache (0: all)")
    g = p.add_argument_group("reward")
    g.add_argument("--policy", default="", help="π_θ of the reward table (default: π₀, so the KL is 0)")
    g.add_argument("--reward-prompts", type=prompts_per_process, default=64,
                   help="held-out prompts of the reward table")
    g.add_argument("--max-new-tokens", type=positive_int, default=48, help="tokens sampled per response")
    g.add_argument("--kl-coef", type=nonnegative_float, default=0.01, help="β of the reward table (Llama 2)")
    g.add_argument("--kl-estimator", choices=("k1", "k2", "k3"), default="k1", help="per-token KL: "
                   "k1 = log π_θ − log π₀ (the right policy gradient), k2 = ½k1², k3 = e^−k1 − 1 + k1")
    g = p.add_argument_group("ppo")
    g.add_argument("--ppo-iters", type=positive_int, default=30, help="rollout + update iterations")
    g.add_argument("--ppo-batch", type=positive_int, default=64, help="responses sampled per iteration")
    g.add_argument("--ppo-group", type=positive_int, default=4, help="responses per prompt; the baseline of "
                   "each is the mean score of the others (RLOO)")
    g.add_argument("--ppo-epochs", type=positive_int, default=2, help="passes over each rollout")
    g.add_argument("--ppo-minibatch", type=positive_int, default=32, help="responses per update")
    g.add_argument("--ppo-lr", type=positive_float, default=1e-4, help="policy learning rate")
    g.add_argument("--value-lr", type=positive_float, default=1e-4, help="value model learning rate")
    g.add_argument("--clip", type=positive_float, default=0.2, help="PPO ratio clip ε")
    g.add_argument("--vf-clip", type=positive_float, default=0.2, help="value clip")
    g.add_argument("--gamma", type=fraction(), default=1.0, help="GAE discount γ")
    g.add_argument("--lam", type=fraction(), default=0.95, help="GAE λ")
    g.add_argument("--ppo-kl-coef", type=nonnegative_float, default=0.1, help="β of PPO's reward")
    g.add_argument("--ppo-eval-prompts", type=prompts_per_process, default=400,
                   help="held-out prompts of the win-rate")
    g.add_argument("--ppo-eval-every", type=nonnegative_int, default=0,
                   help="evaluate every N (0: first, last)")
    g.add_argument("--ppo-eval-samples", type=positive_int, default=2,
                   help="samples per held-out prompt and policy")
    return p


def parse_args(argv=None):
    """Flags with their final values: a default that depends on another flag is set here."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.stages is None:
        args.stages = ["rm", "reward"] if args.init_from else list(STAGES)
    for flag in ("init_from", "tokenizer", "policy"):
        if getattr(args, flag) and not os.path.exists(getattr(args, flag)):
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: no such file or directory")
    if args.init_from and "tokenizer" in args.stages + args.redo:
        p.error("--init-from: the checkpoint's tokenizer is used, so the tokenizer stage never runs; "
                "drop it from --stages/--redo")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"argument --out: {args.out} is a file, not a directory")
    if args.train_layers and (args.fsdp or args.layout != "packed"):
        p.error("--train-layers caches the packed layout, with DDP or one process: drop --fsdp, --layout")
    if args.compile and args.fsdp:
        p.error("--compile is not supported with --fsdp yet (FSDP hooks in compiled blocks are untested)")
    if args.ppo_batch % args.ppo_group:
        p.error(f"--ppo-batch ({args.ppo_batch}) must be a multiple of --ppo-group ({args.ppo_group})")
    files, pretrained = bool(args.data), bool(args.init_from)
    for flag, value in dict(lm_steps=0 if files else 1000, helpful_safety_share=0.0 if files else 1.0,
                            epochs=1.0 if files or pretrained else 3.0, demo_refusals=0.0 if files else 0.3,
                            lm_lr=2e-5 if pretrained else 3e-3,
                            rm_lr=(5e-4 if args.train_layers else 1e-5) if pretrained else 0.0).items():
        if getattr(args, flag) is None:          # unset: the default for this data and model (see --help)
            setattr(args, flag, value)
    if not 0.0 <= args.demo_refusals <= 1.0 or (args.demo_refusals and args.data):
        p.error("--demo-refusals must be in [0, 1], and 0 with --data (it rewrites built-in demonstrations)")
    args.out = os.path.abspath(args.out)      # report.json and the logs name absolute paths
    args.max_len = args.max_len or (0 if files else get_preset(args.preset).max_seq_len)   # 0: in run()
    args.vocab_size = args.vocab_size or get_preset(args.preset).vocab_size
    sampling = max(STAGES.index(s) for s in args.stages) >= STAGES.index("reward")
    if args.max_len and (args.max_len < 8 or (sampling and args.max_len < args.max_new_tokens + 8)):
        need = (f" of --max-new-tokens {args.max_new_tokens} (need >= {args.max_new_tokens + 8})" if sampling
                else " (need >= 8)")
        p.error(f"argument --max-len: {args.max_len} leaves no room for a prompt and a response{need}")
    return p, args


# -----------------------------------------------------------------------------------------
# Setup: processes, device, threads, Ctrl-C.

def setup(args):
    rank, world, device = init_processes(args.device, args.threads)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, format="%(message)s",
                        stream=sys.stdout, force=True)
    signal.signal(signal.SIGINT, on_sigint)
    return rank, world, device


# The first Ctrl-C sets STOP, read between optimizer steps (never inside one) and after a stage's
# evaluation: the loops save and stop with one line. A second Ctrl-C stops at once (saves are atomic).
STOP = []


def on_sigint(signum, frame):
    if STOP:
        raise KeyboardInterrupt
    STOP.append(signum)


def check_stop(where):
    if STOP:
        raise Fatal(f"interrupted during {where}; run again with --resume to continue")


# -----------------------------------------------------------------------------------------
# The loop: one fit() for every trained stage; what differs per stage is passed in.
# The recipe (model/optim.py): AdamW as Llama 2, linear warm-up, cosine decay to 10%.

def fit(name, folder, model, train_model, plan, sizes, weights, micro_step, peak_lr, micro, args, ctx, resume,
        tok, meta):
    """Trains over `plan` (global batches of item indices); returns (metrics rows, cut_short).

    sizes[i]: item i's units for sharding and micro-batches of about `micro` units (its pairs, or
    1 per sequence); weights[i]: its part of a batch's loss denominator (Σ pair weight, or target
    tokens). micro_step(items) -> (the items' summed loss, summable metrics: loss_sum, weight,
    tokens, maybe correct and n_pairs). Checkpoints (folder/ckpt, with `tok` and `meta`) every
    --save-every steps or 2 minutes, at a stop, and at the end.
    """
    rank, world, device = ctx
    ckpt, metrics_path = os.path.join(folder, "ckpt"), os.path.join(folder, "metrics.jsonl")
    opt, start = make_optimizer(model, peak_lr, args.weight_decay), 0
    if resume and has_checkpoint(ckpt):
        start = restore_training(load_checkpoint(ckpt, map_location=device), model, opt)
        log(f"[{name}] resuming at step {start}/{len(plan)}")
    rows = keep_metrics(metrics_path, start) if rank == 0 else []
    barrier()
    save = lambda step: save_model(ckpt, model, tok, meta, rank, train_state=training_state(model, opt, step))
    t_start = last_save = time.time()
    cut_short, done, tokens_seen = None, start, 0.0
    for step in range(start, len(plan)):
        lr = set_lr(opt, step, len(plan), peak_lr, args.warmup)
        chunks = micro_batches(plan[step], sizes, micro, rank, world)
        step_weight = sum(weights[i] for i in plan[step])          # every rank holds the whole plan
        sums = {}
        for k, chunk in enumerate(chunks):
            sync = k >= len(chunks) - 1 or not hasattr(train_model, "no_sync")   # DDP: one reduce per step
            with (nullcontext() if sync else train_model.no_sync()), autocast(args.dtype, device):
                loss_sum, metrics = micro_step(chunk)
            # The one place a loss is normalised: by the whole global batch's weight, × world
            # because DDP and FSDP average the gradients over ranks instead of summing them.
            (loss_sum / step_weight * world).backward()
            sums = {key: sums.get(key, 0.0) + v for key, v in metrics.items()}
        due = (step + 1) % args.save_every == 0 if args.save_every else time.time() - last_save > 120
        late = rank == 0 and 0 < 60 * args.max_minutes < time.time() - t_start      # rank 0's clock
        sums.update(stop=float(bool(STOP)), save=float(rank == 0 and due), late=float(late))  # all agree
        sums = dict(zip(sorted(sums), all_sum([sums[k] for k in sorted(sums)], device)))
        step_loss = sums["loss_sum"] / max(sums["weight"], 1e-12)
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf))
        if not math.isfinite(step_loss + norm):     # checked before the update: the weights stay finite
            kept = f"the last periodic checkpoint is kept in {ckpt}" if os.path.exists(ckpt) else "none saved"
            raise Fatal(f"stage {name}: loss {step_loss}, gradient norm {norm} at step {step + 1}; {kept}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        done, elapsed, tokens_seen = step + 1, time.time() - t_start, tokens_seen + sums["tokens"]
        row = {"step": done, "loss": step_loss, "lr": lr, "tokens_per_s": tokens_seen / max(elapsed, 1e-9)}
        if "correct" in sums:
            row["accuracy"] = sums["correct"] / max(sums["n_pairs"], 1)
        if rank == 0:
            rows.append(row)
            write_metrics(metrics_path, [row])
            if done % args.log_every == 0 or done == len(plan):
                acc = f" acc {row['accuracy']:.3f}" if "accuracy" in row else ""
                log(f"[{name}] step {done}/{len(plan)} loss {step_loss:.4f}{acc} lr {lr:.2e} "
                    f"eta {elapsed / (done - start) * (len(plan) - done):.0f}s")
        if sums["save"] or sums["stop"] or done == args.stop_at_step:
            save(done)
            last_save = time.time()
        if sums["stop"] or done == args.stop_at_step < len(plan):
            why = "interrupted" if sums["stop"] else "stopped (--stop-at-step)"
            raise Fatal(f"stage {name}: {why} after step {done}; checkpoint in {ckpt}; --resume continues")
        if (done == args.max_steps or sums["late"]) and done < len(plan):
            cut_short = f"cut short after step {done} of {len(plan)} (--max-steps / --max-minutes)"
            break
    save(done)                 # the end: a stage killed after this resumes past the loop
    plot(metrics_path, os.path.join(folder, "curves.png"), "step", ("loss", "accuracy"), rank, name)
    return rows, cut_short


# -----------------------------------------------------------------------------------------
# Data: files or the built-in world, split by prompt; the files' content is a stage input.

MIN_SPLIT = 8    # records: the offset and scale fit on validation, and a test accuracy, need some


def load_data(args):
    """Returns ({"train","val","test"} -> records, has_oracle, sha256 of the data files). Too few
    records in a split is one line before any training (the stages up to lm read only train)."""
    if not args.data:
        log(f"data: built-in world, {args.builtin_prompts} prompts, {args.builtin_rejections} rejection(s) "
            f"per helpful prompt, seed {args.seed}")
        splits = builtin.make_dataset(args.builtin_prompts, args.seed, n_rejected=args.builtin_rejections)
        source, digest = "--builtin-prompts", None
    else:
        records, digest = read_data_files(args.data, args.skip_bad)        # and the files' sha256
        splits = split_records(records, fractions=dict(zip(("train", "val", "test"), args.split)))
        source = "--data"
    short = {k: len(v) for k, v in splits.items() if len(v) < MIN_SPLIT}
    if short and max(STAGES.index(s) for s in args.stages) >= STAGES.index("rm"):
        raise DataError(source, None, f"the splits hold {', '.join(f'{k} {n}' for k, n in short.items())} "
                        f"records; every split needs at least {MIN_SPLIT} (more data, or another --split)")
    return splits, not args.data, digest


# -----------------------------------------------------------------------------------------
# Stage 1: the tokenizer.

def stage_tokenizer(st, args, splits, rank):
    """A SentencePiece BPE trained on the training texts, or --tokenizer, saved in the stage's folder."""
    if st["mode"] != "reuse":
        if rank == 0 and args.tokenizer:
            save_tokenizer(st["dir"], read_tokenizer(args.tokenizer))
        elif rank == 0:
            texts = [t for r in splits["train"] for t in (r.prompt, *r.responses)]
            try:
                Tokenizer.train(texts, os.path.join(st["dir"], "tokenizer"), vocab_size=args.vocab_size)
            except ValueError as e:                  # too small a vocabulary for the texts' characters
                raise DataError("--data", None, str(e))
        barrier()
        finish_stage(st, {"vocab_size": read_tokenizer(st["dir"]).vocab_size})
    return read_tokenizer(st["dir"])


# -----------------------------------------------------------------------------------------
# Stage 2: the language model π₀, next-token loss on prompt + demonstration.

def stage_lm(st, args, tok, splits, ctx):
    rank, world, device = ctx
    torch.manual_seed(args.seed)                  # the same π₀ on any number of processes
    if args.init_from:
        model = load_checkpoint(args.init_from, head="lm").model.to(device)
    else:
        cfg = get_preset(args.preset, vocab_size=tok.vocab_size, max_seq_len=max(args.max_len, 128))
        model = Llama(cfg, head="lm").to(device)
    seqs = builtin.sft_sequences(splits["train"], tok, args.max_len, args.demo_refusals, args.seed,
                                 chat_format(args, tok))            # a chat model learns in its format
    log(f"[lm] {len(seqs)} sequences, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"device {device}, {torch.get_num_threads()} threads")
    train_model = wrap(model, args.fsdp, device)

    def micro_step(items):
        """Σ next-token NLL over the items' target tokens; a rank with no items adds 0."""
        rows = [torch.tensor(seqs[i]) for i in items] or [torch.tensor(seqs[0][:2])]
        ids = pad_sequence(rows, batch_first=True, padding_value=tok.pad_id).to(device)       # (B, T)
        mask = (torch.arange(ids.shape[1]) < torch.tensor([len(r) for r in rows])[:, None]).long().to(device)
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        logits = train_model(ids, attention_mask=mask)[:, :-1]                       # (B, T-1, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                              reduction="sum") * bool(items)
        metrics = {"loss_sum": float(nll.detach()), "weight": float((targets != -100).sum()),
                   "tokens": float(mask.sum())}
        return nll, {k: v * bool(items) for k, v in metrics.items()}

    epochs = args.lm_steps * args.lm_batch / len(seqs) if args.lm_steps else 1.0      # 0: one pass
    plan = plan_batches([1] * len(seqs), args.lm_batch, epochs, args.seed)
    targets = [len(s) - 1 for s in seqs]
    rows, cut_short = fit("lm", st["dir"], model, train_model, plan, [1] * len(seqs), targets, micro_step,
                          args.lm_lr, args.lm_batch, args, ctx, st["mode"] == "resume", tok, {"stage": "lm"})
    save_model(os.path.join(st["dir"], "model"), model, tok, {"stage": "lm"}, rank)
    finish_stage(st, {"final_loss": rows[-1]["loss"] if rows else None, "steps": len(rows)}, cut_short)


# -----------------------------------------------------------------------------------------
# Stage 3: reward models: π₀'s trunk + a fresh scalar head, trained on pairs with
# −log σ(r_c − r_r − m) through kernels.pairwise_margin_loss, then offset and scale fixed.

def chat_format(args, tok):
    """A pretrained chat model reads pairs in its chat format (data/chat.py); from scratch, HH text."""
    return chat_format_of(tok) if args.init_from and tok.chat_template else None   # refusals: one line (main)


def stage_rm(st, args, tok, splits, lm_dir, ctx):
    encoded, chat = {}, chat_format(args, tok)
    for split in ("train", "val", "test"):      # a template refusing a record: one line (main)
        encoded[split], stats = encode_records(splits[split], tok, args.max_len, margin_mode=args.margin,
                                               chat=chat)
        log(f"[rm] {split}: {stats.summary()}" + (" (in the checkpoint's chat format)" if chat else ""))
    try:
        mixes = rm_mixes(encoded["train"], args.rm_mode, args.seed, args.helpful_safety_share)
    except ValueError as e:
        raise Fatal(f"--rm-mode {args.rm_mode}: {e}")
    models, cut = {}, None
    for kind, idx in mixes.items():
        folder = os.path.join(st["dir"], kind)
        models[kind] = read_json(os.path.join(folder, "summary.json")) if st["mode"] == "resume" else None
        if models[kind]:
            log(f"[rm:{kind}] finished before the stop; reusing it")
            continue
        models[kind], cut_short = train_reward_model(args, kind, folder, [encoded["train"][i] for i in idx],
                                                     encoded, tok, lm_dir, ctx, st["mode"] == "resume",
                                                     {"chat_format": chat is not None})
        cut = cut or cut_short
    finish_stage(st, {"models": models}, cut)


def train_reward_model(args, kind, folder, train_enc, encoded, tok, lm_dir, ctx, resume, how):
    """how: what score.py must know to read pairs as this model did (chat_format; max_len is added here)."""
    rank, world, device = ctx
    os.makedirs(folder, exist_ok=True)
    # Seeded here: the fresh head must not depend on whether π₀ was trained in this process.
    torch.manual_seed(args.seed)
    ck = load_checkpoint(lm_dir, head="reward", map_location=device)
    model, sizes = (ck.model.compile_blocks() if args.compile else ck.model), [e.n_pairs for e in train_enc]
    # --batch-pairs 0: enough steps for a small dataset, Llama 2's large batches for a big one
    auto_batch = 2 ** round(math.log2(max(sum(sizes), 1) / STEPS_PER_EPOCH))
    batch_pairs = args.batch_pairs or min(64, max(8, auto_batch))
    lr = args.rm_lr or 1e-3 * batch_pairs / 64          # 0: from scratch, linear in the batch
    log(f"[rm:{kind}] from π₀ ({lm_dir}); new: {ck.new_params}; {len(train_enc)} training prompts, "
        f"{sum(sizes)} pairs, {batch_pairs} per step{'' if args.batch_pairs else ' (auto)'}, lr {lr:.2g}"
        + ("; blocks compiled (--compile)" if args.compile else ""))
    plan = plan_batches(sizes, batch_pairs, args.epochs, args.seed)    # --epochs < 1: a subset of the pairs
    caches, first = {}, freeze_lower(model, args.train_layers)    # data/features.py; too many: one line
    # The frozen blocks' outputs, once: of the training prompts the plan visits, and of val and test.
    visited = [train_enc[i] for i in sorted({i for batch in plan for i in batch})]
    to_cache = zip(("train", "val", "test"), (visited, encoded["val"], encoded["test"])) if first else ()
    for split, examples in to_cache:
        with autocast(args.dtype, device):        # stored in this precision: fp32 is bit-identical
            caches[split] = cache_features(
                model, examples, first, args.max_len, f"{args.out}/cache", args.dtype, rank, world,
                log=lambda line: log(f"[rm:{kind}] {split}: {line}"))
    train_model = wrap(PairwiseRewardLoss(model, args.kernel, first), args.fsdp, device)

    def micro_step(items):
        """Σ pair_weight · −log σ(z) over the items' pairs; a rank with no items adds 0."""
        examples = [train_enc[i] for i in items or plan[0][:1]]    # a prompt the plan visits: cached
        batch = make_batch(examples, layout=args.layout, pad_side=args.pad_side, max_len=args.max_len,
                           pad_id=tok.pad_id).to(device)
        out = train_model(batch, caches["train"].hidden(examples).to(device) if first else None)
        metrics = {"loss_sum": float(out.loss.detach()), "correct": float(out.correct.sum()),
                   "weight": float(batch.pair_weight.sum()), "n_pairs": len(out.correct),
                   "tokens": float(batch.n_computed_tokens)}
        return out.loss * bool(items), {k: v * bool(items) for k, v in metrics.items()}

    weights = [sum(e.pair_weight) for e in train_enc]
    meta = {"stage": "rm", "kind": kind, "max_len": args.max_len, **how}
    rows, cut_short = fit(f"rm:{kind}", folder, model, train_model, plan, sizes, weights, micro_step,
                          lr, args.micro_pairs, args, ctx, resume, tok, meta)
    model = whole(model)                       # FSDP: whole weights from here on, on every rank
    with autocast(args.dtype, device):
        summary = calibrate_and_evaluate(model, encoded, tok.pad_id, args.max_len, device, caches)
    log(f"[rm:{kind}] validation accuracy {summary['val']['accuracy']:.3f}, corr(reward, length) "
        f"{summary['corr_reward_length']:+.3f}; test accuracy {summary['test']['accuracy']:.3f} (length "
        f"baseline {summary['length_baseline_test']['accuracy']:.3f}); bias {summary['bias_shift']:+.4f}, "
        f"scale {summary['scale']:.3f}" + (" (floored: validation ranked no better than chance)"
                                          if summary["scale"] == MIN_SCALE else ""))
    summary.update(dir=os.path.join(folder, "model"), steps=len(rows),
                   final_train_loss=rows[-1]["loss"] if rows else None)
    save_model(summary["dir"], model, tok, {**meta, "val_reward_mean": 0.0, **{
        k: summary[k] for k in ("bias_shift", "scale", "val_reward_std")}}, rank)
    if rank == 0 and not cut_short:
        write_json(os.path.join(folder, "summary.json"), summary)
    check_stop(f"rm:{kind}'s evaluation")
    return summary, cut_short


# -----------------------------------------------------------------------------------------
# Stage 4: the KL-shaped PPO reward (Llama 2 eq. 1-4, InstructGPT's per-token KL penalty)
#
#     R(g | p) = R̃_c(g | p) − β · KL(π_θ(g | p) ‖ π₀(g | p)),     R̃_c = WHITEN(LOGIT(R_c))
#
# spread over tokens by model/ppo.py's kl_shaped_reward, and shown on samples of --policy.

def encode_prompt(tok, args, rec):
    """The prompt as the RMs read it (chat format or HH text), leaving room for the response."""
    return sampling_prompt(rec, tok, args.max_len - args.max_new_tokens, chat_format(args, tok))


def reward_rows(policy, ref, rms, records, tok, args, kl_coef, generator, device, has_oracle, whiten_by=None):
    """Samples π_θ on `records`; per sample the scores, the KL and the KL-shaped reward.
    Returns (rows, their means over every rank)."""
    prompt_ids = [encode_prompt(tok, args, r) for r in records]
    samples, hit_eos = sample(policy, prompt_ids, tok, args.max_new_tokens, generator)
    roll = Rollouts(prompt_ids, samples, tok.pad_id, device)
    with torch.no_grad(), autocast(args.dtype, device):
        lp_policy, lp_ref = rollout_logprobs(policy, roll), rollout_logprobs(ref, roll)
        raw, r_c, used_safety, r_white = final_scores(rms, roll, [r.is_safety for r in records], whiten_by)
    rewards, kl = kl_shaped_reward(lp_policy, lp_ref, roll.resp_mask, r_white, kl_coef, args.kl_estimator)
    rows = [{"prompt": rec.prompt, "response": tok.decode(samples[i]), "hit_eos": hit_eos[i],
             "is_safety": rec.is_safety, "used_safety_rm": bool(used_safety[i]), "R_c": float(r_c[i]),
             **{f"R_{k}": float(v[i]) for k, v in raw.items()}, "R_white": float(r_white[i]),
             "kl_sum": float(kl[i].sum()), "reward_sum": float(rewards[i].sum()),
             "per_token_reward": rewards[i, :len(samples[i])].tolist()} for i, rec in enumerate(records)]
    for row in rows if has_oracle else []:
        row["oracle"] = builtin.oracle(row["prompt"], row["response"])
    keys = ["kl_sum", "R_c", "reward_sum", "hit_eos", "used_safety_rm"] + ["oracle"] * has_oracle
    sums = all_sum([len(rows)] + [sum(float(r[k]) for r in rows) for k in keys], device)
    means = {f"mean_{k}": v / sums[0] for k, v in zip(keys, sums[1:])}
    return rows, {"n": int(sums[0]), "kl_coef": kl_coef, **means, "R_c_mean_std": list(global_mean_std(r_c))}


def stage_reward(st, args, tok, splits, lm_dir, rms, has_oracle, ctx):
    rank, world, device = ctx
    ref = load_checkpoint(lm_dir, map_location=device).model.eval()
    policy = load_checkpoint(args.policy or lm_dir, map_location=device).model.eval()
    if policy.head_kind != "lm":
        raise CheckpointError(f"--policy {args.policy}: a reward model, not a language model to sample from")
    generator = torch.Generator(device=device).manual_seed(args.seed + rank)
    records = spread(splits["test"], args.reward_prompts)[rank::world]     # each rank its share
    rows, summary = reward_rows(policy, ref, rms, records, tok, args, args.kl_coef, generator, device,
                                has_oracle)
    rows = [row for part in all_gather(rows) for row in part]           # every rank's samples
    if rank == 0:
        with open(os.path.join(st["dir"], "samples.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print_reward_table(rows[:args.show], list(rms), args.kl_coef)
    check_stop("the reward stage")
    finish_stage(st, summary)


# -----------------------------------------------------------------------------------------
# Stage 5: PPO on the KL-shaped reward (InstructGPT; Llama 2 §3.2.3), data-parallel. Each rank
# samples --ppo-group responses for its share of the prompts; the maths (the same kl_shaped_reward
# with R̃_c − the prompt's RLOO baseline, GAE, the clipped losses) lives in model/ppo.py.

def rollout(models, ref, rms, recs, tok, args, generator, device):
    """This rank's samples and everything the update needs, (B, L) each."""
    prompt_ids = [encode_prompt(tok, args, r) for r in recs]
    samples, hit_eos = sample(models.policy, prompt_ids, tok, args.max_new_tokens, generator)
    roll = Rollouts(prompt_ids, samples, tok.pad_id, device)
    with torch.no_grad(), autocast(args.dtype, device):
        (old_logp, old_values), ref_logp = models(roll), rollout_logprobs(ref, roll)
        _, r_c, _, r_white = final_scores(rms, roll, [r.is_safety for r in recs])
    score = group_baseline(r_white, args.ppo_group)
    rewards, kl = kl_shaped_reward(old_logp, ref_logp, roll.resp_mask, score, args.ppo_kl_coef,
                                   args.kl_estimator)
    adv, returns = gae(rewards, old_values, roll.resp_mask, args.gamma, args.lam)
    return dict(roll=roll, old_logp=old_logp, old_values=old_values, returns=returns, kl=kl, r_c=r_c,
                adv=masked_whiten(adv, roll.resp_mask))


def ppo_update(models, train_models, opt, batch, args, generator, ctx):
    """--ppo-epochs passes of clipped updates over minibatches; returns the mean statistics."""
    rank, world, device = ctx
    sums = torch.zeros(4, dtype=torch.float64)                        # pg, vf, clipped, tokens
    for _ in range(args.ppo_epochs):
        order = torch.randperm(len(batch["roll"].responses), generator=generator)
        for mb in order.split(args.ppo_minibatch // world):
            sub = batch["roll"].subset(mb)
            L, mb = sub.targets.shape[1], mb.to(device)
            (n_tokens,) = all_sum([float(sub.resp_mask.sum())], device)
            with autocast(args.dtype, device):
                logp, values = train_models(sub)
            old = [batch[k][mb, :L] for k in ("old_logp", "adv", "old_values", "returns")]
            pg, vf, clipped = ppo_losses(logp, old[0], old[1], values, old[2], old[3], sub.resp_mask,
                                         args.clip, args.vf_clip)
            opt.zero_grad(set_to_none=True)
            ((pg + vf) / n_tokens * world).backward()      # by the global token count; × world: DDP averages
            norms = [float(torch.nn.utils.clip_grad_norm_(m.parameters(), args.grad_clip or math.inf))
                     for m in (models.policy, models.value)]           # all-reduced: every rank agrees
            if not math.isfinite(sum(norms)):       # checked before the update: the weights stay finite
                raise Fatal(f"stage ppo: gradient norm {norms[0]} (policy), {norms[1]} (value); stopped "
                            "before the update, the last checkpoint (if any) is whole")
            opt.step()
            sums += torch.tensor([float(x.detach()) for x in (pg, vf, clipped, sub.resp_mask.sum())],
                                 dtype=torch.float64)
    pg, vf, clipped, n = all_sum(sums.tolist(), device)
    return {"pg_loss": pg / n, "value_loss": vf / n, "clip_frac": clipped / n}


def evaluate(policy, ref, rms, eval_recs, baseline, tok, args, it, has_oracle, ctx, whiten_by=None):
    """Fresh samples of π_θ on this rank's held-out prompts (the same seed each time): the proxy
    (RM) score, the KL, the KL-shaped reward and the oracle's win-rate over π₀. The reward
    whitens R_c by π₀'s statistics (iteration 0), so that it can rise as π_θ improves."""
    rank, world, device = ctx
    generator = torch.Generator(device=device).manual_seed(args.seed + 1 + 1000 * rank)
    reps = [r for r in eval_recs for _ in range(args.ppo_eval_samples)]          # a prompt's samples adjacent
    rows, s = reward_rows(policy, ref, rms, reps, tok, args, args.ppo_kl_coef, generator, device, has_oracle,
                          whiten_by)
    out = {"iter": it, "eval_proxy": s["mean_R_c"], "eval_kl": s["mean_kl_sum"],
           "eval_reward": s["mean_reward_sum"], "R_c_mean_std": s["R_c_mean_std"]}
    if has_oracle:
        k = args.ppo_eval_samples
        scores = [[r["oracle"] for r in rows[i:i + k]] for i in range(0, len(rows), k)]
        out["eval_oracle"] = s["mean_oracle"]
        terms = all_sum(win_rate_terms(scores, baseline), device)         # [n, Σ rate, Σ rate²] over ranks
        out["win_rate_vs_pi0"], out["win_rate_ci95"] = win_rate(*terms)
    return out, rows


def stage_ppo(st, args, tok, splits, lm_dir, rms, has_oracle, ctx):
    rank, world, device = ctx
    if (args.ppo_batch // args.ppo_group) % world or args.ppo_minibatch % world:
        raise Fatal(f"--ppo-batch / --ppo-group ({args.ppo_batch // args.ppo_group} prompts) and "
                    f"--ppo-minibatch ({args.ppo_minibatch}) must be multiples of the {world} processes")
    torch.manual_seed(args.seed)
    ref = load_checkpoint(lm_dir, map_location=device).model.eval()
    models = PolicyAndValue(load_checkpoint(lm_dir, map_location=device).model, value_model_init(rms, device))
    opt = torch.optim.AdamW([{"params": models.policy.parameters(), "lr": args.ppo_lr},
                             {"params": models.value.parameters(), "lr": args.value_lr}],
                            betas=(0.9, 0.95), eps=1e-5, weight_decay=0.0)
    # prompts: the same draw on every rank; samples and minibatches: each rank its own
    gens = [torch.Generator().manual_seed(args.seed),
            torch.Generator(device=device).manual_seed(args.seed + 7 + rank),
            torch.Generator().manual_seed(args.seed + rank)]
    eval_recs, baseline = spread(splits["test"], args.ppo_eval_prompts)[rank::world], None
    if has_oracle:       # π₀'s samples on the held-out prompts, judged once
        k, generator = args.ppo_eval_samples, torch.Generator(device=device).manual_seed(args.seed + 2 + rank)
        prompts = [encode_prompt(tok, args, r) for r in eval_recs for _ in range(k)]
        base, _ = sample(ref, prompts, tok, args.max_new_tokens, generator)
        baseline = [[builtin.oracle(r.prompt, tok.decode(s)) for s in base[i * k:(i + 1) * k]]
                    for i, r in enumerate(eval_recs)]
    ckpt, metrics_path = os.path.join(st["dir"], "ckpt"), os.path.join(st["dir"], "metrics.jsonl")
    history = []
    if st["mode"] == "resume" and has_checkpoint(ckpt):
        history = restore_ppo(load_checkpoint(ckpt, map_location=device), models, opt, gens, rank)
        log(f"[ppo] resuming at iteration {history[-1]['iter']}/{args.ppo_iters}")
    train_models = wrap(models, False, device)      # generation needs whole weights: PPO runs under DDP
    if not history:
        row, _ = evaluate(models.policy, ref, rms, eval_recs, baseline, tok, args, 0, has_oracle, ctx)
        history.append(row)
        log("[ppo] iter 0 (π_θ = π₀): " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                     if k != "R_c_mean_std"))
    if rank == 0:                                   # each iteration once, also after a resume
        write_metrics(metrics_path, history, mode="w")
    last_save, cut_short, eval_rows, n_prompts = time.time(), None, [], args.ppo_batch // args.ppo_group
    for it in range(history[-1]["iter"] + 1, args.ppo_iters + 1):
        idx = torch.randint(len(splits["train"]), (n_prompts,), generator=gens[0]).tolist()[rank::world]
        recs = [splits["train"][i] for i in idx for _ in range(args.ppo_group)]    # a prompt's together
        batch = rollout(models, ref, rms, recs, tok, args, gens[1], device)
        stats = ppo_update(models, train_models, opt, batch, args, gens[2], ctx)
        n, kl_sum, score_sum = all_sum([len(recs), float(batch["kl"].sum()), float(batch["r_c"].sum())],
                                       device)
        row = {"iter": it, "score": score_sum / n, "kl": kl_sum / n, **stats}
        (late,) = all_sum([rank == 0 and 0 < 60 * args.max_minutes < time.time() - st["t0"]], device)
        capped = (it == args.max_steps or late > 0) and it < args.ppo_iters       # rank 0's clock decides
        last = it == args.ppo_iters or capped                # so the policy it stops at is evaluated
        if last or (args.ppo_eval_every and it % args.ppo_eval_every == 0):
            eval_row, eval_rows = evaluate(models.policy, ref, rms, eval_recs, baseline, tok, args, it,
                                           has_oracle, ctx, whiten_by=history[0]["R_c_mean_std"])
            row.update(eval_row)
        history.append(row)
        if rank == 0:
            write_metrics(metrics_path, [row])
        log(f"[ppo] iter {it}/{args.ppo_iters} score {row['score']:+.3f} kl {row['kl']:.3f} clip "
            f"{row['clip_frac']:.3f} vloss {row['value_loss']:.4f}" + "".join(
                f" {k} {row[k]:.3f}" for k in ("eval_proxy", "eval_kl", "win_rate_vs_pi0") if k in row))
        due = rank == 0 and (it % args.save_every == 0 if args.save_every else time.time() - last_save > 120)
        stop, save = all_sum([bool(STOP) or it == args.stop_at_step < args.ppo_iters, due], device)
        if stop or last or save:
            save_model(ckpt, models.policy, tok, {"stage": "ppo"}, rank,
                       train_state=ppo_state(models, opt, history, gens))
            last_save = time.time()
        if stop:
            why = "stopped (--stop-at-step)" if it == args.stop_at_step else "interrupted"   # on every rank
            raise Fatal(f"stage ppo: {why} after iteration {it}; checkpoint in {ckpt}; --resume continues")
        if capped:
            cut_short = f"cut short after iteration {it} of {args.ppo_iters} (--max-steps / --max-minutes)"
            break
    save_model(os.path.join(st["dir"], "policy"), models.policy, tok, {"stage": "ppo"}, rank)
    plot(metrics_path, os.path.join(st["dir"], "ppo.png"), "iter",
         ("eval_proxy", "eval_kl", "eval_oracle", "win_rate_vs_pi0"), rank, "ppo: π_θ on held-out prompts")
    if rank == 0 and eval_rows:
        print_reward_table(eval_rows[:args.show], list(rms), args.ppo_kl_coef)
    evals = [h for h in history if "eval_proxy" in h]
    judge = "oracle" if has_oracle else "reward model (no oracle for real data)"
    finish_stage(st, {"iters": history[-1]["iter"], "start": evals[0], "final": evals[-1], "judge": judge},
                 cut_short)


# -----------------------------------------------------------------------------------------
# main: the stages in order, each reused, resumed or run.

def reward_models(report, device, out):
    """{kind: Checkpoint} of the rm stage's calibrated models, in eval mode, from this --out (not
    the report's absolute paths: a copied or moved run folder uses its own models)."""
    rms = {kind: load_checkpoint(os.path.join(out, "rm", kind, "model"), map_location=device)
           for kind in report["rm"]}
    return {kind: ck._replace(model=ck.model.eval()) for kind, ck in rms.items()}


def run(parser, args, ctx):
    rank, world, device = ctx
    t_all = time.time()
    os.makedirs(args.out, exist_ok=True)
    splits, has_oracle, data_sha256 = load_data(args)
    log(f"device {device}, {world} process(es), {torch.get_num_threads()} threads/process; splits "
        + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + " (prompt-disjoint)")
    report, upstream, lm_dir = {"seconds": {}, "mode": {}}, "", os.path.join(args.out, "lm", "model")
    config = get_preset(args.preset)             # or, with --init-from, the checkpoint's
    for name in STAGES[:max(STAGES.index(s) for s in args.stages) + 1]:   # and every stage before
        if name == "lm":     # the model is known: the precision (model/precision.py), --train-layers' range
            args.dtype, why = resolve_dtype(args.dtype, device, config.dim)
            log(f"precision {args.dtype} ({why})")
            check_train_layers(args.train_layers, config.n_layers)      # before any training: one line
        if name == "lm" and args.data:   # the tokenizer is known: --max-len 0 fitted, drops loud
            lengths = report["lengths"] = fit_max_len(      # data/encode.py; the floor leaves room to sample
                [r for split in splits.values() for r in split], tok, args.max_len, args.accept_drops,
                cap=min(AUTO_LEN_CAP, config.max_seq_len if args.init_from else AUTO_LEN_CAP),
                floor=args.max_new_tokens + 8, chat=chat_format(args, tok))
            args.max_len = lengths["max_len"]
            log(f"--max-len {args.max_len} ({lengths['chosen']}: {lengths['summary']})")
            if lengths["warning"]:
                log(f"WARNING: {lengths['warning']}")
        if args.init_from and name == "tokenizer":      # a pretrained checkpoint brings its tokenizer...
            tok, config = pretrained_tokenizer(args.init_from, args.tokenizer, args.max_len)
            log(f"[tokenizer] {args.init_from}'s {tok.kind} tokenizer: {tok.vocab_size} pieces, eos "
                f"{tok.eos_ids}, pad {tok.pad_id}, BOS {'added' if tok.bos_prefix else 'never added'}")
            upstream = f"init:{os.path.abspath(args.init_from)}"
            report[name] = {"from": os.path.abspath(args.init_from)}
            continue
        if args.init_from and name == "lm" and "lm" not in args.stages:    # ...and is π₀ as it is
            lm_dir, report[name] = args.init_from, {"from": os.path.abspath(args.init_from)}
            continue
        redo = any(STAGES.index(s) <= STAGES.index(name) for s in args.redo)     # it or a stage before
        st = open_stage(os.path.join(args.out, name), name, stage_inputs(parser, args, name, data_sha256),
                        upstream, rank, redo, args.resume)
        if name == "tokenizer":
            tok = stage_tokenizer(st, args, splits, rank)
        elif st["mode"] != "reuse" and name == "lm":
            stage_lm(st, args, tok, splits, ctx)
        elif st["mode"] != "reuse" and name == "rm":
            stage_rm(st, args, tok, splits, lm_dir, ctx)
        elif st["mode"] != "reuse":      # reward and ppo: both read the rm stage's models
            stage = stage_reward if name == "reward" else stage_ppo
            stage(st, args, tok, splits, lm_dir, reward_models(report, device, args.out), has_oracle, ctx)
        report[name] = st["summary"].get("models", st["summary"]) if name == "rm" else st["summary"]
        report["seconds"][name], report["mode"][name] = st["summary"]["seconds"], st["mode"]
        upstream = f"{st['id']}:{'done' if st['done'] else 'unfinished'}"
    report["seconds"]["total"] = round(time.time() - t_all, 1)
    if rank == 0:
        write_json(os.path.join(args.out, "report.json"), report)
        print_report(report)
        log(f"report: {os.path.join(args.out, 'report.json')}")


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        run(parser, args, setup(args))
    except (Fatal, CheckpointError, DataError, ChatTemplateError, OSError, FloatingPointError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)    # OSError: a read-only or full --out, say
        return 1 if isinstance(e, (Fatal, OSError, FloatingPointError)) else 2     # 2: bad input
    except KeyboardInterrupt:
        print("train.py: a second Ctrl-C: stopped; --resume continues from the last save", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
