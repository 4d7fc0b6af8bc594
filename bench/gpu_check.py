"""The GPU check: one command, run first whenever a GPU is lent, that prints one table.

    python bench/gpu_check.py                     # on the GPU machine (CUDA), at most ~5 minutes
    python bench/gpu_check.py --device cpu        # everything a CPU can run (a CI test runs this)

Written for the GPU machine as it is: it cannot install packages, its torch and triton may be
older than ours, and the real SmolLM2 weights do not travel there. So this imports only torch
(and jinja2, which torch requires), triton, numpy, safetensors, sentencepiece and einops
(transformers and tokenizers when present), uses random weights at SmolLM2's shape, and prints
what it skipped and why.

Checks, in order:
  1. kernels   the Triton kernels against their PyTorch references, outputs and every gradient, odd
               shapes: compiled on CUDA (fp32 and bf16); the interpreter on CPU (fp32, small shapes).
  2. speed     on CUDA, the fused pairwise loss and the log-prob kernel against the naive paths at
               Llama-7B's shape (N 16, T 2048, D 4096, bf16): ms, the ratio to naive, and the bytes
               moved against the copy bandwidth measured in the same run (targets: forward >= 5x
               naive; forward + backward >= 80% of copy bandwidth). Reported, not failed; but the
               log-prob paths must agree (bench_logprobs' limit), or the timings mean nothing.
  3. rm step   one reward-model training step at SmolLM2's shape (30 x 576, GQA 9/3, vocab 49,152),
               rmlab against transformers' LlamaForSequenceClassification with the same weights and
               batch (bf16 autocast on CUDA, fp32 on CPU at 2 layers): losses agree, median ms side by
               side, and rmlab's speed-up (transformers' ms / rmlab's; above 1x rmlab is faster).
  4. pipeline  the tiny default pipeline of train.py (tokenizer, lm, rm, reward, ppo) on the device,
               as a subprocess: it must finish and write report.json.
Exit status: 1 if any correctness check failed (a mismatch, a crash), else 0.
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch                    # torch.cuda.is_available() does not import triton; kernels/ does
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.cli import OneLineParser, comma_choices, device_flag, resolve_device  # noqa: E402

CHECKS = ("kernels", "speed", "rm_step", "pipeline")
parser = OneLineParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
parser.add_argument("--device", type=device_flag, default="auto", help="auto: cuda when available, else cpu")
parser.add_argument("--skip", type=comma_choices(CHECKS, empty_ok=True), default="",
                    help=f"comma list of checks to skip: {','.join(CHECKS)}")
args = parser.parse_args()
DEVICE = resolve_device(args.device)
if DEVICE.type == "cuda":
    torch.cuda.set_device(DEVICE)      # Triton launches and synchronize() act on the current device
if DEVICE.type == "cpu":
    # The kernels run in Triton's interpreter on CPU; the variable must be set before triton is
    # imported (by kernels/, below), and set to 1 whatever the environment said.
    os.environ["TRITON_INTERPRET"] = "1"

from kernels import pairwise_margin_loss, token_logprobs  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402

GPU = DEVICE.type == "cuda"
ROWS = []      # (check, what, result, ok: True / False / None for "reported only")


def row(check, what, result, ok):
    ROWS.append((check, what, result, ok))
    mark = {True: "ok", False: "FAIL", None: "-"}[ok]
    print(f"  {check:9s} {what:52s} {result:42s} {mark}", flush=True)


def max_err(a, b):
    return float((a.detach().float() - b.detach().float()).abs().max()) if a.numel() else 0.0


# ---- 1. kernels against their references ------------------------------------------------------

def check_pairwise(N, T, D, dtype, tol):
    g = torch.Generator(device=DEVICE).manual_seed(N * T + D)
    h = torch.randn(N, T, D, device=DEVICE, generator=g).to(dtype)
    end_idx = torch.arange(N, device=DEVICE) * T + torch.randint(1, T, (N,), device=DEVICE, generator=g)
    end_idx[-1] = end_idx[0]                                   # a duplicated position: its gradient sums
    pairs = torch.stack([torch.arange(N - 1), torch.arange(1, N)], 1).to(DEVICE)
    w = (torch.randn(D, device=DEVICE, generator=g) / D ** 0.5).to(dtype)
    b = torch.randn(1, device=DEVICE, generator=g).to(dtype)
    gamma = (1 + 0.1 * torch.randn(D, device=DEVICE, generator=g)).to(dtype)
    margin, weight = torch.rand(N - 1, device=DEVICE, generator=g), torch.rand(N - 1, device=DEVICE, generator=g) + 0.5
    outs = {}
    for impl in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (h, w, b, gamma)]
        out = pairwise_margin_loss(leaves[0], end_idx, leaves[1], leaves[2], pairs, margin, weight,
                                   norm_weight=leaves[3], impl=impl)
        (out.loss + 0.1 * out.rewards.sum()).backward()
        outs[impl] = [out.loss, out.rewards] + [t.grad for t in leaves]
    errs = [max_err(a, b) / max(1.0, float(b.abs().max())) for a, b in zip(outs["triton"], outs["reference"])]
    name = f"pairwise_margin_loss {N}x{T}x{D} {str(dtype)[6:]}"
    row("kernels", name, f"max rel err {max(errs):.1e} (loss, r, dh, dw, db, dγ)", max(errs) <= tol)


def check_logprobs(N, V, D, dtype, tol):
    g = torch.Generator(device=DEVICE).manual_seed(N + V + D)
    h = torch.randn(N, D, device=DEVICE, generator=g).to(dtype)
    W = (torch.randn(V, D, device=DEVICE, generator=g) / D ** 0.5).to(dtype)
    targets = torch.randint(0, V, (N,), device=DEVICE, generator=g)
    targets[::5] = -100                                         # ignored positions
    outs = {}
    for impl in ("triton", "reference"):
        hh, ww = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
        logp = token_logprobs(hh, ww, targets, impl=impl)
        (logp * torch.linspace(0.5, 1.5, N, device=DEVICE)).sum().backward()
        outs[impl] = [logp, hh.grad, ww.grad]
    errs = [max_err(a, b) / max(1.0, float(b.abs().max())) for a, b in zip(outs["triton"], outs["reference"])]
    row("kernels", f"token_logprobs {N}x{V}x{D} {str(dtype)[6:]}", f"max rel err {max(errs):.1e} (logp, dh, dW)",
        max(errs) <= tol)


def check_kernels():
    dtypes = [(torch.float32, 1e-4)] + ([(torch.bfloat16, 2e-2)] if GPU else [])
    pair_shapes = [(5, 37, 123), (6, 129, 1000)] if GPU else [(5, 7, 33)]
    logp_shapes = [(37, 1001, 123), (300, 32000, 512)] if GPU else [(7, 101, 33)]
    for dtype, tol in dtypes:
        for shape in pair_shapes:
            check_pairwise(*shape, dtype, tol)
        for shape in logp_shapes:
            check_logprobs(*shape, dtype, tol)


# ---- 2. speed of the fused kernels at Llama-7B's shape ------------------------------------------

def check_speed():
    if not GPU:
        row("speed", "fused kernels at Llama-7B's shape", "skipped: no GPU (CPU times say nothing)", None)
        return
    from bench import bench_logprobs, bench_pairwise_loss
    impls = {"naive": bench_pairwise_loss.naive, "fused": bench_pairwise_loss.fused}
    rows, copy = bench_pairwise_loss.run_case(16, 2048, 4096, torch.bfloat16, DEVICE, impls)
    ms = {(r["impl"], r["mode"]): r for r in rows}
    fwd = ms["naive", "fwd"]["ms"] / ms["fused", "fwd"]["ms"]
    row("speed", "pairwise fwd, fused vs naive (target >= 5x)", f"{ms['fused', 'fwd']['ms']:.3f} ms, {fwd:.1f}x", None)
    both = ms["fused", "fwd+bwd"]
    frac = both["minimum"] / both["ms"] / 1e6 / copy
    row("speed", "pairwise fwd+bwd vs copy bandwidth (target >= 80%)",
        f"{both['ms']:.3f} ms, {100 * frac:.0f}% of {copy:.0f} GB/s", None)
    lp_impls = {"unfused": bench_logprobs.unfused, "fused": bench_logprobs.fused}
    for r in bench_logprobs.run_case(2048, 32000, 4096, torch.bfloat16, DEVICE, lp_impls):
        if "check" in r:       # an agreement row: the timings mean nothing if the paths disagree
            row("speed", f"token_logprobs max |logp - unfused|: {r['check']}",
                f"{r['err']:.1e} (limit {r['tol']:.0e})", r["err"] <= r["tol"])
        else:
            row("speed", f"token_logprobs T2048 V32000 {r['mode']} {r['impl']}", f"{r['ms']:.3f} ms", None)


# ---- 3. one RM training step at SmolLM2's shape, rmlab and transformers ---------------------------

def check_rm_step():
    try:
        import transformers
    except ImportError:
        transformers = None
    layers = 30 if GPU else 2
    cfg = LlamaConfig(dim=576, n_layers=layers, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                      rope_theta=1e5, max_seq_len=2048, tie_embeddings=True)
    torch.manual_seed(0)
    model = Llama(cfg, head="reward").to(DEVICE)
    N, T = (16, 512) if GPU else (4, 32)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (N, T), device=DEVICE, generator=g)
    lengths = torch.randint(T // 2, T + 1, (N,), device=DEVICE, generator=g)
    mask = (torch.arange(T, device=DEVICE)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)                                  # pad id 0
    end_idx = Llama.last_token_idx(mask)
    pairs = torch.arange(N, device=DEVICE).view(-1, 2)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=GPU)

    def ours():
        with autocast:
            h = model.trunk(ids, mask, final_norm=False)
            out = pairwise_margin_loss(h, end_idx, model.head.weight[0], model.head.bias[0], pairs,
                                       norm_weight=model.norm.weight, eps=cfg.norm_eps)
        out.loss.backward()
        return float(out.loss)

    timings = {"rmlab": timed(ours)}
    loss = ours()
    what = f"RM step {layers}x576, {N}x{T}, {'bf16' if GPU else 'fp32'}"
    if transformers is None:
        row("rm_step", what, f"rmlab {timings['rmlab']:.1f} ms; transformers not installed", None)
        return
    from model.checkpoint import export_hf
    with tempfile.TemporaryDirectory() as d:
        hf = transformers.LlamaForSequenceClassification.from_pretrained(export_hf(model, d), dtype=torch.float32)
    hf = hf.to(DEVICE)
    hf.config.pad_token_id = 0

    def theirs():
        with autocast:
            r = hf(ids, attention_mask=mask).logits[:, 0].float() + model.head.bias.float()
            hf_loss = -F.logsigmoid(r[pairs[:, 0]] - r[pairs[:, 1]]).mean()
        hf_loss.backward()
        return float(hf_loss)

    timings["transformers"] = timed(theirs)
    diff = abs(theirs() - loss)
    ok = diff <= (2e-2 if GPU else 1e-4)
    row("rm_step", what + ": |loss - transformers'|", f"{diff:.1e}", ok)
    # speed-up = transformers' ms / rmlab's ms: above 1x, rmlab's step is the faster
    row("rm_step", what + ": ms, rmlab / transformers",
        f"{timings['rmlab']:.1f} / {timings['transformers']:.1f}, rmlab speed-up "
        f"{timings['transformers'] / timings['rmlab']:.2f}x", None)


def timed(fn, reps=5 if GPU else 3):
    """Median ms of `reps` calls after a warm-up; an odd count, so the median is one of the times."""
    fn()                                              # warm-up (and cuDNN / autotune choices)
    times = []
    for _ in range(reps):
        if GPU:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if GPU:
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


# ---- 4. the tiny default pipeline on the device ---------------------------------------------------

PIPELINE_FLAGS = ["--builtin-prompts", "200", "--lm-steps", "20", "--lm-batch", "8", "--epochs", "0.2",
                  "--preset", "tiny", "--threads", "1", "--max-len", "64",
                  "--stages", "tokenizer,lm,rm,reward,ppo", "--ppo-iters", "2", "--ppo-eval-prompts", "8"]


def check_pipeline():
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--device", str(DEVICE), "--out", out] + PIPELINE_FLAGS
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        ok = proc.returncode == 0 and os.path.isfile(os.path.join(out, "report.json"))
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:60]
        row("pipeline", f"train.py tiny, all stages, --device {DEVICE}",
            f"exit {proc.returncode} in {time.time() - start:.0f} s" + ("" if ok else f": {tail}"), ok)


def main():
    versions = f"torch {torch.__version__}"
    try:
        import triton
        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    name = torch.cuda.get_device_name(DEVICE) if GPU else "CPU (Triton interpreter for the kernels)"
    print(f"gpu_check on {name}; {versions}; {time.strftime('%Y-%m-%d')}")
    skip = set(args.skip)
    for check, fn in zip(CHECKS, (check_kernels, check_speed, check_rm_step, check_pipeline)):
        if check in skip:
            row(check, "skipped by --skip", "", None)
            continue
        try:
            fn()
        except Exception as e:                     # one broken check must not hide the others
            row(check, "crashed", f"{type(e).__name__}: {str(e)[:60]}", False)
            traceback.print_exc()
    failed = [r for r in ROWS if r[3] is False]
    print(f"{len(ROWS)} rows, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
