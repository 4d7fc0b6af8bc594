"""train.py end to end, on the tiny preset: stages, reuse, resume, DDP, failures.

Each test runs train.py as a user would, in a subprocess, and checks what it wrote.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--builtin-prompts", "240", "--lm-steps", "12", "--lm-batch", "16",
        "--epochs", "1", "--batch-pairs", "16", "--micro-pairs", "8", "--reward-prompts", "4",
        "--max-new-tokens", "8", "--log-every", "1", "--max-len", "64"]


def env():
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e.pop("RMLAB_KERNELS", None)     # TRITON_INTERPRET may leak in; the default path must stay the reference
    return e


def train(*args, check=True, timeout=240):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def losses(path):
    with open(path) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "r")
    proc = train(*TINY, "--out", out)
    return out, proc


def test_end_to_end_writes_every_stage_and_the_report(tiny_run):
    out, proc = tiny_run
    report = json.load(open(os.path.join(out, "report.json")))
    models = report["rm"]["models"]
    assert set(models) == {"helpful", "safety"}              # the built-in world has safety labels
    for m in models.values():
        assert 0.0 <= m["test_accuracy"] <= 1.0 and m["test_n"] > 0
        assert set(m["by_kind"]) == {"helpful", "safety"}
        assert m["per_rating"] and m["per_category"]
    detail = report["rm"]["detail"]["models"]["helpful"]
    assert detail["test"]["n"] == sum(v["n"] for v in detail["test"]["per_category"].values())
    r = report["reward"]
    assert r["mean_kl"] == 0.0                                # π_θ = π₀: same code path, same weights
    rows = [json.loads(line) for line in open(os.path.join(out, "reward", "samples.jsonl"))]
    assert len(rows) == r["n"] == 4
    for row in rows:
        assert row["kl_sum"] == 0.0 and abs(sum(row["per_token_reward"]) - row["R_white"]) < 1e-5
        # Llama 2's rule, checked from the raw scores written out
        use_safety = row["is_safety"] or row["R_safety"] < -1.7346010553881064
        assert row["R_c"] == pytest.approx(row["R_safety"] if use_safety else row["R_helpful"], abs=1e-6)
    for stage in ("tokenizer", "lm", "rm", "reward"):
        assert json.load(open(os.path.join(out, stage, "stage.json")))["done"]
    assert "Some weights were newly initialized: ['head.weight', 'head.bias']" in proc.stdout
    assert "Reward models on held-out test pairs" in proc.stdout


def test_validation_mean_is_zero_and_the_scale_calibrated(tiny_run):
    out, _ = tiny_run
    import torch
    from data import builtin, encode_records, split_records
    from data.evaluate import score_records
    from model.checkpoint import load_checkpoint
    ck = load_checkpoint(os.path.join(out, "rm", "helpful", "model"))
    from data.evaluate import pair_outcomes
    from model.rewards import fit_temperature
    splits = builtin.make_dataset(n_prompts=240, seed=1337, n_rejected=4)     # train.py's default
    enc, _ = encode_records(splits["val"], ck.tokenizer, 64)
    per_record = score_records(ck.model, enc, ck.tokenizer.pad_id, 64)
    scores = [s for rec in per_record for s in rec]
    assert abs(sum(scores) / len(scores)) < 1e-4
    assert ck.meta["val_reward_std"] == pytest.approx(float(torch.tensor(scores, dtype=torch.float64).std()), rel=1e-4)
    # The saved model is already calibrated: fitting its temperature again gives 1 (and the
    # scale it was fitted with, applied once, was at most 1).
    assert fit_temperature([row["gap"] for row in pair_outcomes(enc, per_record)]) == pytest.approx(1.0, abs=1e-4)
    assert 0 < ck.meta["scale"] <= 1


def test_finished_stages_are_reused_and_changed_flags_are_named(tiny_run):
    out, _ = tiny_run
    before = os.path.getmtime(os.path.join(out, "rm", "helpful", "model", "model.safetensors"))
    again = train(*TINY, "--out", out)
    assert "[rm] reusing the finished stage" in again.stdout
    assert os.path.getmtime(os.path.join(out, "rm", "helpful", "model", "model.safetensors")) == before
    changed = train(*[a if a != "12" else "13" for a in TINY], "--out", out, check=False)
    assert changed.returncode == 1
    err = changed.stderr.strip().splitlines()
    assert len(err) == 1 and "--lm-steps was 12, now 13" in err[0] and "--redo lm" in err[0]


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, tiny_run):
    full_out, _ = tiny_run
    out = str(tmp_path / "r")
    stages = ["--stages", "tokenizer,lm,rm"]
    stopped = train(*TINY, *stages, "--out", out, "--stop-at-step", "3", check=False)
    assert stopped.returncode == 1 and "--resume" in stopped.stderr
    # The lm stage stopped at step 3 and left a resumable checkpoint.
    assert len(losses(os.path.join(out, "lm", "metrics.jsonl"))) == 3
    # Resume: lm finishes from step 3, then the rm stage stops at its step 2 ...
    again = train(*TINY, *stages, "--out", out, "--resume", "--stop-at-step", "2", check=False)
    assert again.returncode == 1 and "stage rm: stopped at step 2" in again.stderr
    train(*TINY, *stages, "--out", out, "--resume")                 # ... and resumes from there.
    for rel in ("lm/metrics.jsonl", "rm/helpful/metrics.jsonl", "rm/safety/metrics.jsonl"):
        a, b = losses(os.path.join(full_out, rel)), losses(os.path.join(out, rel))
        assert len(a) == len(b) and a == pytest.approx(b, rel=0, abs=1e-6), rel


def test_torchrun_two_processes_match_one_process(tmp_path, tiny_run):
    full_out, _ = tiny_run
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(ROOT, "train.py"), *TINY, "--stages", "tokenizer,lm,rm", "--out", out]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    for rel in ("lm/metrics.jsonl", "rm/helpful/metrics.jsonl"):
        a, b = losses(os.path.join(full_out, rel)), losses(os.path.join(out, rel))
        assert len(a) == len(b) and a == pytest.approx(b, rel=0, abs=1e-5), rel


def test_bad_flag_missing_file_and_corrupt_checkpoint_give_one_line(tmp_path):
    bad = train("--stages", "tokenizer,nope", check=False)
    assert bad.returncode == 2 and "unknown stage 'nope'" in bad.stderr and "Traceback" not in bad.stderr
    missing = train("--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "m"), check=False)
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    assert "nope.jsonl" in missing.stderr
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "rmlab.json").write_text("{ not json")
    corrupt = train(*TINY, "--stages", "tokenizer,lm", "--init-from", str(ck), "--out", str(tmp_path / "c"), check=False)
    assert corrupt.returncode in (1, 2) and "Traceback" not in corrupt.stderr
    assert len(corrupt.stderr.strip().splitlines()) == 1 and "rmlab.json" in corrupt.stderr


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = str(tmp_path / "nan")
    proc = train(*TINY, "--stages", "tokenizer,lm", "--lm-lr", "1e12", "--out", out, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "loss is nan at step" in proc.stderr or "loss is inf at step" in proc.stderr
    assert not os.path.exists(os.path.join(out, "lm", "model", "rmlab.json")) or \
        __import__("model.checkpoint", fromlist=["x"]).load_checkpoint(os.path.join(out, "lm", "model"))


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path):
    out = str(tmp_path / "int")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--lm-steps", "400",
                             "--stages", "tokenizer,lm", "--out", out],
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:                       # wait until training really runs
        if line.startswith("[lm] step 3/"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "interrupted after step" in err and "Traceback" not in err
    from model.checkpoint import load_checkpoint
    state = load_checkpoint(os.path.join(out, "lm", "model")).train_state
    # The checkpoint holds exactly the steps that completed (one metrics line each).
    assert state is not None and state["step"] >= 3
    assert state["step"] == len(losses(os.path.join(out, "lm", "metrics.jsonl")))


def test_rm_mixes_follow_llama2_and_the_helpful_safety_share():
    from types import SimpleNamespace
    from train import rm_mixes
    encoded = [SimpleNamespace(is_safety=i % 5 < 2) for i in range(50)]      # 20 safety, 30 helpful
    safety = {i for i, e in enumerate(encoded) if e.is_safety}
    for share, n_safety_in_helpful in ((1.0, 20), (0.5, 15), (0.0, 0)):      # 30 at share 1, capped at 20
        mixes = rm_mixes(encoded, "auto", seed=0, helpful_safety_share=share)
        helpful_mix, safety_mix = mixes["helpful"], mixes["safety"]
        assert len(set(helpful_mix)) == len(helpful_mix) and helpful_mix == sorted(helpful_mix)
        assert len(set(helpful_mix) - safety) == 30 and len(set(helpful_mix) & safety) == n_safety_in_helpful
        # the safety model: every safety pair plus helpful pairs at 90/10 (20 // 9 = 2)
        assert set(safety_mix) >= safety and len(set(safety_mix) - safety) == 2
    assert set(rm_mixes(encoded, "single", seed=0)["reward"]) == set(range(50))


def test_spread_takes_held_out_prompts_from_the_whole_split():
    from train import spread
    # Two files of 6 and 4 records, loaded one after the other: 5 spread records reach the second.
    records = ["harmless"] * 6 + ["helpful"] * 4
    assert spread(records, 5) == ["harmless", "harmless", "harmless", "helpful", "helpful"]   # 0, 2, 4, 6, 8
    assert spread(list(range(10)), 3) == [0, 3, 6] and spread(list(range(4)), 9) == [0, 1, 2, 3]
