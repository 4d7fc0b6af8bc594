"""score.py: scores against the model run on each sequence alone, Llama 2's 0.15 rule at its
boundary, accuracy against a hand count, and every bad-input case through the real CLI."""
import json
import math
import os
import random
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

import score
from data import DataError, PrefRecord
from data.evaluate import score_responses
from model import Llama, Tokenizer, get_preset
from model.checkpoint import export_hf, save_checkpoint
from model.rewards import SAFETY_LOGIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the a fox hen elk ran past trees then slept bread bake knead proof water sky blue red".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"Human: {w} ran past {n} trees, then {v} slept. Assistant: no {w}"
             for n in range(40) for w in WORDS[:6] for v in WORDS[6:9]]
    return Tokenizer.train(texts, str(tmp_path_factory.mktemp("tok") / "tok"), vocab_size=300)


def reward_model(seed=0, bias=None, max_seq_len=128):
    """A tiny random reward model; with `bias`, a zero head weight makes every reward exactly `bias`."""
    torch.manual_seed(seed)
    model = Llama(get_preset("tiny", dim=32, hidden_dim=48, vocab_size=320, max_seq_len=max_seq_len), head="reward")
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)       # rewards of order 1: orderings are not decided by noise
        if bias is not None:
            model.head.weight.zero_()
            model.head.bias.fill_(bias)
    return model.eval()


def save_rm(path, model, tok, kind="reward"):
    save_checkpoint(path, model, tokenizer=tok, meta={"stage": "rm", "kind": kind, "bias_shift": 0.0,
                                                      "val_reward_mean": 0.0, "val_reward_std": 0.5})
    return str(path)


def alone(model, tok, prompt_ids, response):
    """The reward of BOS + prompt + response + EOS as a batch of one, no mask, no layout."""
    ids = [tok.bos_id] + prompt_ids + tok.encode(response) + [tok.eos_id]
    with torch.no_grad():
        return float(model(torch.tensor([ids]))[0])


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_main(capsys, *argv):
    """score.py's main, in fp32 unless the test asks (the comparisons here are exact to 1e-5)."""
    argv = argv if "--dtype" in argv else (*argv, "--dtype", "fp32")
    rc = score.main([str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


# ---- scores = the model on each sequence alone ----------------------------------------------

def test_scores_match_each_sequence_alone_in_any_batch_and_order(tok, tmp_path, capsys):
    model = reward_model(seed=1)
    ck = save_rm(tmp_path / "rm", model, tok)
    rng = random.Random(0)
    rows = []
    for i in range(9):       # pairs, rankings of 3-4, single responses, response lists; shared prompts
        prompt = sentence(rng, rng.randint(1, 12))
        resp = [" " + sentence(rng, rng.randint(1, 9)) for _ in range(rng.choice([1, 2, 3, 4]))]
        if len(resp) == 1:
            rows.append({"prompt": prompt, "response": resp[0], "id": i})
        elif len(resp) == 2:
            rows.append({"prompt": prompt, "chosen": resp[0], "rejected": resp[1], "id": i})
        elif i % 2:
            rows.append({"prompt": prompt, "responses": resp, "ranking": list(range(len(resp)))[::-1], "id": i})
        else:
            rows.append({"prompt": prompt, "responses": resp, "scores": list(range(len(resp))), "id": i})
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    expected = []
    for r in rows:
        texts = [r["response"]] if "response" in r else r.get("responses") or [r["chosen"], r["rejected"]]
        expected.append([alone(model, tok, tok.encode(r["prompt"]), t) for t in texts])

    for layout, batch_tokens in (("packed", 100000), ("packed", 1), ("padded", 64)):
        out = tmp_path / f"out-{layout}-{batch_tokens}.jsonl"
        run_main(capsys, "--rm", ck, "--data", data, "--out", out, "--layout", layout, "--batch-tokens", batch_tokens)
        got = [json.loads(line) for line in open(out)]
        assert [g["id"] for g in got] == [r["id"] for r in rows]           # input order, input fields kept
        for g, r, want in zip(got, rows, expected):
            if "response" in r:
                vals = [g["score"]]
            elif "chosen" in r:
                vals = [g["score_chosen"], g["score_rejected"]]
            else:
                vals = g["scores"]
                assert g.get("input_scores", r.get("scores")) == r.get("scores")   # never overwritten
            np.testing.assert_allclose(vals, want, rtol=1e-5, atol=1e-5)
            probs = [g["prob"]] if "response" in r else (g["probs"] if "responses" in r else
                                                          [g["prob_chosen"], g["prob_rejected"]])
            np.testing.assert_allclose(probs, [1 / (1 + math.exp(-w)) for w in want], rtol=1e-5)

    # The same records shuffled and cut into other batches, straight through score_responses.
    records = [PrefRecord(r["prompt"], [r["response"]] if "response" in r else
                          r.get("responses") or [r["chosen"], r["rejected"]], [], [], [], []) for r in rows]
    order = list(range(len(records)))
    random.Random(1).shuffle(order)
    scores, _, _ = score_responses(model, [records[i] for i in order], tok, 128, batch_tokens=40)
    for k, i in enumerate(order):
        np.testing.assert_allclose(scores[k], expected[i], rtol=1e-5, atol=1e-5)


def test_keep_the_end_truncation_matches_the_cut_sequence_alone(tok):
    model = reward_model(seed=2, max_seq_len=24)
    rng = random.Random(3)
    prompt = sentence(rng, 30)                                  # far longer than 24 tokens
    short, long_ = " " + sentence(rng, 2), " " + sentence(rng, 40)
    rec = PrefRecord(prompt, [short, " " + sentence(rng, 4), long_], [], [], [], [])
    (scores,), stats, _ = score_responses(model, [rec], tok, 24)
    p = tok.encode(prompt)
    longest_kept = max(len(tok.encode(r)) + 1 for r in rec.responses[:2])
    kept = p[len(p) - (24 - 1 - longest_kept):]                 # the prompt loses its start, once
    assert scores[2] is None                                    # alone longer than max_len: not scored
    np.testing.assert_allclose(scores[:2], [alone(model, tok, kept, r) for r in rec.responses[:2]], atol=1e-5)
    assert (stats.n_prompts_truncated, stats.n_prompt_tokens_cut, stats.n_responses_too_long) == \
        (1, len(p) - len(kept), 1)

    # score.py's policy: the long response is scored on its last 23 tokens (EOS included) after
    # BOS and no prompt, so the short ones lose the whole prompt too; every cut is counted.
    (scores,), stats, cuts = score_responses(model, [rec], tok, 24, long_responses="keep_end")
    ids = (tok.encode(long_) + [tok.eos_id])[-23:]
    with torch.no_grad():
        want = float(model(torch.tensor([[tok.bos_id] + ids]))[0])
    assert scores[2] == pytest.approx(want, abs=1e-5)
    np.testing.assert_allclose(scores[:2], [alone(model, tok, [], r) for r in rec.responses[:2]], atol=1e-5)
    assert cuts == [[len(p)] * 2 + [len(p) + len(tok.encode(long_)) + 1 - 23]]
    assert (stats.n_responses_too_long, stats.n_responses_cut) == (0, 1)


def test_command_line_prompt_ranks_and_hugging_face_dir(tok, tmp_path, capsys):
    model = reward_model(seed=4)
    hf = export_hf(model, tmp_path / "hf", tokenizer=tok)      # LlamaForSequenceClassification + tokenizer.model
    responses = ["the fox slept", "bread", "a red sky then blue water", "knead the bread"]
    out = run_main(capsys, "--rm", hf, "how do I bake bread?", *responses)
    prompt = tok.encode("\n\nHuman: how do I bake bread?\n\nAssistant:")
    want = [alone(model, tok, prompt, " " + r) for r in responses]
    lines = [line for line in out.splitlines() if line.strip().endswith(tuple(f"{r!r}" for r in responses))]
    assert len(lines) == 4
    for line, r, w in zip(lines, responses, want):
        rank, value = line.split()[:2]
        assert int(rank) == 1 + sum(x > w for x in want)
        assert float(value) == pytest.approx(w, abs=1e-4)
    assert "no saved validation statistics" in out            # an HF dir has none: white* is null


def test_a_bf16_checkpoint_is_scored_in_fp32_when_fp32_is_asked(tok, tmp_path, capsys, monkeypatch):
    """Hub reward models are mostly bf16 on disk. score.py keeps the file's dtype (a bf16 model under
    bf16 autocast needs no fp32 copy) and casts to fp32 when fp32 is the precision: the scores are
    then the fp32 computation on the same bf16 values, exactly."""
    model = reward_model(seed=5).to(torch.bfloat16)
    path = save_rm(tmp_path / "bf16", model, tok)
    responses = ["the fox slept", "bread"]
    prompt = tok.encode("\n\nHuman: bake?\n\nAssistant:")
    want = [alone(model.float(), tok, prompt, " " + r) for r in responses]
    out = run_main(capsys, "--rm", path, "bake?", *responses)              # --dtype fp32
    got = {line.split("'")[1]: float(line.split()[1]) for line in out.splitlines() if line.strip().endswith("'")}
    assert [got[r] for r in responses] == pytest.approx(want, abs=5.1e-5)      # printed to 4 decimals
    loaded = []
    real_run = score.score_all
    monkeypatch.setattr(score, "score_all", lambda models, *a: loaded.append(
        {p.dtype for m in models.values() for p in m.model.parameters()}) or real_run(models, *a))
    run_main(capsys, "--rm", path, "bake?", *responses, "--dtype", "bf16")
    assert loaded == [{torch.bfloat16}]                                     # not doubled in memory


# ---- two models: Llama 2's rule at the 0.15 boundary --------------------------------------------

def float32_neighbours(x):
    """The largest float32 below x and the smallest above it (x itself is not a float32)."""
    f = np.float32(x)
    below = f if f < x else np.nextafter(f, np.float32(-np.inf))
    above = f if f > x else np.nextafter(f, np.float32(np.inf))
    assert below < x < above
    return float(below), float(above)


def test_two_models_select_at_the_safety_boundary(tok, tmp_path, capsys):
    below, above = float32_neighbours(SAFETY_LOGIT)        # σ(below) < 0.15 <= σ(above), in exact arithmetic
    helpful = save_rm(tmp_path / "helpful", reward_model(bias=0.75), tok, "helpful")
    data = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "the fox", "chosen": " ran", "rejected": " slept", "is_safety": False},
        {"prompt": "the hen", "chosen": " ran", "rejected": " slept", "is_safety": True}])
    for r_s in (below, above):
        run = tmp_path / f"run{r_s}"          # a train.py run dir (RUN/rm/{safety,helpful}/model), or the two named
        save_rm(run / "rm" / "safety" / "model", reward_model(bias=r_s), tok, "safety")
        os.makedirs(run / "rm" / "helpful")
        os.symlink(helpful, run / "rm" / "helpful" / "model")
        out = tmp_path / "out.jsonl"
        models = ["--rm", run] if r_s == below else ["--safety-rm", run / "rm" / "safety" / "model", "--helpful-rm", helpful]
        printed = run_main(capsys, *models, "--data", data, "--out", out)
        helpful_prompt, safety_prompt = [json.loads(line) for line in open(out)]
        for row in (helpful_prompt, safety_prompt):
            assert row["score_safety_chosen"] == r_s and row["score_helpful_chosen"] == 0.75
        # Below logit(0.15) the safety model wins everywhere; above it only on the safety prompt.
        use_safety = r_s == below
        assert helpful_prompt["used_safety_chosen"] is use_safety
        assert helpful_prompt["score_chosen"] == (r_s if use_safety else 0.75)
        assert safety_prompt["used_safety_chosen"] is True and safety_prompt["score_chosen"] == r_s
        assert helpful_prompt["white_chosen"] == pytest.approx((r_s if use_safety else 0.75) / 0.5)
        assert "accuracy (R_c) on 2 pairs: 0.000" in printed and "ties 1.000" in printed   # constant rewards tie

    # A single prompt: --is-safety decides, as is_safety does in a record.
    run = tmp_path / f"run{above}"
    for flag, want in (([], "helpful"), (["--is-safety"], "safety")):
        printed = run_main(capsys, "--rm", run, *flag, "the fox", "ran")
        line = next(line for line in printed.splitlines() if line.endswith("'ran'"))
        assert line.split()[-2] == want


# ---- accuracy: a hand count ---------------------------------------------------------------------

def test_printed_accuracy_equals_a_hand_count(tok, tmp_path, capsys):
    model = reward_model(seed=5)
    ck = save_rm(tmp_path / "rm", model, tok)
    rng = random.Random(6)
    # Six pairs; `right` says whether the chosen response is the one the model scores higher.
    right = [True, True, False, False, False, True]
    rating = ["better"] * 3 + ["significantly better"] * 3
    category = ["math", "math", "facts", "facts", "facts", "facts"]
    rows, lengths, rewards = [], [], []
    for i in range(6):
        prompt, a, b = sentence(rng, 5), " " + sentence(rng, 3), " " + sentence(rng, 6)
        sa, sb = (alone(model, tok, tok.encode(prompt), t) for t in (a, b))
        hi, lo = (a, b) if sa > sb else (b, a)
        chosen, rejected = (hi, lo) if right[i] else (lo, hi)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "rating": rating[i],
                     "category": category[i]})
        lengths.append((len(chosen), len(rejected)))
        rewards += [(sa if chosen == a else sb, len(chosen)), (sb if chosen == a else sa, len(rejected))]
    # A ranking of three, best first as [highest, lowest, middle]: 2 of its 3 pairs right.
    prompt, texts = sentence(rng, 4), [" " + sentence(rng, n) for n in (2, 3, 4)]
    s = [alone(model, tok, tok.encode(prompt), t) for t in texts]
    by_score = sorted(range(3), key=lambda j: -s[j])
    rows.append({"prompt": prompt, "responses": texts, "ranking": [by_score[0], by_score[2], by_score[1]]})
    data = write_jsonl(tmp_path / "in.jsonl", rows)

    printed = run_main(capsys, "--rm", ck, "--data", data)
    # Hand count: pairs 3 + 2 of 9 right; better 2/3, significantly better 1/3; math 2/2, facts 1/4.
    assert "accuracy (raw score) on 9 pairs: 0.556" in printed
    assert "ties 0.000" in printed
    assert "better 0.667 (n 3)" in printed and "significantly better 0.333 (n 3)" in printed
    assert "facts 0.250 (n 4)" in printed and "math 1.000 (n 2)" in printed
    # The length baseline like the model: a tie (equal lengths) is neither right nor wrong.
    ranked = [texts[j] for j in (by_score[0], by_score[2], by_score[1])]
    lengths += [(len(ranked[a]), len(ranked[b])) for a, b in ((0, 1), (0, 2), (1, 2))]
    wins, ties = sum(c > r for c, r in lengths), sum(c == r for c, r in lengths)
    rewards += [(s[j], len(texts[j])) for j in range(3)]
    corr = statistics.correlation(*zip(*rewards))
    assert f"on the same pairs: {wins / 9:.3f}, ties {ties / 9:.3f}; corr(reward, length) {corr:+.3f}" in printed
    assert "pairs/s" in printed


# ---- the CLI as a user runs it: every bad-input case ---------------------------------------------

def cli(*argv, stdin=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "score.py"), *map(str, argv)], cwd=ROOT, env=env,
                          input=stdin, capture_output=True, text=True, timeout=120)


def one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def cli_files(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    lm = Llama(get_preset("tiny", dim=32, hidden_dim=48, vocab_size=320), head="lm")
    return {"rm": save_rm(d / "rm", reward_model(seed=7, max_seq_len=16), tok),
            "lm": str(save_checkpoint(d / "lm", lm, tokenizer=tok)),
            "good": write_jsonl(d / "good.jsonl", [{"prompt": "the fox", "chosen": " ran", "rejected": " slept"}]),
            "dir": str(d)}


def test_cli_language_model_as_rm_says_how_to_make_a_reward_model(cli_files):
    one_line_error(cli("--rm", cli_files["lm"], "the fox", "ran"),
                   "is a language model", f"python train.py --init-from {cli_files['lm']}", "--stages rm")


def test_cli_missing_files_are_named(cli_files):
    missing = os.path.join(cli_files["dir"], "nope.jsonl")
    one_line_error(cli("--rm", cli_files["rm"], "--data", missing), f"{missing}: no such file")


def test_cli_flags_that_would_be_ignored_are_refused_before_scoring(cli_files):
    rm, good, d = cli_files["rm"], cli_files["good"], cli_files["dir"]
    one_line_error(cli("--rm", rm, "--data", "safty=" + good), "unknown tag 'safty'")   # not silently untagged
    one_line_error(cli("--rm", rm, "--data", good, "--is-safety"), "with --data, tag the file safety=FILE")
    one_line_error(cli("--rm", rm, "--data", good, "--out", os.path.join(d, "no", "x.jsonl")), "no such folder")
    one_line_error(cli("--rm", rm, "--data", good, "--out", d), "a folder, not a file")


def test_cli_malformed_line_names_file_line_and_field(cli_files):
    path = os.path.join(cli_files["dir"], "bad.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n\n")
        f.write(json.dumps({"prompt": "a", "chosen": 3, "rejected": " c"}) + "\n")
    one_line_error(cli("--rm", cli_files["rm"], "--data", path), f"{path}:line 3: field 'chosen'")


def test_cli_skip_bad_and_truncation_are_counted(cli_files):
    """--skip-bad counts the bad line (and writes it with score_error); over-long sequences are
    cut at the start of the prompt (max_seq_len 16) or, too long alone, scored on their end:
    either way flagged in the row, never silently unscored."""
    long_prompt = "the fox ran past the trees then slept " * 4
    stdin = "".join(json.dumps(r) + "\n" for r in [
        {"prompt": long_prompt, "chosen": " ran", "rejected": " slept"},
        {"prompt": "a", "chosen": " b"},                                            # malformed: no rejected
        {"prompt": "a", "chosen": " b", "rejected": " red " * 20},                  # rejected alone too long
        "not an object"])
    out = os.path.join(cli_files["dir"], "skip.jsonl")
    proc = cli("--rm", cli_files["rm"], "--data", "-", "--skip-bad", "--out", out, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert "read 4 records: kept 2, dropped 0 (none), skipped 2 malformed" in proc.stdout
    assert "2 prompts cut at the start" in proc.stdout and "1 responses longer than max_len alone" in proc.stdout
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 4 and rows[0]["score_chosen"] is not None
    assert "<stdin>:line 2: field 'rejected'" in rows[1]["score_error"] and rows[3]["score_error"]
    assert rows[0]["cut_chosen"] > 0 and rows[0]["cut_rejected"] > 0            # the prompt's start
    assert rows[2]["score_rejected"] is not None and rows[2]["cut_rejected"] > 0  # scored on its end
    assert "accuracy (raw score) on 2 pairs" in proc.stdout


def test_exit_codes_are_documented_and_a_bad_flag_exits_2(cli_files, capsys):
    with pytest.raises(SystemExit) as e:
        score.parse_args(["--help"])
    assert e.value.code == 0 and "0 success; 2 bad input" in " ".join(capsys.readouterr().out.split())
    assert "0 success; 2 bad input" in score.__doc__
    with pytest.raises(SystemExit) as e:          # argparse's own errors exit with 2 as well
        score.main(["--rm", cli_files["rm"], "--data", cli_files["good"], "--layout", "diagonal"])
    assert e.value.code == 2 and "invalid choice: 'diagonal'" in capsys.readouterr().err


def test_an_overflowing_reward_is_one_line_not_an_unscored_response(tok, tmp_path, capsys):
    """score.py marks "not scored" with NaN internally: a reward that is itself NaN or infinite (a
    finite checkpoint whose head overflows fp32) must stop with one line, exit 2."""
    model = reward_model()
    with torch.no_grad():
        model.norm.weight.fill_(1e30)                   # finite weights, an infinite reward
        model.head.weight.fill_(1e30)
    path = save_rm(tmp_path / "rm", model, tok)
    rc = score.main(["--rm", path, "--dtype", "fp32", "a prompt", "one", "two"])
    err = capsys.readouterr().err
    assert rc == 2 and "NaN or infinite" in err and len(err.strip().splitlines()) == 1


def test_accuracy_intervals_are_wilson_and_stay_in_0_1():
    from data.evaluate import wilson_interval
    low, high = wilson_interval(1.0, 10)                    # by hand: center 0.8612, half 0.1388
    assert low == pytest.approx(0.72246, abs=1e-4) and high == 1.0
    low, high = wilson_interval(0.5, 100)                   # close to the normal interval at p = 0.5
    assert (low, high) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    assert wilson_interval(0.0, 3)[0] == 0.0 and wilson_interval(0.9, 7)[1] <= 1.0


def test_the_readme_example_file_scores_every_record(tok, capsys, tmp_path):
    """examples/pairs.jsonl (the README's score.py example): every record parses and every
    response gets a score, whichever of the formats it is written in."""
    out = tmp_path / "scores.jsonl"
    rm = save_rm(tmp_path / "rm", reward_model(seed=3), tok)
    printed = run_main(capsys, "--rm", rm, "--data", os.path.join(ROOT, "examples", "pairs.jsonl"), "--out", out)
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 6 and not any("score_error" in r for r in rows)
    for r in rows:
        values = r.get("scores") or [r[k] for k in ("score", "score_chosen", "score_rejected") if k in r]
        assert values and all(isinstance(v, float) for v in values)
    assert "scored 12/12 responses of 6 records (7 pairs)" in printed


def test_score_only_records_are_read_by_the_data_rules():
    """{"prompt", "response"} and an unranked "responses" go through data/records.py's checks:
    an empty response is data (as in every format), a malformed one names its field."""
    item = score.parse_item({"prompt": [{"role": "user", "content": "Hi"}], "responses": ["", "yo"]}, "f:line 1", None)
    assert (item.kind, item.record.responses, item.record.pairs) == ("ranking", ["", " yo"], [])
    assert item.record.prompt_turns == [("user", "Hi")] and item.record.response_contents == ["", "yo"]
    assert score.parse_item({"prompt": "p", "response": "a"}, "f:line 1", "safety").record.is_safety
    # The command line's prompt and responses are read by the same rules: blank is "" there too.
    args = score.parse_args(["--rm", "RM", "Hi", "", "  ", "yo"])
    assert score.command_line_item(args).record.responses == ["", "", " yo"]
    args = score.parse_args(["--rm", "RM", "--verbatim", "Hi", "", "  ", "yo"])
    assert score.command_line_item(args).record.responses == ["", "", "yo"]
    with pytest.raises(DataError, match="f:line 1: field 'response': expected a string"):
        score.parse_item({"prompt": "p", "response": 3}, "f:line 1", None)
