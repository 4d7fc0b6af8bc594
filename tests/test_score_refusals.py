"""score.py refuses what it would otherwise get silently wrong: its own --out read back as labels,
an rm stage that did not finish, a damaged meta max_len; and --out and the table lose nothing of
the input (a field named like ours, a response's leading or trailing space)."""
import json
import shutil

import pytest

import score
from model.checkpoint import MANIFEST, save_checkpoint
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


# ---- U5b: --out is strict JSON ---------------------------------------------------------------------

def strict_rows(path):
    """--out's lines, each read by a json that refuses NaN and Infinity (JSON has neither)."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return [json.loads(line, parse_constant=refuse) for line in open(path)]


def periodic_ckpt(path, model, tok):
    """A checkpoint as train.py's rm stage saves one every --save-every steps: no calibration, no
    validation statistics."""
    save_checkpoint(path, model, tokenizer=tok, meta={"stage": "rm", "kind": "safety", "max_len": 64})
    return str(path)


def test_out_is_strict_json_for_a_model_without_statistics(tok, tmp_path, capsys):
    """white* is null without validation statistics (it was written as NaN)."""
    model = reward_model(seed=5)
    ck = periodic_ckpt(tmp_path / "ckpt", model, tok)
    data = write_jsonl(tmp_path / "in.jsonl", [PAIR, {"prompt": "the hen", "responses": [" ran", " slept"]},
                                               {"prompt": "the hen", "response": " ran"}, {"prompt": "a"}])
    out = tmp_path / "out.jsonl"
    run_main(capsys, "--rm", ck, "--data", data, "--out", out, "--skip-bad")
    rows = strict_rows(out)
    whites = [rows[0]["white_chosen"], rows[0]["white_rejected"], *rows[1]["whites"], rows[2]["white"]]
    assert whites == [None] * 5
    ran = alone(model, tok, tok.encode("the fox"), " ran")
    assert rows[0]["score_chosen"] == pytest.approx(ran, abs=1e-4)
    assert "score_error" in rows[3]


def strict_json(text):
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("line, field", [
    ('{"prompt": "the fox", "chosen": " ran", "rejected": " slept", "note": NaN}', "note"),
    ('{"prompt": "the fox", "chosen": " ran", "rejected": " slept", "meta": {"x": [1, -Infinity]}}', "meta"),
    ('{"prompt": "the fox", "chosen": " ran", "rejected": " slept", "n": 1e999}', "n"),
    ('{"prompt": "the fox", "chosen": " ran", "note": NaN}', "note"),            # malformed: its row is kept
    ("NaN", "input"),                                                          # output_row's "input"
])
def test_a_nan_in_a_field_the_scorer_does_not_read_is_written_as_null(rm, tmp_path, capsys, line, field):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps(PAIR) + "\n" + line + "\n")
    out = tmp_path / "out.jsonl"
    run_main(capsys, "--rm", rm, "--data", data, "--out", out, "--skip-bad")
    first, second = (strict_json(row) for row in open(out))
    assert second[field] is None
    if "score_chosen" in second:                  # the same pair as line 1: the field changed nothing
        assert second["score_chosen"] == first["score_chosen"]


def test_whitened_rewards_that_overflow_are_refused(tok, tmp_path, capsys):
    ck = save_rm(tmp_path / "rm", reward_model(bias=3e38), tok)     # (3e38 - 0) / 0.5: inf in float32
    data = write_jsonl(tmp_path / "in.jsonl", [PAIR])
    err = refused(capsys, "--rm", ck, "--data", data, "--out", tmp_path / "out.jsonl")
    assert err == (f"score.py: error: {ck}: 2 whitened reward(s) overflow float32: (R - 0) / 0.5, "
                   "with its validation statistics\n")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("key, value", [("val_reward_mean", float("nan")), ("val_reward_std", float("inf")),
                                        ("val_reward_mean", "0.0"), ("val_reward_std", True)])
def test_damaged_validation_statistics_are_one_line_naming_the_field(rm, tmp_path, capsys, key, value):
    ck = tmp_path / "ck"
    shutil.copytree(rm, ck)
    manifest = json.loads((ck / MANIFEST).read_text())
    meta = {**manifest["meta"], key: value}
    (ck / MANIFEST).write_text(json.dumps({**manifest, "meta": meta}))        # NaN, as json writes it
    err = refused(capsys, "--rm", ck, "the fox", "ran")
    assert err == (f"score.py: error: {ck / MANIFEST}: field 'meta.{key}' is {value!r}; expected a finite "
                   "number, the validation statistics train.py saves\n")


# ---- U5c: two models need calibrated rewards -----------------------------------------------------

def test_an_uncalibrated_checkpoint_is_refused_as_one_of_two_models(rm, tok, tmp_path, capsys):
    """A periodic checkpoint's offset is the loss's accident: σ(R_s) < 0.15 would pick R_s at random."""
    ckpt = periodic_ckpt(tmp_path / "run" / "rm" / "safety" / "ckpt", reward_model(seed=6), tok)
    data = write_jsonl(tmp_path / "in.jsonl", [PAIR])
    for name, models in (("safety", ["--safety-rm", ckpt, "--helpful-rm", rm]),
                         ("helpful", ["--safety-rm", rm, "--helpful-rm", ckpt])):
        err = refused(capsys, *models, "--data", data)
        assert err == (f"score.py: error: {ckpt} ({name} model): not calibrated (no 'bias_shift' in its "
                       "meta, as in a periodic checkpoint of the rm stage), and the σ(R_s) < 0.15 rule of "
                       f"two models needs calibrated rewards; give the finished model, RUN/rm/{name}/model "
                       "(`python train.py --out RUN --resume` finishes the stage), or score this one alone "
                       f"with --rm {ckpt}\n")
    assert "no saved validation statistics" in run_main(capsys, "--rm", ckpt, "--data", data)   # alone: raw
    assert "accuracy (R_c)" in run_main(capsys, "--safety-rm", rm, "--helpful-rm", rm, "--data", data)
