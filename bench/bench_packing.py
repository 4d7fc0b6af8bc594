"""How many tokens does shared-prefix packing save on HH-RLHF?

    python bench/bench_packing.py [--hh ../shared/data/hh-rlhf] [--max-len 512] [--vocab 4096]

All 8,552 test pairs of the four HH-RLHF test files are loaded (quirky pairs dropped and
counted), tokenized with a SentencePiece BPE trained here on every 4th record (the
project's tokenizer settings), cut to max_len by the keep-the-end policy, and batched by
the same shuffled plan in both layouts. For each layout it prints the slots of its batches
(N * T summed over batches), the real (non-pad) tokens among them, and the attention-score
entries (N * T^2), which grow with the longer packed rows. The model's matmuls skip a padded
batch's padding (model/llama.py, Unpadded) but not a packed row's (its mask is a block mask):
the matmul rows are the padded layout's real tokens and the packed layout's slots.
"""
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import encode_records, load_records, make_batch, plan_batches  # noqa: E402
from data.cli import OneLineParser, positive_int  # noqa: E402
from model import Tokenizer  # noqa: E402

FILES = ["harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"]


def parse_args(argv=None):
    ap = OneLineParser(prog="bench_packing.py", description=__doc__.split("\n")[1])
    ap.add_argument("--hh", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf"))
    ap.add_argument("--max-len", type=positive_int, default=512)
    ap.add_argument("--vocab", type=positive_int, default=4096)
    ap.add_argument("--batch-pairs", type=positive_int, nargs="+", default=[8, 32])
    args = ap.parse_args(argv)
    if args.max_len < 3:                     # checked before the tokenizer's minutes, not after
        ap.error(f"argument --max-len: must be >= 3 (BOS, a token, EOS), got {args.max_len}")
    if args.vocab < 260:
        ap.error(f"argument --vocab: {args.vocab} leaves no room for the 256 byte pieces and 4 specials (need >= 260)")
    args.paths = [os.path.join(args.hh, f, "test.jsonl.gz") for f in FILES]
    missing = [p for p in args.paths if not os.path.isfile(p)]
    if missing:
        ap.error(f"argument --hh: {len(missing)} of the 4 HH-RLHF test files not found, first {missing[0]}")
    return args


def main():
    args = parse_args()
    paths = args.paths
    records, load_stats = load_records(paths)
    print(load_stats.summary())
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        texts = [r.prompt + resp for r in records[::4] for resp in r.responses]
        tok = Tokenizer.train(texts, os.path.join(tmp, "hh"), args.vocab)
    print(f"tokenizer: BPE {tok.vocab_size} pieces trained on {len(texts)} transcripts ({time.time() - t0:.0f}s)")
    encoded, enc_stats = encode_records(records, tok, args.max_len)
    print(enc_stats.summary())
    n_pairs = sum(e.n_pairs for e in encoded)

    print(f"\n{n_pairs} pairs, max_len {args.max_len}, batches shuffled with seed 0 (same plan in both layouts)\n")
    print(f"{'batch pairs':>11} | {'layout':>7} | {'slots N*T':>15} | {'real tokens':>12} | "
          f"{'pad %':>5} | {'attention N*T^2':>15} | {'rows':>6}")
    print("-" * 90)
    for batch_pairs in args.batch_pairs:
        totals, plan = {}, plan_batches([e.n_pairs for e in encoded], batch_pairs, seed=0)
        for layout in ("padded", "packed"):
            computed = real = attention = rows = 0
            for items in plan:
                batch = make_batch([encoded[i] for i in items], layout, max_len=args.max_len,
                                   pad_id=tok.pad_id)
                N, T = batch.input_ids.shape
                computed += batch.n_computed_tokens
                real += batch.n_real_tokens
                attention += N * T * T
                rows += N
            totals[layout] = (computed, real, attention)
            print(f"{batch_pairs:>11} | {layout:>7} | {computed:>15,} | {real:>12,} | "
                  f"{100 * (1 - real / computed):>5.1f} | {attention:>15,} | {rows:>6}")
        (pad_c, pad_r, pad_a), (pack_c, pack_r, pack_a) = totals["padded"], totals["packed"]
        # matmul rows: a padded batch's real tokens (its padding is skipped), a packed batch's slots
        print(f"{'':>11} | {'ratio':>7} | padded / packed: real tokens {pad_r / pack_r:.2f}x (prefix sharing), "
              f"matmul rows {pad_r / pack_c:.2f}x, slots {pad_c / pack_c:.2f}x, attention entries {pad_a / pack_a:.2f}x")


if __name__ == "__main__":
    main()
