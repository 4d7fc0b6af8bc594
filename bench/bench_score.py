"""Benchmark: scoring throughput of score.py's batched paths against one sequence at a time.

    python bench/bench_score.py                                   # built-in world, default preset
    python bench/bench_score.py --data ../shared/data/hh-rlhf/helpful-base/test.jsonl.gz --preset small
    python bench/bench_score.py --rm runs/default --data pairs.jsonl   # a trained model and its tokenizer

Same model, same records, all under torch.inference_mode() and --dtype (as score.py's):
  naive    one forward pass per response: BOS + prompt + response + EOS as a batch of one
  padded   data.evaluate.score_responses(layout="padded"): prompts sorted by length, one row per
           response, padded to the longest row of its batch
  packed   score_responses(layout="packed"), what score.py runs: the shared-prefix layout, each
           prompt computed once for all its responses

Per method: median seconds over --repeats (after one warm-up), pairs/s, responses/s, speed-up
over naive, the tokens the model computed (padding and repeated prompts included), and the
largest |Δ reward| against naive. Without --rm the model is randomly initialised (throughput
does not depend on the weights) and a tokenizer is trained on the records.
"""
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import flag_error  # noqa: E402
from data import DataError, builtin, encode_records, load_records, parse_data_spec  # noqa: E402
from data.cli import OneLineParser, data_file, device_flag, nonnegative_int, positive_int, resolve_device  # noqa: E402
from data.evaluate import score_responses, self_pairs  # noqa: E402
from model import PRESETS, Llama, Tokenizer, get_preset  # noqa: E402
from model.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from model.precision import DTYPES, autocast, resolve_dtype  # noqa: E402


def naive(model, records, tok, max_len, device):
    """The loop a first script would write: one sequence, one forward pass (same tokens and cuts)."""
    encoded, _ = encode_records(self_pairs(records), tok, max_len, margin_mode="none")
    scores = []
    for e in encoded:
        for response_ids in e.response_ids:
            ids = torch.tensor([e.prompt_ids + response_ids], device=device)
            scores.append(float(model(ids)[0]))
    return scores


def batched(layout, batch_tokens):
    def run(model, records, tok, max_len, device):
        scores, _, _ = score_responses(model, records, tok, max_len, device, batch_tokens=batch_tokens,
                                       layout=layout)
        return [s for rec in scores for s in rec if s is not None]
    return run


def timed(fn, repeats, device, dtype, model, *args):
    """(median seconds, scores of the first timed run, tokens the model computed per run)."""
    computed = []
    hook = model.register_forward_pre_hook(lambda module, inputs: computed.append(inputs[0].numel()))

    def once():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast(dtype, device):
            out = fn(model, *args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    once()                                     # warm-up: allocator, kernels, caches
    computed.clear()
    runs = [once() for _ in range(repeats)]
    hook.remove()
    return statistics.median(t for t, _ in runs), runs[0][1], sum(computed) // repeats


def parse_args(argv=None):
    p = OneLineParser(prog="bench_score.py", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=data_file, default=None, help="preference file (default: the built-in world)")
    p.add_argument("--n", type=positive_int, default=64, help="records to score")
    p.add_argument("--rm", default="", help="a reward-model checkpoint dir (default: random init + trained tokenizer)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--max-len", type=nonnegative_int, default=0, help="0 = the model's max_seq_len")
    p.add_argument("--batch-tokens", type=positive_int, default=8192)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--device", type=device_flag, default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="as score.py's (every method alike)")
    args = p.parse_args(argv)
    if args.max_len and args.max_len < 3:
        p.error(f"argument --max-len: {args.max_len} leaves no room for a token between BOS and EOS (need >= 3)")
    if args.rm and not os.path.exists(args.rm):
        p.error(f"argument --rm: {args.rm}: no such file or directory")
    return args


def main():
    args = parse_args()
    device = resolve_device(args.device)

    if args.data:
        try:
            tag, path = parse_data_spec(args.data)           # PATH, safety=PATH or helpful=PATH
            records, _ = load_records(path, skip_bad=True, tag=tag)
        except DataError as e:
            flag_error(f"argument --data: {e}")
        if not records:
            flag_error(f"argument --data: {args.data}: no record to score")
    else:
        records = builtin.make_dataset(n_prompts=max(args.n, 2000), seed=0)["train"]
    corpus, records = records[:2000], records[:args.n]
    if args.rm:
        try:
            ck = load_checkpoint(args.rm, map_location=device)
        except CheckpointError as e:
            flag_error(f"argument --rm: {e}")
        model, tok = ck.model, ck.tokenizer
    else:
        cfg = get_preset(args.preset)
        texts = [t for r in corpus for t in [r.prompt, *r.responses]]
        tok = Tokenizer.train(texts, os.path.join(tempfile.mkdtemp(), "tok"), vocab_size=cfg.vocab_size)
        torch.manual_seed(0)
        model = Llama(get_preset(args.preset, vocab_size=tok.vocab_size), head="reward")
    model = model.to(device).eval()
    # as score.py: the precision from the model's width (on an AMX CPU, narrower than 512 stays fp32)
    args.dtype, why = resolve_dtype(args.dtype, device, model.config.dim)
    if args.max_len > model.config.max_seq_len:
        flag_error(f"argument --max-len: {args.max_len} is longer than the model's {model.config.max_seq_len}")
    max_len = args.max_len or model.config.max_seq_len
    n_resp = sum(len(r.responses) for r in records)
    n_pairs = sum(len(r.pairs) for r in records)
    print(f"{len(records)} records, {n_resp} responses, {n_pairs} pairs; {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters, max_len {max_len}, batch_tokens {args.batch_tokens}, {device}, {torch.get_num_threads()} threads, "
          f"{args.dtype} ({why})")

    methods = {"naive": naive, "padded": batched("padded", args.batch_tokens),
               "packed": batched("packed", args.batch_tokens)}
    results = {name: timed(fn, args.repeats, device, args.dtype, model, records, tok, max_len, device)
               for name, fn in methods.items()}
    naive_s, ref, _ = results["naive"]
    print(f"\n{'method':<8} {'median s':>9} {'pairs/s':>9} {'resp/s':>9} {'speed-up':>9} {'tokens':>9} {'max|Δr|':>9}")
    for name, (sec, scores, tokens) in results.items():
        diff = (torch.tensor(scores) - torch.tensor(ref)).abs().max().item()
        print(f"{name:<8} {sec:>9.3f} {n_pairs / sec:>9.1f} {len(scores) / sec:>9.1f} "
              f"{naive_s / sec:>8.2f}x {tokens:>9} {diff:>9.2e}")


if __name__ == "__main__":
    main()
