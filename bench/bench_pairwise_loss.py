"""Benchmark: the pairwise reward loss three ways, forward and forward+backward.

    python bench/bench_pairwise_loss.py                 # the grid for this machine
    python bench/bench_pairwise_loss.py --no-compile-report

1. naive        the head on all N*T positions, then the gather, then the loss: what
                HF LlamaForSequenceClassification (score on every position, pooled at the
                last token) + TRL's RewardTrainer loss do.
2. gather-first the PyTorch reference of kernels/pairwise_loss.py: gather R rows, then the head.
3. fused        the Triton kernels (GPU only: on CPU the interpreter is a test tool, not a path
                worth timing).

Per case: median time (triton.testing.do_bench on a GPU, perf_counter on CPU), the bytes
each path moves and the minimum the op must move, achieved GB/s (minimum bytes / time)
against a device copy measured in the same run, and peak extra memory. Then the
compile report of every kernel (registers, spills, 128-bit loads), built for sm_80/sm_90.

The bytes model (e = bytes per element of h, R scored rows, N*T positions, D hidden size):
    naive fwd         reads N*T*D*e (the head on every position)       writes N*T rewards
    fused fwd         reads R*D*e (+ w, gamma): the minimum
    naive fwd+bwd     fwd + writes dh = rbar (x) w over N*T*D*e + reads N*T*D*e again for dw
    fused fwd+bwd     fwd + zero-fills dh (N*T*D*e) + reads R*D*e + writes R*D*e
Autograd wants a dense (N, T, D) gradient for h, so both paths write N*T*D*e in backward;
what fusion still saves is the two other full passes of the naive path (its forward read
and the dw read), so fwd+bwd should approach 3x at the bandwidth limit, and forward should
be bounded by launch latency, not bandwidth.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import copy_gbps, device_banner, median_ms, peak_bytes  # noqa: E402
from bench import build_report  # noqa: E402
from data.cli import OneLineParser  # noqa: E402
from kernels.pairwise_loss import pairwise_margin_loss  # noqa: E402

GIB = 2**30


# ----------------------------------------------------------------------------------------
# The three implementations, same arguments, same outputs (loss, rewards).

def naive(h, end_idx, w, b, pairs, margin, pair_weight):
    N, T, D = h.shape
    rewards_all = F.linear(h, w.view(1, D), b).view(N * T)      # (N*T,) head on every position
    rewards = rewards_all[end_idx].float()                      # (R,) pool at the last tokens
    z = rewards[pairs[:, 0]] - rewards[pairs[:, 1]] - margin
    loss = -(pair_weight * F.logsigmoid(z)).sum() / pair_weight.sum()
    return loss, rewards


def gather_first(h, end_idx, w, b, pairs, margin, pair_weight):
    return pairwise_margin_loss(h, end_idx, w, b, pairs, margin, pair_weight, impl="reference")[:2]


def fused(h, end_idx, w, b, pairs, margin, pair_weight):
    return pairwise_margin_loss(h, end_idx, w, b, pairs, margin, pair_weight, impl="triton")[:2]


# ----------------------------------------------------------------------------------------
# Inputs and the bytes model.

def make_inputs(N, T, D, dtype, device):
    """A right-padded batch, one response per row, pairs (0,1), (2,3), ..."""
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, T, D, device=device, dtype=dtype, generator=gen)
    lengths = torch.randint(T // 2, T + 1, (N,), device=device, generator=gen)
    end_idx = torch.arange(N, device=device) * T + lengths - 1                     # (R,) R = N
    pairs = torch.arange(N - N % 2, device=device).view(-1, 2)                      # (P, 2)
    P = pairs.shape[0]
    w = (torch.randn(D, device=device, generator=gen) / D**0.5).to(dtype)
    b = torch.zeros(1, device=device, dtype=dtype)
    margin = torch.zeros(P, device=device)
    pair_weight = torch.ones(P, device=device)
    return h, end_idx, w, b, pairs, margin, pair_weight


def bytes_model(N, T, D, R, e):
    """Bytes each path moves (hidden states and their gradient only; the vectors are noise)."""
    dense, rows = N * T * D * e, R * D * e
    return {
        ("naive", "fwd"): dense + N * T * e,
        ("naive", "fwd+bwd"): 3 * dense + N * T * e,
        ("gather-first", "fwd"): 3 * rows,                 # gather read + write, head read
        ("gather-first", "fwd+bwd"): 3 * rows + dense + 2 * rows,
        ("fused", "fwd"): rows,
        ("fused", "fwd+bwd"): rows + dense + 2 * rows,
        ("minimum", "fwd"): rows,
        ("minimum", "fwd+bwd"): rows + dense,               # read the rows once, write dense dh
    }


def print_7b_model():
    N, T, D, R, e = 16, 2048, 4096, 16, 2
    m = bytes_model(N, T, D, R, e)
    print(f"Bytes/FLOP model, Llama-7B shape: N={N} T={T} D={D} bf16, R={R} scored rows")
    print(f"  dense h or dh (N*T*D*e)        {N * T * D * e / 2**20:10.1f} MiB")
    print(f"  scored rows (R*D*e)            {R * D * e / 2**10:10.1f} KiB")
    for path in ("naive", "fused", "minimum"):
        print(f"  {path:8s} fwd {m[path, 'fwd'] / 2**20:10.2f} MiB   fwd+bwd {m[path, 'fwd+bwd'] / 2**20:10.2f} MiB")
    print(f"  FLOPs: naive fwd 2*N*T*D = {2 * N * T * D / 1e6:.0f} MFLOP, fused fwd 2*R*D = {2 * R * D / 1e3:.0f} kFLOP;"
          f" both ~{2 / e:.1f} FLOP/byte (a multiply and an add per element of h read): bandwidth- or"
          " latency-bound, never compute-bound")
    print(f"  fwd: naive moves {m['naive', 'fwd'] / m['fused', 'fwd']:.0f}x the bytes; the fused forward is"
          " launch-latency bound, so the target is >= 5x faster, not the byte ratio")
    print(f"  fwd+bwd: naive/fused bytes = {m['naive', 'fwd+bwd'] / m['fused', 'fwd+bwd']:.2f}x (the dense dh"
          " write both pay); target: fused fwd+bwd at >= 80% of copy bandwidth on its minimum bytes")
    print()


# ----------------------------------------------------------------------------------------

def run_case(N, T, D, dtype, device, impls):
    inputs = make_inputs(N, T, D, dtype, device)
    h, w, b = inputs[0], inputs[2], inputs[3]
    R = inputs[1].shape[0]
    e = h.element_size()
    model = bytes_model(N, T, D, R, e)
    copy = copy_gbps(N * T * D * e, device)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        for name, impl in impls.items():
            for t in (h, w, b):
                t.requires_grad_(mode == "fwd+bwd")
                t.grad = None
            if mode == "fwd":
                fn = lambda: impl(*inputs)
            else:
                fn = lambda: impl(*inputs)[0].backward()
            ms = median_ms(fn, device, grad_to_none=[h, w, b] if mode == "fwd+bwd" else None)
            for t in (h, w, b):
                t.grad = None
            peak = peak_bytes(fn, device)
            rows.append(dict(mode=mode, impl=name, ms=ms, moved=model[name, mode],
                             minimum=model["minimum", mode], peak=peak))
    for t in (h, w, b):
        t.requires_grad_(False)
        t.grad = None
    return rows, copy


def parse_args(argv=None):
    parser = OneLineParser(prog="bench_pairwise_loss.py", description=__doc__.splitlines()[0])
    parser.add_argument("--no-compile-report", action="store_true")
    return parser.parse_args(argv)


def main():
    args = parse_args()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    impls = {"naive": naive, "gather-first": gather_first}
    if gpu:
        impls["fused"] = fused
        grid = [(16, 2048, 4096, torch.bfloat16), (8, 1024, 4096, torch.bfloat16),
                (16, 2048, 8192, torch.bfloat16), (16, 512, 1024, torch.float32)]
    else:
        torch.set_num_threads(1)   # one thread: OpenMP barriers on shared cores make medians jumpy
        grid = [(2, 2048, 4096, torch.float32), (2, 2048, 4096, torch.bfloat16),
                (8, 512, 1024, torch.float32)]
    device_banner(gpu, "the table compares the two PyTorch paths.")
    print_7b_model()

    header = (f"{'N':>3s} {'T':>5s} {'D':>5s} {'dtype':8s} {'mode':8s} {'impl':13s} {'median ms':>10s} "
              f"{'vs naive':>8s} {'moved MiB':>10s} {'min MiB':>9s} {'GB/s(min)':>9s} {'%copy':>6s} {'peak MiB':>9s}")
    print(header)
    for N, T, D, dtype in grid:
        rows, copy = run_case(N, T, D, dtype, device, impls)
        naive_ms = {r["mode"]: r["ms"] for r in rows if r["impl"] == "naive"}
        for r in rows:
            gbps = r["minimum"] / r["ms"] / 1e6
            print(f"{N:3d} {T:5d} {D:5d} {str(dtype).replace('torch.', ''):8s} {r['mode']:8s} {r['impl']:13s} "
                  f"{r['ms']:10.3f} {naive_ms[r['mode']] / r['ms']:7.1f}x {r['moved'] / 2**20:10.2f} "
                  f"{r['minimum'] / 2**20:9.2f} {gbps:9.1f} {100 * gbps / copy:5.1f}% {r['peak'] / 2**20:9.2f}")
        print(f"{'':23s} device copy: {copy:.1f} GB/s (read+write of N*T*D*e)")
    print()

    if not args.no_compile_report:
        print("Compile report (triton.compile for sm_80/sm_90, cuobjdump -res-usage, PTX load widths):")
        print(build_report.format_table(build_report.run_subprocess()))


if __name__ == "__main__":
    main()
