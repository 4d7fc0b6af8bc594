"""Compile every Triton kernel of the project for real GPUs, on any machine, and report.

    python bench/build_report.py            # a table
    python bench/build_report.py --json     # one JSON list, for tests and bench/

A GPU is not needed: triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))
runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for sm_80 and sm_90.
`cuobjdump -res-usage` (shipped in Triton's wheel) then reads registers, stack and local
memory off the cubin (spills show up as STACK/LOCAL bytes), and the PTX shows how wide
the global loads are (ld.global.v4 of 32-bit words is one 128-bit LDG.E.128 in SASS).

Run it WITHOUT TRITON_INTERPRET=1: under the interpreter @triton.jit returns an interpreted
function that ASTSource cannot compile. The main() below refuses to run in that case.

The manifest: SPECS maps each kernel module to a function

    specs(dtype: str) -> list of (name, jit_fn, signature, constexprs, options)

with dtype "fp32" or "bf16", triton 3.9 signatures ({"x_ptr": "*bf16", "n": "i32",
"BLOCK": "constexpr"}) and constexprs ({"BLOCK": 256}). The options dict may hold
  aligned:      integer arguments to compile as multiples of 16 (the JIT specializes such
                values at launch; e.g. D = 4096 and row strides), so loads can vectorize;
  num_warps:    what the launcher uses (default 4);
  hidden_loads: True if the kernel streams hidden states, so 128-bit loads are expected.
Pointer arguments are always compiled as 16-byte aligned, as torch allocations are.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.cli import OneLineParser  # noqa: E402
from kernels import logprobs, pairwise_loss  # noqa: E402

ARCHS = (80, 90)
DTYPES = ("fp32", "bf16")


# ----------------------------------------------------------------------------------------
# The manifest: every kernel with the signature and tiles it is launched with.

def pairwise_specs(dtype: str):
    """Pointers are 16-byte aligned (as torch allocations are); the options name the integer
    arguments that are multiples of 16 at Llama shapes (D = 4096, the strides), which the JIT
    would specialize at launch too, so the report shows the loads a real run gets."""
    hidden = {"h_ptr": f"*{dtype}", "end_idx_ptr": "*i64", "w_ptr": f"*{dtype}"}
    fwd = {**hidden, "b_ptr": f"*{dtype}", "norm_w_ptr": f"*{dtype}",
           "rewards_ptr": "*fp32", "rstd_ptr": "*fp32", "dot_ptr": "*fp32",
           "T": "i32", "D": "i32", "stride_hn": "i32", "stride_ht": "i32", "eps": "fp32",
           "HAS_BIAS": "constexpr", "HAS_NORM": "constexpr", "BLOCK_D": "constexpr"}
    pair = {"rewards_ptr": "*fp32", "pairs_ptr": "*i64", "margin_ptr": "*fp32",
            "pair_weight_ptr": "*fp32", "loss_ptr": "*fp32", "z_ptr": "*fp32", "dz_ptr": "*fp32",
            "correct_ptr": "*i8", "tie_ptr": "*i8", "P": "i32", "BLOCK_P": "constexpr", "SUM": "constexpr"}
    scan = {"end_idx_ptr": "*i64", "grad_rewards_ptr": "*fp32", "pair_pos_ptr": "*i64",
            "dz_ptr": "*fp32", "g_ptr": "*fp32", "owner_ptr": "*i8", "R": "i32", "P": "i32",
            "BLOCK": "constexpr"}
    bwd = {**hidden, "norm_w_ptr": f"*{dtype}", "g_ptr": "*fp32", "owner_ptr": "*i8",
           "rstd_ptr": "*fp32", "dot_ptr": "*fp32", "dh_ptr": f"*{dtype}",
           "dw_part_ptr": "*fp32", "dnorm_part_ptr": "*fp32",
           "R": "i32", "T": "i32", "D": "i32", "stride_hn": "i32", "stride_ht": "i32",
           "WRITE_DH": "constexpr", "HAS_NORM": "constexpr",
           "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"}
    fwd_options = {"aligned": ["D", "stride_hn", "stride_ht"], "num_warps": pairwise_loss.FWD_WARPS,
                   "hidden_loads": True}
    bwd_options = {**fwd_options, "num_warps": pairwise_loss.BWD_WARPS}
    specs = [
        ("pairwise_pair_loss", pairwise_loss._pair_loss_kernel, pair,
         {"BLOCK_P": pairwise_loss.PAIR_BLOCK, "SUM": False}, {}),
        ("pairwise_reward_grad", pairwise_loss._reward_grad_kernel, scan,
         {"BLOCK": pairwise_loss.SCAN_BLOCK}, {}),
    ]
    for has_norm, suffix in ((True, ""), (False, "_nonorm")):   # with and without the final RMSNorm
        specs += [
            ("pairwise_rewards_fwd" + suffix, pairwise_loss._rewards_fwd_kernel, fwd,
             {"HAS_BIAS": True, "HAS_NORM": has_norm, "BLOCK_D": pairwise_loss.FWD_BLOCK_D}, fwd_options),
            ("pairwise_hidden_grad" + suffix, pairwise_loss._hidden_grad_kernel, bwd,
             {"WRITE_DH": True, "HAS_NORM": has_norm, "BLOCK_R": pairwise_loss.BWD_BLOCK_R,
              "BLOCK_D": pairwise_loss.BWD_BLOCK_D}, bwd_options),
        ]
    return specs


def logprobs_specs(dtype: str):
    """D and vocab_per_split are multiples of 16 at real shapes (the JIT specializes them at
    launch), so the build sees the alignment a real run gets. The h and W tiles reach shared
    memory through cp.async, 16 bytes per copy (pipelined for tl.dot)."""
    tiles = dict(logprobs.TILES[{"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]])
    options = {"aligned": ["D", "vocab_per_split"], "num_warps": tiles.pop("num_warps"),
               "hidden_loads": True}
    tile_sig = {name: "constexpr" for name in tiles}
    inputs = {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "target_ptr": "*i64"}
    scalars = {"inv_temperature": "fp32", "ignore_index": "i32"}
    fwd = {**inputs, "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "part_target_ptr": "*fp32",
           "N": "i32", "V": "i32", "D": "i32", "vocab_per_split": "i32", **scalars, **tile_sig}
    bwd = {**inputs, "lse_ptr": "*fp32", "grad_ptr": "*fp32"}
    bwd_sizes = {"N": "i32", "V": "i32", "D": "i32", **scalars, **tile_sig}
    return [
        ("logprobs_fwd", logprobs._logprobs_fwd_kernel, fwd, tiles, options),
        ("logprobs_bwd_dh", logprobs._logprobs_bwd_dh_kernel, {**bwd, "dh_ptr": "*fp32", **bwd_sizes},
         tiles, options),
        ("logprobs_bwd_dw", logprobs._logprobs_bwd_dw_kernel, {**bwd, "dw_ptr": "*fp32", **bwd_sizes},
         tiles, options),
    ]


SPECS = {"kernels.pairwise_loss": pairwise_specs, "kernels.logprobs": logprobs_specs}


# ----------------------------------------------------------------------------------------
# Compile and inspect.

def _cuobjdump():
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path} (it ships with Triton's NVIDIA backend)")
    return path


def compile_spec(fn, signature, constexprs, options, cap):
    """Returns the CompiledKernel for one spec on sm_{cap}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    aligned = set(options.get("aligned", ()))
    attrs = {}
    for index, arg in enumerate(fn.arg_names):
        kind = signature.get(arg)
        if kind is None:
            raise ValueError(f"signature of {fn.__name__} lacks argument {arg!r}")
        if kind.startswith("*") or arg in aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", cap, 32),
                          options={"num_warps": options.get("num_warps", 4)})


def resource_usage(cubin: bytes):
    """Registers, stack, shared and local memory of a one-kernel cubin (cuobjdump -res-usage)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    usage = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    if "reg" not in usage:
        raise RuntimeError(f"could not parse cuobjdump -res-usage output:\n{res}")
    return dict(regs=usage["reg"], stack=usage["stack"], local=usage["local"], shared=usage["shared"])


def global_loads(ptx: str):
    """Counts global loads in PTX and how many move 128 bits per thread: ld.global.v4.b32 (and
    the like), cp.async copies of 16 bytes into shared memory (what tl.dot pipelines emit), and
    TMA bulk copies (cp.async.bulk, always wide)."""
    widths = []
    for quals in re.findall(r"\bld\.global((?:\.\w+)+)", ptx):
        vec = re.search(r"\.v(\d)\b", quals)
        bits = re.search(r"\.[bfsu](\d+)\b", quals)
        widths.append((int(vec.group(1)) if vec else 1) * (int(bits.group(1)) if bits else 0))
    for size in re.findall(r"\bcp\.async\.c[ag]\.shared\.global[^;]*?\],\s*(0x[0-9a-fA-F]+|\d+)", ptx):
        widths.append(8 * int(size, 0))
    widths += [128] * len(re.findall(r"\bcp\.async\.bulk\b", ptx))
    return dict(ld128=sum(w >= 128 for w in widths), ld_total=len(widths))


def _compile_and_inspect(fn, signature, constexprs, options, cap):
    kernel = compile_spec(fn, signature, constexprs, options, cap)
    return dict(cubin_bytes=len(kernel.asm["cubin"]), **resource_usage(kernel.asm["cubin"]),
                **global_loads(kernel.asm["ptx"]))


def build_report(archs=ARCHS, dtypes=DTYPES, workers=2):
    """Returns one row per kernel x arch x dtype."""
    rows, jobs = [], {}
    with ThreadPoolExecutor(workers) as pool:   # ptxas and cuobjdump run as subprocesses
        for module_name, specs in SPECS.items():
            for dtype in dtypes:
                for name, fn, signature, constexprs, options in specs(dtype):
                    for cap in archs:
                        # a kernel whose signature does not depend on dtype compiles once
                        key = (module_name, name, cap, json.dumps(signature, sort_keys=True),
                               json.dumps(constexprs, sort_keys=True, default=str))
                        if key not in jobs:
                            jobs[key] = pool.submit(_compile_and_inspect, fn, signature, constexprs,
                                                    options, cap)
                        rows.append((dict(module=module_name, kernel=name, arch=f"sm_{cap}", dtype=dtype,
                                          hidden_loads=bool(options.get("hidden_loads", False)),
                                          num_warps=options.get("num_warps", 4)), jobs[key]))
        return [dict(row, **job.result()) for row, job in rows]


def format_table(rows):
    lines = [f"{'kernel':28s} {'arch':6s} {'dtype':5s} {'regs':>4s} {'stack':>5s} {'local':>5s} "
             f"{'ld128/all':>9s}  hidden-state loads"]
    for r in rows:
        wide = "" if not r["hidden_loads"] else ("128-bit" if r["ld128"] else "NOT 128-bit")
        lines.append(f"{r['kernel']:28s} {r['arch']:6s} {r['dtype']:5s} {r['regs']:4d} {r['stack']:5d} "
                     f"{r['local']:5d} {str(r['ld128']) + '/' + str(r['ld_total']):>9s}  {wide}")
    return "\n".join(lines)


def run_subprocess(timeout=600):
    """Runs this script in a clean subprocess (no TRITON_INTERPRET) and returns its rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"bench/build_report.py failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def parse_args(argv=None):
    parser = OneLineParser(prog="build_report.py", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench/build_report.py: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # 3.9's default, stated to silence its warning
    rows = build_report()
    print(json.dumps(rows) if args.json else format_table(rows))


if __name__ == "__main__":
    main()
