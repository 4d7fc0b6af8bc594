"""score.py refuses what it would otherwise get silently wrong: its own --out read back as labels,
an rm stage that did not finish, a damaged meta max_len; and --out and the table lose nothing of
the input (a field named like ours, a response's leading or trailing space)."""
import json
import shutil

import pytest

import score
from model.checkpoint import MANIFEST
from test_score import alone, reward_model, run_main, save_rm, tok, write_jsonl  # noqa: F401 (tok: a fixture)

PAIR = {"prompt": "the fox", "chosen": " ran", "rejected": " slept"}


def refused(capsys, *argv):
    """score.py's stderr line for argv, asserting exit code 2, one line and no traceback."""
    rc = score.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def rm(tok, tmp_path_factory):
    return save_rm(tmp_path_factory.mktemp("rm") / "rm", reward_model(seed=3), tok)


# ---- S1: score.py's own --out, read back -----------------------------------------------------------

def test_its_own_out_file_is_refused_not_read_as_labels(rm, tmp_path, capsys):
    """A response list's --out row has "scores": read back, they would be ranking labels (and the
    accuracy the model's agreement with itself). Every kind of row, scored or not, is refused,
    with --skip-bad too: a wrong file is not a malformed line to skip."""
    data = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "the fox", "responses": [" ran", " slept", " the hen ran past trees"]},
        PAIR, {"prompt": "the hen", "response": " slept"},
        {"prompt": "a", "chosen": " b"}])                                     # malformed: no rejected
    out = tmp_path / "out.jsonl"
    run_main(capsys, "--rm", rm, "--data", data, "--out", out, "--skip-bad")
    rows = open(out).read().splitlines()
    assert len(rows) == 4 and "scores" in json.loads(rows[0]) and "score_error" in json.loads(rows[3])
    err = refused(capsys, "--rm", rm, "--data", out)
    assert f"{out}:line 1: field 'prob'" in err or f"{out}:line 1: field 'probs'" in err
    assert "is score.py output; score the original file" in err
    for i, row in enumerate(rows):
        one = tmp_path / f"row{i}.jsonl"
        one.write_text(row + "\n")
        assert "is score.py output" in refused(capsys, "--rm", rm, "--data", one, "--skip-bad")
    own_field = write_jsonl(tmp_path / "prob.jsonl", [{**PAIR, "prob": 0.5}])      # one field alone is data
    run_main(capsys, "--rm", rm, "--data", own_field)


# ---- S3: an interrupted rm stage -----------------------------------------------------------------

def test_an_unfinished_rm_stage_is_refused_not_scored_with_one_model(rm, tmp_path, capsys):
    finished = tmp_path / "finished"
    for kind in ("safety", "helpful"):
        shutil.copytree(rm, finished / "rm" / kind / "model")
    data = write_jsonl(tmp_path / "in.jsonl", [PAIR])
    assert "safety model:" in run_main(capsys, "--rm", finished, "--data", data)

    run = tmp_path / "run"                 # killed while training the safety model: only its ckpt/
    shutil.copytree(finished, run)
    shutil.rmtree(run / "rm" / "safety" / "model")
    shutil.copytree(rm, run / "rm" / "safety" / "ckpt")
    for arg in (run, run / "rm"):
        err = refused(capsys, "--rm", arg, "--data", data)
        assert f"the rm stage did not finish ({run / 'rm' / 'safety'} has no model)" in err
        assert f"`python train.py --out {run} --resume`" in err

    # Killed after the helpful model, before the safety model's folder: stage.json is not done.
    shutil.rmtree(run / "rm" / "safety")
    stage = run / "rm" / "stage.json"
    stage.write_text(json.dumps({"done": False}))
    assert "stage.json is not marked done" in refused(capsys, "--rm", run, "--data", data)
    # Cut short by --max-steps: not done either, but its models are whole and are scored.
    stage.write_text(json.dumps({"done": False, "cut_short": "--max-steps 3"}))
    assert "reward model:" in run_main(capsys, "--rm", run, "--data", data)


# ---- S8: --out never overwrites an input field ----------------------------------------------------

def test_out_keeps_every_input_value_when_renaming(rm, tmp_path, capsys):
    record = {"prompt": "the fox", "responses": [" ran", " slept"], "scores": [2, 1],
              "input_scores": "mine", "input_input_scores": [7], "whites": "w", "input_whites": None}
    out = tmp_path / "out.jsonl"
    run_main(capsys, "--rm", rm, "--data", write_jsonl(tmp_path / "in.jsonl", [record]), "--out", out)
    row = json.loads(open(out).read())
    assert row["input_scores"] == "mine" and row["input_input_scores"] == [7] and row["input_whites"] is None
    assert row["input_input_input_scores"] == [2, 1] and row["input_input_whites"] == "w"
    assert len(row["scores"]) == 2 and all(isinstance(v, float) for v in row["scores"])   # ours
    assert all(v in row.values() for v in record.values())


# ---- T2: the meta's max_len --------------------------------------------------------------------

def test_a_damaged_meta_max_len_is_one_line_naming_file_and_field(rm, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(rm, ck)
    manifest = json.loads((ck / MANIFEST).read_text())

    def with_max_len(value):
        (ck / MANIFEST).write_text(json.dumps({**manifest, "meta": {**manifest["meta"], "max_len": value}}))

    for bad in (True, False, 0, -5, 1, 2, 1.5, 64.0, "64", [64], 129, 10 ** 12):   # max_seq_len is 128
        with_max_len(bad)
        err = refused(capsys, "--rm", ck, "the fox", "ran")
        assert f"{ck / MANIFEST}: field 'meta.max_len' is {bad!r}" in err and "max_seq_len (128)" in err
    for good, used in ((64, 64), (128, 128), (None, 128)):       # None: an older run, no max_len saved
        with_max_len(good)
        assert f"max_len {used}," in run_main(capsys, "--rm", ck, "the fox", "ran")


# ---- S6: the table shows the text the model saw ---------------------------------------------------

def test_the_table_shows_leading_and_trailing_space(tok, tmp_path, capsys):
    model = reward_model(seed=4)
    ck = save_rm(tmp_path / "rm", model, tok)
    hh = tok.encode("\n\nHuman: the fox\n\nAssistant:")           # one user turn in HH's template
    for flag, prompt in (([], hh), (["--verbatim"], tok.encode("the fox"))):
        responses = ["ran", " ran", "ran ", "ran\n"]
        printed = run_main(capsys, "--rm", ck, *flag, "the fox", *responses).splitlines()
        for r in responses:
            lines = [line for line in printed if line.endswith(f"  {r!r}")]
            assert len(lines) == 1, (r, printed)
            spaced = r if flag else " " + r              # HH's template puts a space before a response
            assert float(lines[0].split()[1]) == pytest.approx(alone(model, tok, prompt, spaced), abs=1e-4)
    long_ = "the fox ran " * 10
    printed = run_main(capsys, "--rm", ck, "the fox", long_)
    assert f"{long_[:60]!r}…" in printed
