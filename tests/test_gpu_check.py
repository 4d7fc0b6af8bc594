"""bench/gpu_check.py in its CPU mode, so the script a lent GPU runs first cannot rot before then."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_cpu_mode_passes_every_check():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # the script sets it itself
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    # Every check ran (the speed check is reported as skipped on a CPU), and none failed.
    for what in ("pairwise_margin_loss", "token_logprobs", "|loss - transformers'|", "train.py tiny, all stages"):
        assert any(what in line and line.rstrip().endswith("ok") for line in lines), proc.stdout
    assert lines[-1].endswith(", 0 failed")


# check_speed's table code fed bench_logprobs.run_case's real row shapes (timings, then one agreement
# row per path), without the GPU it needs: no KeyError on the agreement rows, which are shown and
# fail beyond the bench's limit.
FAKE_SPEED_RUN = """
import sys
sys.argv = ["gpu_check.py", "--device", "cpu"]
sys.path.insert(0, {bench!r})
import gpu_check
from bench import bench_logprobs, bench_pairwise_loss
pair_rows = [dict(mode=m, impl=i, ms=1.0, minimum=1e6) for m in ("fwd", "fwd+bwd") for i in ("naive", "fused")]
bench_pairwise_loss.run_case = lambda *a: (pair_rows, 100.0)
bench_logprobs.run_case = lambda *a: ([dict(mode=m, impl=i, ms=1.0, peak=0) for m in ("fwd", "fwd+bwd")
                                       for i in ("unfused", "fused")]
                                      + [dict(check="unfused", err=0.0, tol=0.05), dict(check="fused", err=0.5, tol=0.05)])
gpu_check.GPU = True
gpu_check.check_speed()
"""


def test_speed_table_shows_the_agreement_rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", FAKE_SPEED_RUN.format(bench=os.path.join(ROOT, "bench"))],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    agree = [line.rstrip() for line in proc.stdout.splitlines() if "max |logp - unfused|" in line]
    assert len(agree) == 2, proc.stdout
    assert "|: unfused " in agree[0] and agree[0].endswith("ok"), proc.stdout
    assert "|: fused " in agree[1] and "5.0e-01 (limit 5e-02)" in agree[1] and agree[1].endswith("FAIL"), proc.stdout
