"""Benchmark: token log-probs log π(a_t | ·) at V = 32000, T = 2048, peak memory and time.

    python bench/bench_logprobs.py            # the cases for this machine
    python bench/bench_logprobs.py --D 128    # a smaller hidden size on a slow CPU

1. unfused   (h @ W.T).float() / τ, log_softmax, gather: the (T, V) fp32 logits and their
             log_softmax exist in full (what a PPO loop written the plain way does).
2. chunked   the same per 256 rows under activation checkpointing: one (256, V) slab of
             logits at a time, recomputed in backward. The PyTorch way to get the kernel's
             memory without a kernel.
3. fused     kernels/logprobs.py through Triton (GPU only: on CPU the interpreter is a test
             tool, not a path worth timing).

The paths must agree, or the timings mean nothing: max |logp - unfused| within AGREE_NATS.

Per case: median time (triton.testing.do_bench on a GPU, perf_counter on CPU) and the peak
memory allocated beyond the inputs (torch.cuda.max_memory_allocated on a GPU; on CPU a
dispatch-mode tracker of live tensor storages), forward alone (no grad, as for π₀ and the
rollout log-probs) and forward+backward (as for π_θ in the PPO update).
"""
import os
import sys

import torch
import triton
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import device_banner, median_ms, peak_bytes  # noqa: E402
from data.cli import OneLineParser, positive_int  # noqa: E402
from kernels.logprobs import PROGRAMS_PER_SM, TILES, token_logprobs  # noqa: E402

MB = 1e6
CHUNK_ROWS = 256
# The most max |logp - unfused| (nats) another path may differ by. In bf16 the unfused path rounds
# its logits to bf16 (half an ulp is 0.016 at |logit| in [4, 8); 0.008 measured on CPU at T 512,
# V 32000, D 4096 against fp32 logits), the kernel keeps them in fp32; in fp32 only summation order differs.
AGREE_NATS = {torch.float32: 1e-3, torch.bfloat16: 5e-2}


# ----------------------------------------------------------------------------------------
# The three implementations: (h (T, D), weight (V, D), targets (T,), τ) -> logp (T,) fp32.

def unfused(h, weight, targets, temperature):
    logits = (h @ weight.T).float() / temperature                           # (T, V) fp32
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def chunked(h, weight, targets, temperature):
    parts = [checkpoint(unfused, h[i:i + CHUNK_ROWS], weight, targets[i:i + CHUNK_ROWS],
                        temperature, use_reentrant=False)
             for i in range(0, h.shape[0], CHUNK_ROWS)]
    return torch.cat(parts)


def fused(h, weight, targets, temperature):
    return token_logprobs(h, weight, targets, temperature, impl="triton")


# ----------------------------------------------------------------------------------------
# The memory and FLOP model.

def print_model(T, V, D):
    """Extra memory beyond the inputs and the gradients themselves, bf16 h and W."""
    unfused = {"fwd": 2 * T * V * 4, "fwd+bwd": 3 * T * V * 4 + T * V * 2}
    tiles = TILES[torch.bfloat16]
    splits = min(triton.cdiv(V, tiles["BLOCK_V"]),                 # the forward's S on an H100
                 triton.cdiv(PROGRAMS_PER_SM * 132, triton.cdiv(T, tiles["BLOCK_N"])))
    fused = {"fwd": 4 * T * (1 + 3 * splits), "fwd+bwd": (T + V) * D * 4}
    print(f"Memory/FLOP model at T={T}, V={V}, D={D}, bf16 h and W (extra beyond inputs and gradients):")
    print(f"  unfused: the T x V fp32 logits = {T * V * 4 / MB:.0f} MB, their log_softmax (same size, saved for"
          f" backward); in backward their fp32 gradient and its bf16 cast: forward {unfused['fwd'] / MB:.0f} MB,"
          f" fwd+bwd {unfused['fwd+bwd'] / MB:.0f} MB, growing as T x V")
    print(f"  chunked: the same for {CHUNK_ROWS} rows at a time: {(3 * 4 + 2) * CHUNK_ROWS * V / MB:.0f} MB")
    print(f"  fused:   forward: lse and the split partials (S = {splits} on an H100's 132 SMs), {fused['fwd'] / 1e3:.0f} kB;"
          f" fwd+bwd: the fp32 dh and dW accumulators, (T + V) x D x 4 = {fused['fwd+bwd'] / MB:.0f} MB"
          f" (none for fp32 inputs: they are the gradients), growing as (T + V) x D")
    for rows in (T, 4 * T, 16 * T):
        print(f"    {rows:6d} rows, fwd+bwd: unfused {(3 * 4 + 2) * rows * V / MB:7.0f} MB, fused {(rows + V) * D * 4 / MB:6.0f} MB")
    flops = 2 * T * V * D
    print(f"  FLOPs: forward {flops / 1e9:.0f} GFLOP on every path; fwd+bwd is 3x that unfused, 4x chunked"
          f" (one recompute), 5x fused (the dh and dW kernels each recompute the logits)")
    print()


# ----------------------------------------------------------------------------------------

def make_inputs(T, V, D, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(T, D, device=device, dtype=dtype, generator=gen)
    weight = (torch.randn(V, D, device=device, generator=gen) / D ** 0.5).to(dtype)
    targets = torch.randint(0, V, (T,), device=device, generator=gen)
    return h, weight, targets


def run_case(T, V, D, dtype, device, impls, temperature=1.0):
    h, weight, targets = make_inputs(T, V, D, dtype, device)
    rows = []
    results = {}
    for mode in ("fwd", "fwd+bwd"):
        for name, impl in impls.items():
            h.requires_grad_(mode == "fwd+bwd")
            weight.requires_grad_(mode == "fwd+bwd")
            if mode == "fwd":
                def fn():
                    with torch.no_grad():
                        return impl(h, weight, targets, temperature)
            else:
                def fn():
                    impl(h, weight, targets, temperature).sum().backward()
            if mode == "fwd":
                results[name] = fn()
            ms = median_ms(fn, device, grad_to_none=[h, weight] if mode == "fwd+bwd" else None, reps=5)
            h.grad = weight.grad = None
            peak = peak_bytes(fn, device)
            h.grad = weight.grad = None
            rows.append(dict(mode=mode, impl=name, ms=ms, peak=peak))
    # the paths must agree, or the timings mean nothing
    for name, logp in results.items():
        rows.append(dict(check=name, err=(logp - results["unfused"]).abs().max().item(), tol=AGREE_NATS[dtype]))
    return rows


def parse_args(argv=None):
    parser = OneLineParser(prog="bench_logprobs.py", description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=positive_int, default=2048, help="rows (tokens)")
    parser.add_argument("--V", type=positive_int, default=32000, help="vocabulary size")
    parser.add_argument("--D", type=positive_int, default=None, help="hidden size (default 4096 on GPU, 256 on CPU)")
    return parser.parse_args(argv)


def main():
    args = parse_args()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    impls = {"unfused": unfused, "chunked": chunked}
    if gpu:
        impls["fused"] = fused
        D = args.D if args.D is not None else 4096
        cases = [(torch.bfloat16, D), (torch.float32, D)]
    else:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        cases = [(torch.float32, args.D if args.D is not None else 256)]
    device_banner(gpu, "the table compares the unfused and chunked PyTorch paths,"
                       " and the model below says what the kernel holds.")
    print_model(args.T, args.V, 4096)

    print(f"{'T':>5s} {'V':>6s} {'D':>5s} {'dtype':9s} {'mode':8s} {'impl':8s} {'median ms':>10s} "
          f"{'vs unfused':>10s} {'peak MB':>9s}")
    for dtype, D in cases:
        rows = run_case(args.T, args.V, D, dtype, device, impls)
        base = {r["mode"]: r["ms"] for r in rows if r.get("impl") == "unfused"}
        for r in rows:
            if "check" in r:
                ok = "ok" if r["err"] <= r["tol"] else "FAIL: the paths disagree"
                print(f"{'':28s} max |logp - unfused| ({r['check']}): {r['err']:.2e} (limit {r['tol']:.0e}) {ok}")
                continue
            print(f"{args.T:5d} {args.V:6d} {D:5d} {str(dtype).replace('torch.', ''):9s} {r['mode']:8s} "
                  f"{r['impl']:8s} {r['ms']:10.1f} {base[r['mode']] / r['ms']:9.2f}x {r['peak'] / MB:9.1f}")


if __name__ == "__main__":
    main()
