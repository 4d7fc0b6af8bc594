"""Benchmark: one reward-model training step, padded vs shared-prefix packed batches.

    python bench/bench_train.py                            # HH-RLHF from ../shared if present, else built-in
    python bench/bench_train.py --configs default --steps 3 --batch-pairs 8

The step is train.py's rm step: PairwiseRewardLoss (trunk without its final norm, then
kernels.pairwise_margin_loss with the norm fused) forward, backward, gradient clipping at
1.0, AdamW (model/optim.py's make_optimizer, as train.py) step. Per config (a model preset) the two layouts
train side by side: two copies of the same initial model, each with its own optimizer, see
the same records (the same pairs) at every step, in alternating order. Their losses must
agree to float rounding (a packed response sees exactly the tokens, positions and keys of
its padded row); the bench prints the largest difference.

Per config x layout, over the timed steps (after warm-up), medians of per-step rates:
  pairs/s            preference pairs per second: the number that counts (the prompt of a
                     pair is computed twice when padded, once when packed);
  real tok/s         non-padding positions per second (the layouts hold different real
                     tokens for the same pairs: packed holds each prompt once);
  computed tok/s     N*T positions per second, padding included (attention runs on all of
                     them; the model's matmuls skip the padding of a padded batch);
  MFU                model FLOPs / step time / the matmul peak measured in this run;
  peak MiB           memory allocated by the first (warm-up) step beyond the weights and
                     the batch: torch.cuda.max_memory_allocated on a GPU; on CPU the peak of
                     live tensor storages made by the step's ops (a dispatch-mode tracker,
                     bench/common.peak_bytes), so allocator caching and the scratch
                     space inside fused ops are not in it. AdamW's state (8 bytes/parameter)
                     is created at the end of that step, after backward freed the activations.
Model FLOPs per step (bench/common.model_flops) = 6 * P * real tokens + attention's QK^T and
AV, fwd + bwd, 12 * D per layer for each (query, key) pair the mask allows: P = the matmul
parameters (all but the token embedding, which is a lookup, and the scalar head, which
touches R rows). Padding counts for nothing, as in the issue's definition of MFU.
The batch is laid out (make_batch) outside the timed step; its time is a separate column.
The packed/padded ratio is the median of per-step ratios of paired steps, which is steadier
than a ratio of medians on a shared machine. "CPU ms" is the process's CPU time per step (all
threads): on a CPU shared with other jobs, wall time also counts the time the step waited
for a core, and the ratio by CPU time is the steadier of the two.
"""
import copy
import os
import random
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import matmul_peak, model_flops, peak_bytes  # noqa: E402
from data import builtin, encode_records, load_records, make_batch, plan_batches  # noqa: E402
from data.cli import (DefaultsHelpFormatter, OneLineParser, comma_choices, kernel_flag,  # noqa: E402
                      nonnegative_int, positive_float, positive_int, seed_int, thread_count)
from model import PRESETS, Llama, Tokenizer, get_preset  # noqa: E402
from model.parallel import reuse_freed_memory  # noqa: E402
from model.rewards import PairwiseRewardLoss  # noqa: E402
from model.precision import DTYPES, autocast, resolve_dtype  # noqa: E402
from model.optim import make_optimizer  # noqa: E402

HH_DIR = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf")
HH_FILES = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
CACHE_DIR = os.path.join(ROOT, "runs", "bench")
LAYOUTS = ("padded", "packed")
MIB = 2**20


# ----------------------------------------------------------------------------------------
# Data and tokenizer.

def load_bench_records(which, seed):
    """HH-RLHF's four test splits (harmless-base tagged safety), or the built-in world.

    which: "auto" (HH-RLHF when all four files are present), "hh" or "builtin"."""
    paths = [os.path.join(HH_DIR, name, "test.jsonl.gz") for name in HH_FILES]
    missing = [p for p in paths if not os.path.exists(p)]
    if which == "hh" and missing:
        raise ValueError(f"--data hh: missing {', '.join(missing)}")
    if which == "hh" or (which == "auto" and not missing):
        records = []
        for name, path in zip(HH_FILES, paths):
            records += load_records(path, tag="safety" if name == "harmless-base" else None)[0]
        return records, "hh"
    return builtin.make_dataset(n_prompts=2000, seed=seed)["train"], "builtin"


def bench_tokenizer(records, source, vocab_size, seed, sample=3000):
    """A SentencePiece model trained on a sample of the records, cached in runs/bench/."""
    prefix = os.path.join(CACHE_DIR, f"tokenizer-{source}-{vocab_size}-s{sample}-seed{seed}")
    if os.path.exists(prefix + ".model"):
        return Tokenizer(prefix + ".model")
    picked = random.Random(seed).sample(records, min(sample, len(records)))
    return Tokenizer.train((t for r in picked for t in (r.prompt, *r.responses)), prefix, vocab_size)


def peak_flops(device, n, dtype):
    """The matmul peak of the precision in use (--dtype, as train.py's)."""
    return matmul_peak(device, n, torch.bfloat16 if dtype == "bf16" else torch.float32)


# ----------------------------------------------------------------------------------------
# One training step, as train.py's rm stage takes it (one micro-batch, one rank).

class Trainer:
    def __init__(self, model, kernel, lr, dtype):
        self.model, self.dtype = model, dtype
        self.loss_module = PairwiseRewardLoss(model, kernel)
        self.opt = make_optimizer(model, lr, weight_decay=0.1)

    def step(self, batch, device):
        with autocast(self.dtype, device):
            out = self.loss_module(batch)
        loss = out.loss / batch.pair_weight.sum()      # train.py: the summed loss over the step's weight
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_config(preset, encoded, plan, args, tok, device, dtype):
    """Trains both layouts side by side on `plan` (lists of record indices, one per step), in `dtype`.

    Steps: args.warmup untimed (the first under the memory tracker), then args.steps timed.
    Returns {layout: per-step lists and the peak}, and the per-step loss differences.
    """
    torch.manual_seed(args.seed)
    base = Llama(get_preset(preset, vocab_size=tok.vocab_size, max_seq_len=args.max_len), head="reward")
    trainers = {layout: Trainer(copy.deepcopy(base).to(device), args.kernel, args.lr, dtype) for layout in LAYOUTS}
    stats = {layout: {k: [] for k in ("seconds", "cpu_seconds", "batch_ms", "pairs", "real", "computed", "flops",
                                      "rows", "T")}
             for layout in LAYOUTS}
    loss_diff = []
    for i, items in enumerate(plan):
        records = [encoded[j] for j in items]
        losses = {}
        for layout in (LAYOUTS if i % 2 == 0 else LAYOUTS[::-1]):     # alternate who goes first
            t0 = time.perf_counter()
            batch = make_batch(records, layout=layout, max_len=args.max_len, pad_id=tok.pad_id).to(device)
            batch_ms = 1e3 * (time.perf_counter() - t0)
            trainer, s = trainers[layout], stats[layout]
            if i == 0:                              # the memory step: tracked, not timed
                box = {}
                s["peak"] = peak_bytes(lambda: box.update(loss=trainer.step(batch, device)), device)
                losses[layout] = box["loss"]
                continue
            sync(device)
            t0, cpu0 = time.perf_counter(), time.process_time()
            losses[layout] = trainer.step(batch, device)
            sync(device)
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
            if i >= args.warmup:
                N, T = batch.input_ids.shape
                for k, v in (("seconds", seconds), ("cpu_seconds", cpu_seconds), ("batch_ms", batch_ms), ("pairs", batch.n_pairs),
                             ("real", batch.n_real_tokens), ("computed", batch.n_computed_tokens),
                             ("flops", model_flops(trainer.model, batch)), ("rows", N), ("T", T)):
                    s[k].append(v)
        loss_diff.append(abs(losses["packed"] - losses["padded"]))
        print(f"  [{preset}] step {i + 1}/{len(plan)}: loss padded {losses['padded']:.6f} packed "
              f"{losses['packed']:.6f}, |diff| {loss_diff[-1]:.1e}; "
              + ("warm-up, memory" if i == 0 else "warm-up" if i < args.warmup else
                 f"padded {1e3 * stats['padded']['seconds'][-1]:.0f} ms, packed "
                 f"{1e3 * stats['packed']['seconds'][-1]:.0f} ms"), flush=True)
    n_params = sum(p.numel() for p in base.parameters())
    return stats, loss_diff, n_params


def median_rate(s, key):
    return statistics.median(v / t for v, t in zip(s[key], s["seconds"]))


# ----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = OneLineParser(prog="bench_train.py", description=__doc__.splitlines()[0],
                      formatter_class=DefaultsHelpFormatter)
    p.add_argument("--configs", type=comma_choices(sorted(PRESETS)), default="default,small",
                   help="comma list of model presets")
    p.add_argument("--data", choices=("auto", "hh", "builtin"), default="auto",
                   help=f"auto: HH-RLHF from {os.path.normpath(HH_DIR)} when present, else the built-in world")
    p.add_argument("--steps", type=positive_int, default=4, help="timed steps per config, after the warm-up")
    p.add_argument("--warmup", type=positive_int, default=1,
                   help="untimed steps; the first is run under the memory tracker")
    p.add_argument("--batch-pairs", type=positive_int, default=16, help="pairs per step (whole prompts; plan_batches)")
    p.add_argument("--max-len", type=nonnegative_int, default=0,
                   help="tokens per sequence (0 = 512 on HH-RLHF, 128 built-in)")
    p.add_argument("--kernel", type=kernel_flag, default="auto",
                   help="pairwise loss path, as train.py's --kernel")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="as train.py's: auto = bf16 autocast where "
                   "the device has bf16 matrix units (CUDA, AMX CPUs) and the model is wide enough, else fp32")
    p.add_argument("--threads", type=thread_count, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--matmul-n", type=nonnegative_int, default=0,
                   help="size of the peak matmul (0 = 2048 CPU, 8192 GPU)")
    p.add_argument("--seed", type=seed_int, default=0)
    args = p.parse_args(argv)
    if args.max_len and args.max_len < 3:
        p.error(f"argument --max-len: must be >= 3 (BOS, a token, EOS), got {args.max_len}")
    return p, args


def main(argv=None):
    p, args = parse_args(argv)
    configs = args.configs
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        reuse_freed_memory()                                 # as train.py does on a CPU
    # The precision per config, from the model's width as train.py resolves it: on an AMX CPU a
    # model narrower than 512 stays fp32 (model/precision.py).
    dtypes = {c: resolve_dtype(args.dtype, device, get_preset(c).dim) for c in configs}

    t_start = time.time()
    try:
        records, source = load_bench_records(args.data, args.seed)
    except ValueError as e:
        p.error(str(e))
    args.max_len = args.max_len or (512 if source == "hh" else 128)
    tok = bench_tokenizer(records, source, 4096 if source == "hh" else 1024, args.seed)
    encoded, enc_stats = encode_records(records, tok, args.max_len)
    plan = plan_batches([e.n_pairs for e in encoded], args.batch_pairs, seed=args.seed)[:args.warmup + args.steps]
    if len(plan) < args.warmup + args.steps:
        p.error(f"only {len(plan)} batches of {args.batch_pairs} pairs in the data; lower --steps")
    matmul_n = args.matmul_n or (8192 if device.type == "cuda" else 2048)
    used = sorted({dtype for dtype, _ in dtypes.values()})
    peaks = {dtype: [peak_flops(device, matmul_n, dtype)] for dtype in used}      # the roof of each precision
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}")
    print(f"data: {'HH-RLHF test splits (' + ', '.join(HH_FILES) + ')' if source == 'hh' else 'built-in world'}; "
          f"{enc_stats.summary()}")
    print(f"tokenizer: {tok.vocab_size} pieces ({tok.model_path}); batches of {args.batch_pairs} pairs, "
          f"max_len {args.max_len}; {args.warmup} warm-up (the first tracks memory) + {args.steps} timed steps per config")
    print("matmul peak: " + ", ".join(f"{peaks[d][0] / 1e9:.1f} GFLOP/s ({matmul_n}^3 {d})" for d in used)
          + "; precision " + ", ".join(f"{c} {d} ({why})" for c, (d, why) in dtypes.items()), flush=True)

    results = {}
    for preset in configs:
        results[preset] = bench_config(preset, encoded, plan, args, tok, device, dtypes[preset][0])
    for dtype in used:
        peaks[dtype].append(peak_flops(device, matmul_n, dtype))
        print(f"matmul peak again after the runs: {peaks[dtype][1] / 1e9:.1f} GFLOP/s ({dtype}); MFU uses "
              f"the larger, {max(peaks[dtype]) / 1e9:.1f} GFLOP/s")
    print()

    header = ("| config (params) | layout | rows x T | real tok/pair | computed tok/pair | batch ms | step ms | CPU ms | pairs/s "
              "| real tok/s | computed tok/s | GFLOP/s | MFU | peak MiB |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for preset, (stats, _, n_params) in results.items():
        peak = max(peaks[dtypes[preset][0]])
        for layout in LAYOUTS:
            s = stats[layout]
            gflops = median_rate(s, "flops") / 1e9
            print(f"| {preset} ({n_params / 1e6:.2f}M) | {layout} | {statistics.median(s['rows']):.0f} x "
                  f"{statistics.median(s['T']):.0f} | {sum(s['real']) / sum(s['pairs']):.0f} "
                  f"| {sum(s['computed']) / sum(s['pairs']):.0f} "
                  f"| {statistics.median(s['batch_ms']):.1f} | {1e3 * statistics.median(s['seconds']):.0f} "
                  f"| {1e3 * statistics.median(s['cpu_seconds']):.0f} "
                  f"| {median_rate(s, 'pairs'):.1f} | {median_rate(s, 'real'):.0f} "
                  f"| {median_rate(s, 'computed'):.0f} | {gflops:.1f} | {100 * gflops * 1e9 / peak:.1f}% "
                  f"| {s['peak'] / MIB:.0f} |")
    print()
    for preset, (stats, loss_diff, _) in results.items():
        ratio, cpu_ratio = (statistics.median(a / b for a, b in zip(stats["padded"][k], stats["packed"][k]))
                            for k in ("seconds", "cpu_seconds"))
        print(f"{preset}: packed/padded pairs/s = {ratio:.2f}x (median of {args.steps} paired steps; target "
              f">= 1.5x; by CPU time {cpu_ratio:.2f}x); loss |packed - padded|: step 1 (same weights) "
              f"{loss_diff[0]:.1e}, max over "
              f"{len(loss_diff)} steps {max(loss_diff):.1e}")
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
