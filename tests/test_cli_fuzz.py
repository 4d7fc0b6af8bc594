"""The command lines, fuzzed: any argv ends as a valid config or as one line on stderr, exit 2.

Only the argument parsing and validation run (no model is loaded), so this takes seconds.
"""
import contextlib
import io

import pytest
from hypothesis import given, settings, strategies as st

import score

NUMBERS = st.one_of(st.integers(-10, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                    st.sampled_from(["", "abc", "1e-6", "0x10", "--", "-1", "nan", "inf", "3.5"]))
SCORE_FLAGS = {"--rm": st.sampled_from(["runs/x", ""]), "--device": st.sampled_from(["auto", "cpu", "cuda", "meta",
                                                                                      "foo", "cuda:7", ""]),
               "--dtype": st.sampled_from(["auto", "fp32", "bf16", "fp16"]), "--max-len": NUMBERS,
               "--batch-tokens": NUMBERS, "--layout": st.sampled_from(["packed", "padded", "dense"]),
               "--data": st.sampled_from(["x.jsonl", "safety=x.jsonl", "-"]), "--safety-rm": st.just("a"),
               "--helpful-rm": st.just("b"), "--skip-bad": st.none(), "--verbatim": st.none()}


@st.composite
def argvs(draw, flags):
    argv = []
    for flag in draw(st.lists(st.sampled_from(sorted(flags)), max_size=6)):
        value = draw(flags[flag])
        argv += [flag] if value is None else [flag, value]
    return argv + draw(st.lists(st.sampled_from(["a prompt", "resp", "--bogus"]), max_size=3))


def parse_or_one_line(parse, argv, prog="score.py"):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parse(argv), ""
        except SystemExit as e:
            assert e.code == 2, (argv, err.getvalue())
    text = err.getvalue()
    assert len(text.strip().splitlines()) == 1 and "Traceback" not in text, (argv, text)
    assert text.startswith(f"{prog}: error: ")
    return None, text


@settings(max_examples=300, deadline=None)
@given(argvs(SCORE_FLAGS))
def test_score_py_command_lines(argv):
    args, _ = parse_or_one_line(score.parse_args, argv)
    if args is not None:                         # accepted: every value is in its range
        assert args.batch_tokens >= 1 and (args.max_len == 0 or args.max_len >= 3)
        assert args.device in ("auto", "cpu") and args.layout in ("packed", "padded")


@pytest.mark.parametrize("argv, needle", [
    (["--rm", "r", "--device", "foo", "p", "r"], "argument --device: 'foo' is not a device"),
    (["--rm", "r", "--device", "meta", "p", "r"], "argument --device: 'meta'"),
    (["--rm", "r", "--batch-tokens", "0", "p", "r"], "argument --batch-tokens: 0 is not a positive int"),
    (["--rm", "r", "--max-len", "2", "p", "r"], "argument --max-len: 2 leaves no room"),
    (["--rm", "r", "--max-len", "-1", "p", "r"], "argument --max-len: -1 is not an int >= 0"),
])
def test_score_py_bad_flags_name_flag_and_value(argv, needle):
    _, text = parse_or_one_line(score.parse_args, argv)
    assert needle in text
