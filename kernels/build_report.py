"""Compile every Triton kernel of the project for real GPUs, on any machine, and report.

    python -m kernels.build_report            # a table
    python -m kernels.build_report --json     # one JSON list, for tests and bench/

A GPU is not needed: triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))
runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for sm_80 and sm_90.
`cuobjdump -res-usage` (shipped in Triton's wheel) then reads registers, stack and local
memory off the cubin (spills show up as STACK/LOCAL bytes), and the PTX shows how wide
the global loads are (ld.global.v4 of 32-bit words is one 128-bit LDG.E.128 in SASS).

Run it WITHOUT TRITON_INTERPRET=1: under the interpreter @triton.jit returns an interpreted
function that ASTSource cannot compile. The main() below refuses to run in that case.

The registry: a kernel module joins by being listed in MODULES and defining

    build_specs(dtype: str) -> list of (name, jit_fn, signature, constexprs[, options])

with dtype "fp32" or "bf16", triton 3.9 signatures ({"x_ptr": "*bf16", "n": "i32",
"BLOCK": "constexpr"}) and constexprs ({"BLOCK": 256}). The optional options dict may hold
  aligned:      integer arguments to compile as multiples of 16 (the JIT specializes such
                values at launch; e.g. D = 4096 and row strides), so loads can vectorize;
  num_warps:    what the launcher uses (default 4);
  hidden_loads: True if the kernel streams hidden states, so 128-bit loads are expected.
Pointer arguments are always compiled as 16-byte aligned, as torch allocations are.
Modules that cannot be imported yet are skipped and listed in the report.
"""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

MODULES = ["kernels.pairwise_loss", "kernels.logprobs"]
ARCHS = (80, 90)
DTYPES = ("fp32", "bf16")


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
        res = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
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


def build_report(modules=MODULES, archs=ARCHS, dtypes=DTYPES, workers=2):
    """Returns (rows, skipped): one row per kernel x arch x dtype, and the modules not importable."""
    rows, skipped, jobs = [], [], {}
    with ThreadPoolExecutor(workers) as pool:   # ptxas and cuobjdump run as subprocesses
        for module_name in modules:
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:
                skipped.append(f"{module_name}: {e}")
                continue
            for dtype in dtypes:
                for spec in module.build_specs(dtype):
                    name, fn, signature, constexprs = spec[:4]
                    options = spec[4] if len(spec) > 4 else {}
                    for cap in archs:
                        # a kernel whose signature does not depend on dtype compiles once
                        key = (module_name, name, cap, json.dumps(signature, sort_keys=True),
                               json.dumps(constexprs, sort_keys=True, default=str))
                        if key not in jobs:
                            jobs[key] = pool.submit(_compile_and_inspect, fn, signature, constexprs, options, cap)
                        rows.append((dict(module=module_name, kernel=name, arch=f"sm_{cap}", dtype=dtype,
                                          hidden_loads=bool(options.get("hidden_loads", False)),
                                          num_warps=options.get("num_warps", 4)), jobs[key]))
        rows = [dict(row, **job.result()) for row, job in rows]
    return rows, skipped


def format_table(rows, skipped):
    lines = [f"{'kernel':28s} {'arch':6s} {'dtype':5s} {'regs':>4s} {'stack':>5s} {'local':>5s} "
             f"{'ld128/all':>9s}  hidden-state loads"]
    for r in rows:
        wide = "" if not r["hidden_loads"] else ("128-bit" if r["ld128"] else "NOT 128-bit")
        lines.append(f"{r['kernel']:28s} {r['arch']:6s} {r['dtype']:5s} {r['regs']:4d} {r['stack']:5d} "
                     f"{r['local']:5d} {str(r['ld128']) + '/' + str(r['ld_total']):>9s}  {wide}")
    lines += [f"skipped {s}" for s in skipped]
    return "\n".join(lines)


def run_subprocess(timeout=600):
    """Runs this module in a clean subprocess (no TRITON_INTERPRET) and returns (rows, skipped)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "kernels.build_report", "--json"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"kernels.build_report failed:\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout)
    return report["rows"], report["skipped"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("kernels.build_report: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # 3.9's default, stated to silence its warning
    rows, skipped = build_report()
    print(json.dumps(dict(rows=rows, skipped=skipped)) if args.json else format_table(rows, skipped))


if __name__ == "__main__":
    main()
