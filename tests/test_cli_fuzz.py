"""The command lines, fuzzed: any argv ends as a valid config or as one line on stderr, exit 2.

Only the argument parsing and validation run (no model is loaded), so this takes seconds.
"""
import contextlib
import os
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


# ---- train.py ------------------------------------------------------------------------------------

import train  # noqa: E402

TRAIN_FLAGS = {"--lm-batch": NUMBERS, "--log-every": NUMBERS, "--builtin-prompts": NUMBERS, "--vocab-size": NUMBERS,
               "--max-len": NUMBERS, "--max-new-tokens": NUMBERS, "--epochs": NUMBERS, "--lm-steps": NUMBERS,
               "--batch-pairs": NUMBERS, "--warmup": NUMBERS, "--split": st.sampled_from(["0.9,0.05,0.05", "1,0,0",
               "0.5,0.5", "0.9,0.05,0.050001", "a,b,c"]), "--device": SCORE_FLAGS["--device"],
               "--stages": st.sampled_from(["tokenizer,lm", "rm", "nope", "", "ppo"]), "--ppo-group": NUMBERS,
               "--ppo-batch": NUMBERS, "--lam": NUMBERS, "--data": st.sampled_from(["no.jsonl", "/tmp"]),
               "--resume": st.none(), "--fsdp": st.none()}


def parse_train(argv):
    return train.parse_args(argv)[1]


@settings(max_examples=300, deadline=None)
@given(argvs(TRAIN_FLAGS))
def test_train_py_command_lines(argv):
    args, _ = parse_or_one_line(parse_train, [a for a in argv if a not in ("a prompt", "resp")], prog="train.py")
    if args is not None:
        assert min(args.lm_batch, args.log_every, args.builtin_prompts) >= 1
        assert min(args.lm_steps, args.batch_pairs) >= 0                    # 0: from the data's size
        assert args.epochs > 0 and args.rm_lr >= 0 and args.helpful_safety_share >= 0   # lr 0: by the batch
        assert 0 <= args.warmup <= 0.5 and args.vocab_size >= 260
        assert args.max_len >= 8 or (args.max_len == 0 and args.data)      # 0: fitted to the data in run()


@pytest.mark.parametrize("argv, needle", [
    (["--lm-batch", "0"], "argument --lm-batch: 0 is not a positive int"),
    (["--log-every", "0"], "argument --log-every: 0 is not a positive int"),
    (["--builtin-prompts", "-10"], "argument --builtin-prompts: -10 is not a positive int"),
    (["--vocab-size", "5"], "argument --vocab-size: 5 is not 0 or an int >= 260"),
    (["--vocab-size", "-1"], "argument --vocab-size: -1 is not 0 or an int >= 260"),
    (["--max-len", "2"], "argument --max-len: 2 leaves no room"),
    (["--max-len", "50"], "need >= 56"),                                   # --max-new-tokens 48 + 8
    (["--max-len", "10"], "argument --max-len: 10 leaves no room"),        # issue 14's "4 of 160 prompts"
    (["--device", "foo"], "argument --device: 'foo' is not a device"),
    (["--device", "meta"], "argument --device: 'meta'"),
    (["--device", "cpu:1"], "argument --device: cpu:1: the CPU has no devices to choose from"),
    (["--tokenizer", "/no/such.model"], "--tokenizer /no/such.model: no such file"),
    (["--out", __file__], "argument --out: "),
    (["--data", os.path.dirname(__file__)], "a directory, not a file"),
    (["--data", ","], "argument --data: ',' names no file"),
    (["--seed", str(2 ** 70)], "argument --seed: 1180591620717411303424 is not an int in (-2^62, 2^62)"),
    (["--threads", "100000"], "argument --threads: 100000 is not an int in [0, "),     # torch crashed on it
    (["--split", "0.9,0.05,0.050001"], "argument --split:"),
    (["--lm-steps", "-1"], "argument --lm-steps: -1 is not an int >= 0"),
    (["--lm-steps", "-5"], "argument --lm-steps: -5 is not an int >= 0"),
    (["--epochs", "0"], "argument --epochs: 0 is not a positive number"),
    (["--epochs", "-1"], "argument --epochs: -1 is not a positive number"),
    (["--batch-pairs", "-1"], "argument --batch-pairs: -1 is not an int >= 0"),
])
def test_train_py_bad_flags_name_flag_and_value(argv, needle):
    _, text = parse_or_one_line(parse_train, argv, prog="train.py")
    assert needle in text
