"""The bench scripts' flags: a bad value ends at parse time in one line, "script.py: error: ...", exit 2
(data/cli.py's OneLineParser), never in a traceback after minutes of work."""
import os
import subprocess
import sys

import pytest

from bench import (build_report, bench_features, bench_logprobs, bench_packing, bench_pairwise_loss, bench_score,
                   bench_train, bench_vs_hf)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD = [
    (bench_logprobs, ["--D", "0"], "--D"),                    # was silently D = 256
    (bench_logprobs, ["--T", "-3"], "--T"),
    (bench_pairwise_loss, ["--bogus"], "unrecognized"),
    (bench_train, ["--threads", "-1"], "--threads"),
    (bench_train, ["--matmul-n", "-5"], "--matmul-n"),
    (bench_train, ["--lr", "-1"], "--lr"),
    (bench_train, ["--configs", ","], "--configs"),           # was an empty table, exit 0
    (bench_score, ["--repeats", "0"], "--repeats"),
    (bench_score, ["--device", "foo"], "--device"),
    (bench_score, ["--preset", "foo"], "--preset"),
    (bench_score, ["--max-len", "-1"], "--max-len"),
    (bench_score, ["--data", "/nonexistent.jsonl"], "--data"),
    (bench_score, ["--rm", "/nonexistent"], "--rm"),
    (bench_vs_hf, ["--shapes", "foo"], "--shapes"),           # was the default preset, labelled foo
    (bench_vs_hf, ["--dtypes", "fp16"], "--dtypes"),          # was fp32, labelled fp16
    (bench_vs_hf, ["--max-len", "5"], "--max-len"),
    (bench_vs_hf, ["--pairs", "5000"], "--pairs"),
    (bench_features, ["--train-layers", "foo"], "--train-layers"),
    (bench_features, ["--pairs", "0"], "--pairs"),
    (bench_packing, ["--max-len", "0"], "--max-len"),
    (bench_packing, ["--hh", "/nonexistent"], "--hh"),
    (build_report, ["--jsn"], "unrecognized"),                # was argparse's usage block
]


def one_line_error(capsys, parse, argv, prog):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    return err


@pytest.mark.parametrize("module, argv, flag", BAD, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_a_bad_flag_is_one_line_and_exit_2(capsys, module, argv, flag):
    err = one_line_error(capsys, module.parse_args, argv, os.path.basename(module.__file__))
    assert flag in err


def test_triton_kernel_on_a_cpu_needs_the_interpreter(capsys, monkeypatch):
    monkeypatch.setattr(bench_train.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)                  # conftest turns it on
    assert "TRITON_INTERPRET" in one_line_error(capsys, bench_train.parse_args, ["--kernel", "triton"],
                                                "bench_train.py")


def test_comma_lists_drop_empty_entries():
    args = bench_vs_hf.parse_args(["--shapes", "default,", "--dtypes", "fp32,,fp32"])
    assert (args.shapes, args.dtypes) == (["default"], ["fp32"])


def test_gpu_check_rejects_an_unknown_check_before_importing_kernels():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--skip", "rm-step"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("gpu_check.py: error: argument --skip: unknown 'rm-step'"), proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
