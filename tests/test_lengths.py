"""Lengths chosen from the data (data/encode.py: check_lengths, length_verdict), checked
against the encoder itself on a sample of real HH-RLHF records: a sequence is whole when
encode_records keeps it without cutting its prompt, and a pair is dropped when
encode_records drops it."""
import os

import pytest

from data.encode import (DROP_STOP, DROP_WARN, LengthCheck, check_lengths, encode_records, fit_max_len,
                         length_verdict)
from data.records import PrefRecord, load_records
from model import Tokenizer

HH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = os.path.join(HH, "helpful-base", "test.jsonl.gz")
    if not os.path.exists(path):
        pytest.skip("HH-RLHF is not in ../shared/data")
    records = load_records(path)[0][:300]
    tok = Tokenizer.train([t for r in records for t in (r.prompt, *r.responses)],
                          str(tmp_path_factory.mktemp("tok") / "tok"), vocab_size=400)
    return records, tok


def whole_share(records, tok, max_len):
    """Share of (prompt, response) sequences that encode_records keeps at max_len with no cut."""
    whole = n = 0
    for r in records:
        for response in r.responses:
            one = PrefRecord(r.prompt, [response], [(0, 0)], [1.0], [None], [None])
            encoded, _ = encode_records([one], tok, max_len)
            whole += bool(encoded) and encoded[0].n_prompt_tokens_cut == 0
            n += 1
    return whole / n


def test_auto_length_keeps_98_percent_whole_and_is_the_smallest_such(sample):
    records, tok = sample
    check = check_lengths(records, tok)
    assert check.max_len == check.keep_len and check.keep_len % 8 == 0
    assert whole_share(records, tok, check.keep_len) >= 0.98
    assert whole_share(records, tok, check.keep_len - 8) < 0.98     # the smallest multiple of 8
    assert check.n_whole / check.n_sequences >= 0.98
    capped = check_lengths(records, tok, cap=64)                     # the model's limit bounds it
    assert capped.keep_len == 64 and capped.keep_len_whole == pytest.approx(whole_share(records, tok, 64))


@pytest.mark.parametrize("max_len", [48, 96, 200, 400])
def test_dropped_pairs_are_the_pairs_encode_records_drops(sample, max_len):
    records, tok = sample
    check = check_lengths(records, tok, max_len)
    _, stats = encode_records(records, tok, max_len)
    assert check.n_pairs == stats.n_pairs
    assert check.n_pairs_dropped == stats.n_pairs - stats.n_pairs_kept


def test_a_length_raised_to_the_floor_reports_its_own_drops(sample):
    """--max-len 0 with a floor above the data's length (room to sample a response): what
    report.json and the log say is measured at the length used, not at the data's keep_len."""
    records, tok = sample
    keep_len = check_lengths(records, tok).keep_len
    fitted = fit_max_len(records, tok, 0, accept_drops=True, cap=0, floor=keep_len + 64)
    _, stats = encode_records(records, tok, keep_len + 64)
    assert fitted["max_len"] == keep_len + 64 and fitted["keep_len"] == keep_len
    assert fitted["n_pairs_dropped"] == stats.n_pairs - stats.n_pairs_kept
    assert fitted["summary"].startswith(f"max_len {keep_len + 64} ")


def test_verdict_warns_above_5_percent_and_stops_above_20_unless_accepted():
    def check(dropped):
        return LengthCheck(max_len=128, keep_len=912, keep=0.98, keep_len_whole=0.98, n_sequences=2000,
                           n_whole=1500,
                           n_pairs=1000, n_pairs_dropped=dropped)
    assert (DROP_WARN, DROP_STOP) == (0.05, 0.20)
    assert length_verdict(check(50))[0] == "ok"                      # exactly 5%: not yet
    kind, line = length_verdict(check(51))
    assert kind == "warn" and "51 of 1000 pairs (5.1%)" in line and "--max-len 912" in line
    assert length_verdict(check(200))[0] == "warn"
    kind, line = length_verdict(check(201))
    assert kind == "stop" and "--max-len 912" in line and "--accept-drops" in line
    assert length_verdict(check(900), accept_drops=True)[0] == "warn"


def test_train_py_stops_warns_and_records_the_drops(sample, tmp_path):
    """train.py on an HH sample: --max-len 64 drops most pairs, so the run stops before training
    with one line naming the length that keeps 98%; --accept-drops trains, warns, and report.json
    records it; with no --max-len the length comes from the data and nothing is dropped."""
    import json
    import subprocess
    import sys
    records, _ = sample
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": r.prompt, "chosen": r.responses[c], "rejected": r.responses[j]})
                            + "\n" for r in records[:120] for c, j in r.pairs))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def train(*flags, out):
        return subprocess.run([sys.executable, "train.py", "--data", str(data), "--out", str(tmp_path / out),
                               "--stages", "tokenizer,lm", "--preset", "tiny", "--vocab-size", "600",
                               "--lm-steps", "1", "--lm-batch", "2", "--threads", "1", *flags],
                              cwd=root, capture_output=True, text=True, timeout=300)

    stop = train("--max-len", "64", out="a")
    assert stop.returncode == 2 and "Traceback" not in stop.stderr
    (line,) = stop.stderr.strip().splitlines()
    assert "--max-len 64 drops" in line and "--accept-drops" in line
    assert not os.path.exists(tmp_path / "a" / "lm")                     # stopped before π₀

    warn = train("--max-len", "64", "--accept-drops", out="b")
    assert warn.returncode == 0, warn.stderr
    assert warn.stdout.count("WARNING: --max-len 64 drops") == 2         # at the top and in the report
    lengths = json.load(open(tmp_path / "b" / "report.json"))["lengths"]
    assert lengths["max_len"] == 64 and lengths["n_pairs_dropped"] > 0.2 * lengths["n_pairs"]

    auto = train(out="c")
    assert auto.returncode == 0, auto.stderr
    lengths = json.load(open(tmp_path / "c" / "report.json"))["lengths"]
    assert lengths["max_len"] == lengths["keep_len"] and lengths["warning"] is None
    assert f"--max-len {lengths['max_len']} (from the data" in auto.stdout

    # A vocabulary smaller than the texts' characters is a bad flag: one line, not SentencePiece's traceback.
    small = train("--vocab-size", "300", out="d")
    assert small.returncode == 2 and "--vocab-size 300 is smaller than the" in small.stderr
    assert len(small.stderr.strip().splitlines()) == 1
