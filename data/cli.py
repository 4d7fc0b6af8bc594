"""What the command lines of train.py, score.py and bench/ share: one-line errors and checked values.

    p = OneLineParser(...)             # a bad flag is one line, "prog: error: ...", exit code 2
    p.add_argument("--batch", type=positive_int)
    p.add_argument("--device", type=device_flag)

Each type raises argparse.ArgumentTypeError naming what is allowed; argparse adds the flag and
the value ("argument --batch: 0 is not a positive int").
"""
import argparse
import math
import os
import sys

import torch

from .records import SAFETY_TAGS, parse_data_spec
from .split import check_fractions

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse without the ~30-line usage block on an error: one line on stderr, exit 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, except None: there the help text says what the default depends on."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _number(text: str, kind, what: str, ok):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if isinstance(value, float) and not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"{text} is not {what}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "a positive int", lambda v: v >= 1)


def nonnegative_int(text: str) -> int:
    return _number(text, int, "an int >= 0", lambda v: v >= 0)


def seed_int(text: str) -> int:
    """A seed that every generator takes, also with the offsets added per rank and per use."""
    return _number(text, int, "an int in (-2^62, 2^62)", lambda v: abs(v) < 2 ** 62)


def thread_count(text: str) -> int:
    """0 (automatic) or at most this machine's cores: more threads than cores never help, and
    torch fails on a very large count."""
    return _number(text, int, f"an int in [0, {os.cpu_count()}] (0: automatic; this machine has "
                   f"{os.cpu_count()} cores)", lambda v: 0 <= v <= (os.cpu_count() or 1))


def vocab_size_flag(text: str) -> int:
    """0 (the preset's) or room for the 256 byte pieces and 4 specials every tokenizer has."""
    return _number(text, int, "0 or an int >= 260 (256 byte pieces and 4 specials)",
                   lambda v: v == 0 or v >= 260)


def positive_float(text: str) -> float:
    return _number(text, float, "a positive number", lambda v: v > 0)


def nonnegative_float(text: str) -> float:
    return _number(text, float, "a number >= 0", lambda v: v >= 0)


def fraction(top: float = 1.0):
    """The type of a number in [0, top]."""
    return lambda text: _number(text, float, f"a number in [0, {top:g}]", lambda v: 0 <= v <= top)


def split_fractions(text: str):
    """train,val,test: three positive fractions summing to 1, checked as split_records checks them."""
    try:
        fractions = [float(x) for x in text.split(",")]
        if len(fractions) == 3 and min(fractions) > 0:
            check_fractions(dict(zip(("train", "val", "test"), fractions)))
            return fractions
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not three positive fractions summing to 1")


def data_file(entry: str) -> str:
    """PATH, safety=PATH or helpful=PATH (- for stdin): the tag known, the file there."""
    tag, path = parse_data_spec(entry)
    if tag not in (None, "helpful", *SAFETY_TAGS):
        raise argparse.ArgumentTypeError(f"unknown tag {tag!r} in {entry!r}; use safety=PATH or helpful=PATH")
    if path != "-" and not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path}: " + ("a directory, not a file" if os.path.isdir(path)
                                                         else "no such file"))
    return entry


def data_files(text: str) -> str:
    """A comma list of data_file entries, without empty ones ("a,,b" and a trailing comma)."""
    entries = [data_file(entry) for entry in text.split(",") if entry]
    if text and not entries:
        raise argparse.ArgumentTypeError(f"{text!r} names no file")
    return ",".join(entries)


def comma_choices(choices, empty_ok=False, what=""):
    """The type of a comma list of names from `choices` (empty entries dropped, each once): a
    misspelt name is an error at parse time, not a check skipped or a default run under its label."""
    def parse(text):
        names = list(dict.fromkeys(s for s in text.split(",") if s))
        unknown = [s for s in names if s not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what}{', '.join(map(repr, unknown))}; choose from "
                                             f"{', '.join(choices)}")
        if not names and not empty_ok:
            raise argparse.ArgumentTypeError(f"{text!r} names none of {', '.join(choices)}")
        return names
    return parse


def prompts_per_process(text: str) -> int:
    """A positive count of held-out prompts that every process gets a share of (torchrun's WORLD_SIZE)."""
    n, world = positive_int(text), int(os.environ.get("WORLD_SIZE", "1"))
    if n < world:
        raise argparse.ArgumentTypeError(f"{n} prompts for {world} processes: each process samples its share")
    return n


def kernel_flag(text: str) -> str:
    """The pairwise loss path: auto, reference, or triton, which on a machine without CUDA runs
    only under Triton's interpreter, a test tool: kernels/_dispatch.py's IMPLS and rule, restated
    here because importing kernels/ would load Triton for every command line."""
    if text not in ("auto", "triton", "reference"):
        raise argparse.ArgumentTypeError(f"{text!r}: choose auto, triton or reference")
    if text == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise argparse.ArgumentTypeError("triton on a CPU needs TRITON_INTERPRET=1 in the environment "
                                         "(Triton's interpreter: a test tool, far slower than reference)")
    return text


def device_flag(text: str) -> str:
    """auto, cpu, cuda or cuda:N, and only what this machine has."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: rmlab runs on auto, cpu, cuda or cuda:N")
    if device.type == "cpu" and device.index:       # torch accepts cpu:1 and runs on the same CPU
        raise argparse.ArgumentTypeError(f"{text}: the CPU has no devices to choose from; use cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s)")
    return text


def resolve_device(flag: str) -> torch.device:
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(flag)
