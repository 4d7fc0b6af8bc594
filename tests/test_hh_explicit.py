"""HH-RLHF in TRL's explicit format, empty final turns included: load -> split -> encode -> train ->
score.py, without --skip-bad. An empty response is data in every format (data/records.py)."""
import gzip
import json
import os
import subprocess
import sys

import pytest

from data.records import split_transcript
from test_train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf")
FILES = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")


def explicit_records(n_others):
    """Every HH test record with an empty final turn, plus the first n_others of the rest."""
    empty, others = [], []
    for name in FILES:
        for line in gzip.open(os.path.join(HH, name, "test.jsonl.gz"), "rt"):
            r = json.loads(line)
            (prompt, chosen), (prompt_r, rejected) = (split_transcript(r[k], name, k) for k in ("chosen", "rejected"))
            if prompt != prompt_r:
                continue
            rec = {"prompt": prompt, "chosen": chosen.strip(), "rejected": rejected.strip(),
                   "is_safety": name == "harmless-base"}
            (empty if not rec["chosen"] or not rec["rejected"] else others).append(rec)
    return empty, others[:n_others]


@pytest.mark.skipif(not os.path.isdir(HH), reason="../shared/data/hh-rlhf is not present")
def test_explicit_hh_with_empty_responses_trains_and_scores(tmp_path):
    empty, others = explicit_records(300)
    assert len(empty) >= 10                                  # HH's test splits have 11
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in empty + others))
    out = str(tmp_path / "run")
    proc = train("--data", str(path), "--out", out, "--stages", "tokenizer,lm,rm", "--preset", "tiny",
                 "--vocab-size", "512", "--max-len", "128", "--lm-steps", "5", "--lm-batch", "8", "--epochs", "0.3",
                 "--batch-pairs", "16", "--micro-pairs", "16", "--split", "0.8,0.1,0.1", "--accept-drops",
                 timeout=300)
    assert f"{len(empty)} empty responses kept" in proc.stdout
    scored = subprocess.run([sys.executable, os.path.join(ROOT, "score.py"), "--rm", out, "--data", str(path),
                             "--out", str(tmp_path / "scores.jsonl"), "--max-len", "128"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert scored.returncode == 0, scored.stderr
    rows = [json.loads(line) for line in open(tmp_path / "scores.jsonl")]
    assert len(rows) == len(empty) + len(others)
    for row, rec in zip(rows, empty):                        # the empty response is scored, as EOS alone
        side = "chosen" if rec["chosen"] == "" else "rejected"
        assert "score_error" not in row and row[f"score_{side}"] is not None
