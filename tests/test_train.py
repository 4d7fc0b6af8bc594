"""train.py end to end, on the tiny preset: stages, reuse, resume, kill -9, torchrun, failures.

Each test runs train.py as a user would, in a subprocess, and checks what it wrote against
an independent run (one process, uninterrupted) or against values worked out here.
"""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--builtin-prompts", "240", "--lm-steps", "12", "--lm-batch", "16",
        "--epochs", "1", "--batch-pairs", "16", "--micro-pairs", "8", "--reward-prompts", "4",
        "--max-new-tokens", "8", "--log-every", "1", "--max-len", "64", "--ppo-iters", "3",
        "--ppo-batch", "16", "--ppo-minibatch", "8", "--ppo-eval-prompts", "16", "--ppo-lr", "3e-3",
        "--dtype", "fp32"]    # the equalities below (processes, resume, calibration) are fp32's; bf16: test_precision


def env():
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e.pop("RMLAB_KERNELS", None)     # TRITON_INTERPRET may leak in; the default path must stay the reference
    return e


def train(*args, check=True, timeout=240):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def losses(path):
    return [r["loss"] for r in rows(path)]


def record(out, stage):
    return json.load(open(os.path.join(out, stage, "stage.json")))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The default stage list, PPO included, at tiny sizes, on one process."""
    out = str(tmp_path_factory.mktemp("run") / "r")
    proc = train(*TINY, "--out", out)
    return out, proc


def test_end_to_end_writes_every_stage_and_the_report(tiny_run):
    out, proc = tiny_run
    report = json.load(open(os.path.join(out, "report.json")))
    models = report["rm"]
    assert set(models) == {"helpful", "safety"}              # the built-in world has safety labels
    for m in models.values():
        t = m["test"]
        assert 0.0 <= t["accuracy"] <= 1.0 and t["n"] == sum(v["n"] for v in t["per_category"].values())
        assert set(t["by_kind"]) == {"helpful", "safety"} and t["per_rating"]
        # the length baseline is scored on the same pairs, ties on their own
        lb = m["length_baseline_test"]
        assert lb["n"] == t["n"] and lb["accuracy"] + lb["ties"] <= 1.0
    r = report["reward"]
    assert r["mean_kl_sum"] == 0.0                             # π_θ = π₀: same code path, same weights
    samples = rows(os.path.join(out, "reward", "samples.jsonl"))
    assert len(samples) == r["n"] == 4
    for row in samples:
        assert row["kl_sum"] == 0.0 and abs(sum(row["per_token_reward"]) - row["R_white"]) < 1e-5
        # Llama 2's rule, checked from the raw scores written out
        use_safety = row["is_safety"] or row["R_safety"] < -1.7346010553881064
        assert row["R_c"] == pytest.approx(row["R_safety"] if use_safety else row["R_helpful"], abs=1e-6)
    ppo = report["ppo"]
    assert ppo["start"]["eval_kl"] == 0.0 and ppo["final"]["eval_kl"] != 0.0     # π_θ has moved away from π₀
    assert 0.0 <= ppo["final"]["win_rate_vs_pi0"] <= 1.0 and ppo["iters"] == 3
    for stage in ("tokenizer", "lm", "rm", "reward", "ppo"):
        assert record(out, stage)["done"]
    assert "Some weights were newly initialized: ['head.weight', 'head.bias']" in proc.stdout
    assert "Reward models on held-out test pairs" in proc.stdout
    assert "oracle win-rate of π_θ over π₀" in proc.stdout
    steps = [r["step"] for r in rows(os.path.join(out, "lm", "metrics.jsonl"))]
    assert steps == list(range(1, 13))


def test_validation_mean_is_zero_and_the_scale_calibrated(tiny_run):
    out, _ = tiny_run
    import torch
    from data import builtin, encode_records
    from data.evaluate import pair_outcomes, score_records
    from model.checkpoint import load_checkpoint
    from model.rewards import fit_temperature
    ck = load_checkpoint(os.path.join(out, "rm", "helpful", "model"))
    splits = builtin.make_dataset(n_prompts=240, seed=1337, n_rejected=4)     # train.py's default
    enc, _ = encode_records(splits["val"], ck.tokenizer, 64)
    per_record = score_records(ck.model, enc, ck.tokenizer.pad_id, 64)
    scores = [s for rec in per_record for s in rec]
    assert abs(sum(scores) / len(scores)) < 1e-4
    std = float(torch.tensor(scores, dtype=torch.float64).std())
    assert ck.meta["val_reward_std"] == pytest.approx(std, rel=1e-4)
    # The saved model is already calibrated: fitting its temperature again gives 1.
    gaps = [row["gap"] for row in pair_outcomes(enc, per_record)]
    assert fit_temperature(gaps) == pytest.approx(1.0, abs=1e-4)
    assert 0 < ck.meta["scale"] <= 1


def test_finished_stages_are_reused_and_changed_flags_are_named(tiny_run):
    out, _ = tiny_run
    before = os.path.getmtime(os.path.join(out, "rm", "helpful", "model", "model.safetensors"))
    again = train(*TINY, "--out", out, "--threads", "1", "--log-every", "5")   # run flags are not inputs
    assert "[ppo] reusing the finished stage" in again.stdout
    assert os.path.getmtime(os.path.join(out, "rm", "helpful", "model", "model.safetensors")) == before
    changed = train(*[a if a != "12" else "13" for a in TINY], "--out", out, check=False)
    err = changed.stderr.strip().splitlines()
    assert changed.returncode == 1 and len(err) == 1
    assert "--lm-steps was 12, now 13" in err[0] and "--redo lm" in err[0]
    # a flag of a later stage names that stage, not an earlier one
    ppo = train(*TINY, "--ppo-lr", "1e-3", "--out", out, check=False)
    assert "stage ppo:" in ppo.stderr and "--ppo-lr was 0.003, now 0.001" in ppo.stderr


def test_a_changed_data_file_is_detected(tmp_path):
    from data import builtin
    data = tmp_path / "pairs.jsonl"
    recs = builtin.make_dataset(n_prompts=200, seed=0)["train"]
    lines = [json.dumps({"prompt": r.prompt, "chosen": r.responses[c], "rejected": r.responses[j]})
             for r in recs for c, j in r.pairs[:1]]
    data.write_text("\n".join(lines) + "\n")
    args = ["--data", str(data), "--stages", "tokenizer", "--vocab-size", "512", "--out", str(tmp_path / "r")]
    train(*args)
    assert "[tokenizer] reusing" in train(*args).stdout
    data.write_text("\n".join(lines[:-1]) + "\n")          # same path, one pair fewer
    changed = train(*args, check=False)
    assert changed.returncode == 1 and "the data files' sha256 was" in changed.stderr
    assert "--redo tokenizer" in changed.stderr


def test_a_file_flag_replaced_at_the_same_path_is_detected(tmp_path, tiny_run):
    """--tokenizer, --init-from and --policy name files whose content is a stage input: a
    tokenizer replaced at the same path is named, not reused."""
    full_out, _ = tiny_run
    model = tmp_path / "tok.model"
    shutil.copy(os.path.join(full_out, "tokenizer", "tokenizer.model"), model)
    args = [*TINY, "--tokenizer", str(model), "--stages", "tokenizer", "--out", str(tmp_path / "r")]
    train(*args)
    assert "[tokenizer] reusing" in train(*args).stdout
    with open(model, "ab") as f:
        f.write(b"\0")
    changed = train(*args, check=False)
    assert changed.returncode == 1 and "--tokenizer's sha256 was" in changed.stderr


def test_held_out_prompts_fewer_than_the_processes_are_one_line(monkeypatch, capsys):
    from train import parse_args
    monkeypatch.setenv("WORLD_SIZE", "2")          # as torchrun sets it
    for flag in ("--reward-prompts", "--ppo-eval-prompts"):
        with pytest.raises(SystemExit) as stop:
            parse_args([flag, "1"])
        assert stop.value.code == 2 and "1 prompts for 2 processes" in capsys.readouterr().err


def test_train_layers_beyond_the_model_stops_before_pi0_trains(tmp_path):
    from model import get_preset
    blocks = get_preset("tiny").n_layers
    proc = train(*TINY, "--train-layers", str(blocks), "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"--train-layers {blocks}: the model has {blocks} blocks" in proc.stderr
    assert not (tmp_path / "r" / "lm").exists()          # refused before the lm stage, not after it


def test_a_capped_stage_is_not_reused_and_resumes_to_the_same_losses(tmp_path, tiny_run):
    full_out, _ = tiny_run
    out = str(tmp_path / "r")
    stages = ["--stages", "tokenizer,lm,rm"]
    capped = train(*TINY, *stages, "--out", out, "--max-steps", "3")
    assert "cut short after step 3 of 12" in capped.stdout
    assert not record(out, "lm")["done"] and not record(out, "rm")["done"]
    # Without the cap: the under-trained π₀ is not taken as finished.
    refused = train(*TINY, *stages, "--out", out, check=False)
    assert refused.returncode == 1 and "unfinished run (cut short after step 3" in refused.stderr
    assert "--resume" in refused.stderr
    # --resume continues π₀ from step 3; the rm stage, built on the π₀ of step 3, starts again,
    # every time π₀ trains on (a chain of capped jobs), not only once π₀ finishes.
    further = train(*TINY, *stages, "--out", out, "--resume", "--max-steps", "5").stdout
    assert "[lm] resuming at step 3/12" in further and "[rm] the stage before it ran again since" in further
    assert "[rm] resume run" not in further
    train(*TINY, *stages, "--out", out, "--resume")
    for rel in ("lm/metrics.jsonl", "rm/helpful/metrics.jsonl", "rm/safety/metrics.jsonl"):
        assert losses(os.path.join(full_out, rel)) == losses(os.path.join(out, rel)), rel   # bit-identical


def test_kill_9_after_the_second_periodic_checkpoint_resumes_bit_identically(tmp_path):
    common = [*TINY, "--stages", "tokenizer,lm", "--lm-steps", "60", "--save-every", "5"]
    full = str(tmp_path / "full")
    train(*common, "--out", full)
    out = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *common, "--out", out],
                            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = os.path.join(out, "lm", "ckpt", "rmlab.json")
    deadline = time.time() + 120
    import torch
    while time.time() < deadline and proc.poll() is None:      # wait for the checkpoint of step 10
        try:            # the checkpoint folder is swapped atomically: it can vanish under a reader
            if "train_state.pt" in open(manifest).read() and torch.load(
                    os.path.join(out, "lm", "ckpt", "train_state.pt"), weights_only=True)["step"] >= 10:
                break
        except (OSError, RuntimeError, EOFError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = train(*common, "--out", out, "--resume")
    assert "[lm] resuming at step" in resumed.stdout
    steps = [r["step"] for r in rows(os.path.join(out, "lm", "metrics.jsonl"))]
    assert steps == list(range(1, 61))                          # each step exactly once
    assert losses(os.path.join(full, "lm", "metrics.jsonl")) == \
        losses(os.path.join(out, "lm", "metrics.jsonl"))                      # bit-identical


def test_a_nan_gradient_in_ppo_stops_before_the_update(tmp_path, tiny_run):
    import shutil
    out = str(tmp_path / "r")
    shutil.copytree(tiny_run[0], out)
    proc = train(*TINY, "--out", out, "--redo", "ppo", "--ppo-lr", "1e8", "--save-every", "1", check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1 and "stage ppo: gradient norm nan (policy)" in err[0], err
    if os.path.isdir(os.path.join(out, "ppo", "ckpt")):
        from model.checkpoint import load_checkpoint             # refuses a NaN or inf tensor
        load_checkpoint(os.path.join(out, "ppo", "ckpt"))


def test_ppo_cut_short_resumes_to_the_same_iterations(tmp_path, tiny_run):
    """PPO's checkpoint (policy, value, optimizer, every generator, the evaluation history)
    continues a run cut after iteration 2 exactly as if it had never stopped."""
    import shutil
    full_out, _ = tiny_run
    out = str(tmp_path / "r")
    shutil.copytree(full_out, out)
    capped = train(*TINY, "--out", out, "--redo", "ppo", "--max-steps", "2")
    assert "[lm] reusing" in capped.stdout and not record(out, "ppo")["done"]
    assert "[ppo] resuming at iteration 2/3" in train(*TINY, "--out", out, "--resume").stdout
    # (the capped run also evaluated at its last iteration, 2: compare what the full run logged)
    full = rows(os.path.join(full_out, "ppo", "metrics.jsonl"))
    resumed = rows(os.path.join(out, "ppo", "metrics.jsonl"))
    assert [r["iter"] for r in resumed] == [0, 1, 2, 3]
    assert [{k: b[k] for k in a} for a, b in zip(full, resumed)] == full


def test_ppo_cut_by_time_evaluates_the_policy_it_stopped_at(tmp_path, tiny_run):
    """--max-minutes stops PPO after an iteration; that iteration is evaluated (report.json's
    final row is it, not π₀'s iteration 0), as a run evaluating every iteration evaluates it.
    The stage times say which stages an earlier run made."""
    full_out, _ = tiny_run
    cut, every = str(tmp_path / "cut"), str(tmp_path / "every")
    for out in (cut, every):
        shutil.copytree(full_out, out)
    proc = train(*TINY, "--out", cut, "--redo", "ppo", "--max-minutes", "1e-6")
    assert "cut short after iteration 1 of 3" in proc.stdout
    assert "lm " in proc.stdout and "(reused)" in proc.stdout.split("Stage wall time (s):")[1]
    final = json.load(open(os.path.join(cut, "report.json")))["ppo"]["final"]
    train(*TINY, "--out", every, "--redo", "ppo", "--ppo-eval-every", "1", "--max-steps", "1")
    evaluated = rows(os.path.join(every, "ppo", "metrics.jsonl"))[1]
    assert final["iter"] == evaluated["iter"] == 1 and final["eval_kl"] > 0
    assert {k: evaluated[k] for k in final} == final


def test_score_py_reads_a_run_at_the_length_it_was_trained_at(tmp_path, tiny_run):
    """The tiny preset's model allows 128 positions; the run trained at --max-len 64, and
    score.py scores at 64 unless told otherwise: the same scores as an explicit --max-len 64."""
    full_out, _ = tiny_run

    def score(*flags):
        out = tmp_path / f"scores{len(flags)}.jsonl"
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "score.py"), "--rm", full_out, "--data",
                               os.path.join(ROOT, "examples", "pairs.jsonl"), "--out", str(out), *flags],
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout, out.read_text()
    (said, scores), (_, explicit) = score(), score("--max-len", "64")
    assert "max_len 64" in said and scores == explicit


def test_a_moved_run_reads_its_own_models_and_ppo_stops_at_a_step(tmp_path, tiny_run):
    """report.json names absolute paths, but the reward and ppo stages read the rm stage's models
    from --out: a moved run folder uses its own (it read the old folder's, or failed once that was
    gone). --stop-at-step stops PPO as Ctrl-C does, and --resume continues exactly."""
    import shutil
    full_out, _ = tiny_run
    moved = str(tmp_path / "moved")
    shutil.copytree(full_out, moved)
    with open(os.path.join(moved, "rm", "stage.json")) as f:       # as if the original folder had gone
        text = f.read()
    assert full_out in text                                          # the absolute paths it records
    with open(os.path.join(moved, "rm", "stage.json"), "w") as f:
        f.write(text.replace(full_out, str(tmp_path / "gone")))
    stopped = train(*TINY, "--out", moved, "--redo", "ppo", "--stop-at-step", "2", check=False)
    assert stopped.returncode == 1, stopped.stderr
    assert "stage ppo: stopped (--stop-at-step) after iteration 2" in stopped.stderr
    assert "[ppo] resuming at iteration 2/3" in train(*TINY, "--out", moved, "--resume").stdout
    full = rows(os.path.join(full_out, "ppo", "metrics.jsonl"))
    resumed = rows(os.path.join(moved, "ppo", "metrics.jsonl"))
    assert [{k: b[k] for k in a} for a, b in zip(full, resumed)] == full and len(resumed) == len(full)


def test_torchrun_default_stages_match_one_process(tmp_path, tiny_run):
    full_out, _ = tiny_run
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(ROOT, "train.py"), *TINY, "--out", out]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    for rel in ("lm/metrics.jsonl", "rm/helpful/metrics.jsonl", "rm/safety/metrics.jsonl"):
        a, b = losses(os.path.join(full_out, rel)), losses(os.path.join(out, rel))
        # Sums in another order round differently, and training amplifies it: 1e-5 at first,
        # about 4e-5 after 45 steps here.
        assert len(a) == len(b) and a[:10] == pytest.approx(b[:10], rel=0, abs=1e-5), rel
        assert a == pytest.approx(b, rel=0, abs=2e-4), rel
    for stage in ("reward", "ppo"):
        assert record(out, stage)["done"]
    summary = record(out, "ppo")["summary"]
    assert summary["final"]["eval_kl"] != 0.0 and record(out, "reward")["summary"]["n"] == 4
    assert len(rows(os.path.join(out, "reward", "samples.jsonl"))) == 4          # both ranks' samples


def test_bad_flag_missing_file_and_corrupt_checkpoint_give_one_line(tmp_path):
    bad = train("--stages", "tokenizer,nope", check=False)
    assert bad.returncode == 2 and "unknown stage 'nope'" in bad.stderr and "Traceback" not in bad.stderr
    missing = train("--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "m"), check=False)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1     # 2: bad input
    assert "nope.jsonl" in missing.stderr
    (tmp_path / "dropped.jsonl").write_text('{"prompt": "p", "chosen": " a", "rejected": " a"}\n')   # identical
    empty = train("--data", str(tmp_path / "dropped.jsonl"), "--out", str(tmp_path / "e"), check=False)
    assert empty.returncode == 2 and empty.stderr.strip() == "train.py: error: --data: no usable records"
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "rmlab.json").write_text("{ not json")
    corrupt = train(*TINY, "--stages", "lm", "--init-from", str(ck), "--out", str(tmp_path / "c"),
                    check=False)
    assert corrupt.returncode in (1, 2) and "Traceback" not in corrupt.stderr
    assert len(corrupt.stderr.strip().splitlines()) == 1 and "rmlab.json" in corrupt.stderr
    # Found only after training, before: a --policy that is not there, --kernel triton on a CPU
    policy = train("--policy", str(tmp_path / "none"), "--out", str(tmp_path / "p"), check=False)
    assert policy.returncode == 2 and "--policy" in policy.stderr and not (tmp_path / "p").exists()
    import torch
    if not torch.cuda.is_available():
        no_interpreter = {k: v for k, v in env().items() if k != "TRITON_INTERPRET"}
        kernel = subprocess.run([sys.executable, "train.py", "--kernel", "triton", "--out", str(tmp_path / "k")],
                                cwd=ROOT, env=no_interpreter, capture_output=True, text=True, timeout=60)
        assert kernel.returncode == 2 and "TRITON_INTERPRET=1" in kernel.stderr
        assert len(kernel.stderr.strip().splitlines()) == 1 and not (tmp_path / "k").exists()


@pytest.mark.parametrize("lr", ["1e12", "1e3"])      # 1e3: a finite loss with a NaN gradient comes first
def test_nan_loss_stops_with_the_step_and_keeps_the_last_periodic_checkpoint(tmp_path, lr):
    out = str(tmp_path / "nan")
    proc = train(*TINY, "--stages", "tokenizer,lm", "--lm-lr", lr, "--save-every", "1", "--out", out,
                 check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1 and "nan at step" in err[0], err
    from model.checkpoint import load_checkpoint       # refuses a NaN or inf tensor
    step = int(err[0].split("at step ")[1].split(";")[0])
    state = load_checkpoint(os.path.join(out, "lm", "ckpt")).train_state
    assert state["step"] == step - 1 and "kept in" in err[0]     # the step before the NaN, saved and whole


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
    assert proc.returncode == 1 and "interrupted after step" in err and len(err.strip().splitlines()) == 1
    from model.checkpoint import load_checkpoint
    state = load_checkpoint(os.path.join(out, "lm", "ckpt")).train_state
    # The checkpoint holds exactly the steps that completed (one metrics line each).
    assert state is not None and state["step"] >= 3
    assert state["step"] == len(losses(os.path.join(out, "lm", "metrics.jsonl")))


def test_stage_inputs_come_from_the_parser_groups():
    from data.runs import stage_inputs
    from train import STAGES, parse_args
    parser, args = parse_args([])
    inputs = {s: stage_inputs(parser, args, s, "abc") for s in STAGES}
    assert "weight_decay" in inputs["lm"] and "rm_lr" not in inputs["lm"] and "rm_lr" in inputs["ppo"]
    assert "seed" in inputs["tokenizer"] and inputs["tokenizer"]["data_sha256"] == "abc"
    assert "max_len" not in inputs["tokenizer"] and "max_len" in inputs["lm"]   # the tokenizer ignores it
    run_flags = ("out", "resume", "redo", "log_every", "threads", "max_minutes", "max_steps", "save_every",
                 "stop_at_step", "show", "device", "fsdp", "kernel", "stages", "dtype", "accept_drops",
                 "compile")
    assert not any(k in inputs["ppo"] for k in run_flags)
    every_flag = {a.dest for a in parser._actions if a.dest != "help"}
    assert every_flag == set(inputs["ppo"]) - {"data_sha256"} | set(run_flags)   # nothing left out
    assert all(a.help for a in parser._actions)


def test_pi0_fine_tunes_a_pretrained_model_at_llama2s_sft_rate(tmp_path):
    """--lm-lr: 3e-3 trains the built-in world's π₀ from scratch; a pretrained checkpoint gets
    Llama 2's SFT learning rate, 2e-5 (§3.1), unless the flag is given."""
    import train
    (tmp_path / "ck").mkdir()
    assert train.parse_args([])[1].lm_lr == 3e-3
    assert train.parse_args(["--init-from", str(tmp_path / "ck")])[1].lm_lr == 2e-5
    assert train.parse_args(["--init-from", str(tmp_path / "ck"), "--lm-lr", "1e-4"])[1].lm_lr == 1e-4


def test_rm_mixes_follow_llama2_and_the_helpful_safety_share():
    from types import SimpleNamespace
    from data.split import rm_mixes
    # 20 safety prompts of 3 pairs (60 pairs), 30 helpful prompts of 2 pairs (60 pairs); the mixes
    # count pairs, as Llama 2 does, not prompts
    encoded = [SimpleNamespace(is_safety=i % 5 < 2, pairs=[(0, 1)] * (3 if i % 5 < 2 else 2)) for i in range(50)]
    safety = {i for i, e in enumerate(encoded) if e.is_safety}
    for share, n_safety_prompts in ((1.0, 20), (0.5, 10), (0.25, 5), (0.0, 0)):   # 60 pairs at share 1: all 20
        mixes = rm_mixes(encoded, "auto", seed=0, helpful_safety_share=share)
        helpful_mix, safety_mix = mixes["helpful"], mixes["safety"]
        assert len(set(helpful_mix)) == len(helpful_mix) and helpful_mix == sorted(helpful_mix)
        assert len(set(helpful_mix) - safety) == 30 and len(set(helpful_mix) & safety) == n_safety_prompts
        # the safety model: every safety pair plus helpful pairs at 90/10: 60 // 9 = 6 pairs, 3 prompts
        assert set(safety_mix) >= safety and len(set(safety_mix) - safety) == 3
    assert set(rm_mixes(encoded, "single", seed=0)["reward"]) == set(range(50))


def test_spread_takes_held_out_prompts_from_the_whole_split():
    from data.split import spread
    # Two files of 6 and 4 records, loaded one after the other: 5 spread records reach the second.
    records = ["harmless"] * 6 + ["helpful"] * 4
    assert spread(records, 5) == ["harmless", "harmless", "harmless", "helpful", "helpful"]   # 0, 2, 4, 6, 8
    assert spread(list(range(10)), 3) == [0, 3, 6] and spread(list(range(4)), 9) == [0, 1, 2, 3]


def test_fsdp_two_processes_match_one_process_and_save_a_plain_checkpoint(tmp_path):
    """FSDP2 (one unit per block, gloo on CPU): the same losses as one process to 1e-5 for
    several steps, and the checkpoints gathered on rank 0 load in a single process."""
    common = [*TINY, "--stages", "tokenizer,lm,rm", "--lm-steps", "8", "--epochs", "0.3", "--save-every", "3"]
    one, two = str(tmp_path / "one"), str(tmp_path / "fsdp")
    train(*common, "--out", one)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
           os.path.join(ROOT, "train.py"), *common, "--fsdp", "--out", two]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for rel in ("lm/metrics.jsonl", "rm/helpful/metrics.jsonl", "rm/safety/metrics.jsonl"):
        a, b = losses(os.path.join(one, rel)), losses(os.path.join(two, rel))
        assert len(a) == len(b) and a == pytest.approx(b, rel=0, abs=1e-5), rel
    assert len(losses(os.path.join(two, "lm", "metrics.jsonl"))) == 8
    import torch
    from model.checkpoint import load_checkpoint
    for rel in ("lm/model", "lm/ckpt", "rm/helpful/model"):
        a, b = load_checkpoint(os.path.join(one, rel)), load_checkpoint(os.path.join(two, rel))
        for name, tensor in a.model.state_dict().items():
            torch.testing.assert_close(b.model.state_dict()[name], tensor, rtol=0, atol=1e-5)
    # the optimizer state saved under FSDP is whole too: the same moments as one process
    sa, sb = (load_checkpoint(os.path.join(d, "lm", "ckpt")).train_state["optimizer"]["state"]
              for d in (one, two))
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sb[name]["exp_avg"], sa[name]["exp_avg"], rtol=0, atol=1e-6)


def test_torchrun_train_layers_on_a_share_of_an_epoch_matches_one_process(tmp_path):
    """--train-layers caches only the prompts a share of an epoch visits; a rank with nothing to
    do in a step ran prompt 0 with weight 0 and died (KeyError) when prompt 0 was not cached."""
    common = ["--preset", "tiny", "--builtin-prompts", "200", "--lm-steps", "2", "--stages", "tokenizer,lm,rm",
              "--rm-mode", "single", "--train-layers", "1", "--epochs", "0.3", "--batch-pairs", "8",
              "--micro-pairs", "4", "--seed", "1", "--max-len", "64", "--dtype", "fp32", "--log-every", "1"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train(*common, "--out", one)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29521",
           os.path.join(ROOT, "train.py"), *common, "--out", two]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    a, b = (losses(os.path.join(d, "rm", "reward", "metrics.jsonl")) for d in (one, two))
    assert len(a) == len(b) > 0 and a == pytest.approx(b, rel=0, abs=1e-5)


def test_too_little_data_and_a_corrupt_file_are_one_line_before_training(tmp_path):
    tiny = train("--builtin-prompts", "3", "--out", str(tmp_path / "a"), check=False)
    fifty = tmp_path / "fifty.jsonl"
    fifty.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": " yes", "rejected": " no"}) + "\n"
                             for i in range(50)))
    few = train("--data", str(fifty), "--out", str(tmp_path / "b"), check=False)        # 90/5/5 of 50
    broken = tmp_path / "broken.jsonl.gz"
    good = gzip.compress(fifty.read_bytes() * 4)
    broken.write_bytes(good[:20] + bytes(b ^ 0xFF for b in good[20:40]) + good[40:])
    corrupt = train("--data", str(broken), "--out", str(tmp_path / "c"), check=False)
    for proc, needle in ((tiny, "--builtin-prompts: the splits hold"), (few, "--data: the splits hold val 2, test 3 records"),
                         (corrupt, f"{broken}: corrupt gzip stream")):
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and needle in err[0], proc.stderr
    assert not any(os.path.exists(tmp_path / d / "lm") for d in "abc")


def test_bf16_autocast_tracks_fp32(tiny_run, tmp_path):
    """--dtype bf16 (auto's choice on CUDA and AMX CPUs): the same π₀ steps give losses within
    the 2e-2 the performance issue allows bf16, and the run says which precision it used."""
    out = str(tmp_path / "bf16")
    proc = train(*TINY, "--dtype", "bf16", "--stages", "tokenizer,lm", "--out", out)
    assert "bf16 (as asked)" in proc.stdout
    ref = losses(os.path.join(tiny_run[0], "lm", "metrics.jsonl"))
    got = losses(os.path.join(out, "lm", "metrics.jsonl"))
    assert len(got) == len(ref) and got != ref                       # bf16 did run, and rounds differently
    assert got == pytest.approx(ref, rel=2e-2)


def test_compiled_reward_models_train_like_eager_ones(tiny_run, tmp_path):
    """--compile (torch.compile'd blocks) is a run flag: π₀ is reused, and the reward models'
    fp32 losses and test accuracies follow the eager run's (rounding apart)."""
    out = str(tmp_path / "compiled")
    shutil.copytree(tiny_run[0], out)
    proc = train(*TINY, "--stages", "tokenizer,lm,rm", "--redo", "rm", "--compile", "--out", out, timeout=480)
    assert "blocks compiled (--compile)" in proc.stdout and "[lm] step" not in proc.stdout   # π₀ reused
    for kind in ("helpful", "safety"):
        ref = losses(os.path.join(tiny_run[0], "rm", kind, "metrics.jsonl"))
        got = losses(os.path.join(out, "rm", kind, "metrics.jsonl"))
        assert len(got) == len(ref) and got == pytest.approx(ref, rel=1e-4, abs=1e-6), kind
    summary = lambda run: json.load(open(os.path.join(run, "report.json")))["rm"]
    for kind, ref in summary(tiny_run[0]).items():
        assert summary(out)[kind]["test"]["accuracy"] == pytest.approx(ref["test"]["accuracy"], abs=0.01)


GLIBC_HEAP = """
import ctypes, torch
from model.parallel import reuse_freed_memory
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):      # glibc's struct mallinfo2: where the bytes it handed out came from
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
big = 64 << 20
def step():                        # (bytes mapped for the tensor, heap bytes kept after it is freed)
    before = libc.mallinfo2()
    t = torch.ones(big, dtype=torch.uint8)
    mapped = libc.mallinfo2().hblkhd - before.hblkhd
    del t
    return mapped, libc.mallinfo2().arena - before.arena
print(*step(), *(reuse_freed_memory() or step()))
"""


def test_on_a_cpu_freed_activations_stay_on_the_heap_for_the_next_step():
    """train.py's CPU setup (model.parallel.reuse_freed_memory): glibc's own accounting says a 64 MB
    tensor gets pages of its own that go back to the OS when it dies (so the next step faults them
    in again), and after the setting comes from the heap and stays there for the next step."""
    e = {k: v for k, v in env().items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_")}
    probe = subprocess.run([sys.executable, "-c", "import ctypes; ctypes.CDLL('libc.so.6').mallinfo2"],
                           env=e, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("not glibc >= 2.33 (no mallinfo2)")
    out = subprocess.run([sys.executable, "-c", GLIBC_HEAP], cwd=ROOT, env=e, capture_output=True, text=True,
                         check=True).stdout.split()
    mapped_before, kept_before, mapped_after, kept_after = map(int, out)
    big = 64 << 20
    assert mapped_before >= big and kept_before < big     # glibc's default: mapped, unmapped on free
    assert mapped_after == 0 and kept_after > big - (1 << 20)   # now: from the heap (which had some
    # room at its top already), kept for reuse


def test_a_torn_last_metrics_line_is_dropped_and_a_damaged_one_is_one_line(tmp_path):
    """kill -9 during a metrics write tears the last line; --resume must not trip on it."""
    from data.runs import Fatal, keep_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert keep_metrics(str(path), 2) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert rows(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(Fatal, match="metrics.jsonl:line 2: not a metrics row; --redo this stage"):
        keep_metrics(str(path), 2)


def test_a_kill_while_metrics_are_cut_back_keeps_every_step(tmp_path, monkeypatch):
    """keep_metrics rewrites metrics.jsonl on --resume: a kill mid-write must not lose the steps."""
    import data.runs
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.0}\n')

    def killed(target, rows, mode="a"):
        open(target, mode).write("{")                     # half a write, then the kill
        raise KeyboardInterrupt
    monkeypatch.setattr(data.runs, "write_metrics", killed)
    with pytest.raises(KeyboardInterrupt):
        data.runs.keep_metrics(str(path), 2)
    assert [r["step"] for r in rows(path)] == [1, 2, 3]


def test_a_kill_during_redo_leaves_no_finished_stage_without_its_model(tmp_path, monkeypatch):
    import data.runs
    from data.runs import Fatal, open_stage
    folder = str(tmp_path / "lm")
    os.makedirs(os.path.join(folder, "model"))
    data.runs.write_json(os.path.join(folder, "stage.json"), {"inputs": {}, "upstream": "", "id": "a",
                                                              "done": True})

    def killed(*args, **kwargs):                   # rmtree took the model first, then the kill came
        os.rmdir(os.path.join(folder, "model"))
        raise KeyboardInterrupt
    monkeypatch.setattr(data.runs.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        open_stage(folder, "lm", {}, "", 0, redo=True, resume=False)
    monkeypatch.undo()
    assert open_stage(folder, "lm", {}, "", 0, redo=False, resume=True)["mode"] == "fresh"   # not "reuse"
    whole = {"inputs": {}, "upstream": "", "id": "a", "done": False}
    for damaged in ({"inputs": 5, "upstream": ""}, {"inputs": {}}, "inputs", {}, [], 0,
                    {**whole, "done": "false"}, {k: v for k, v in whole.items() if k != "done"}):
        data.runs.write_json(os.path.join(folder, "stage.json"), damaged)
        with pytest.raises(Fatal, match="is not a stage record of this train.py; use --redo lm"):
            open_stage(folder, "lm", {}, "", 0, redo=False, resume=True)


def test_a_second_train_py_on_the_same_out_is_one_line(tmp_path):
    """Two runs on one --out would interleave checkpoints and metrics.jsonl: the second stops."""
    import fcntl
    from data.runs import Fatal, open_stage
    with open(tmp_path / ".lock", "a") as other:          # the other train.py's lock (another process's)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(Fatal, match="another train.py is running on this --out"):
            open_stage(str(tmp_path / "lm"), "lm", {}, "", 0, redo=False, resume=False)
        assert not (tmp_path / "lm").exists()
    assert open_stage(str(tmp_path / "lm"), "lm", {}, "", 0, redo=False, resume=False)["mode"] == "fresh"


def test_a_save_cut_between_its_renames_resumes_from_the_previous_checkpoint(tmp_path):
    from model import Llama, get_preset
    from model.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
    ckpt = str(tmp_path / "ckpt")
    torch_model = Llama(get_preset("tiny"), head="lm")
    save_checkpoint(ckpt, torch_model, meta={"step": 4})
    os.rename(ckpt, str(tmp_path / ".ckpt.old-1a2b3c4d"))      # the kill: aside, and the new one not in
    assert has_checkpoint(ckpt) and load_checkpoint(ckpt).meta["step"] == 4
    assert not has_checkpoint(str(tmp_path / "none"))
    # Every rank of a torchrun job asks at once: all must see it, none may raise.
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    for round in range(20):
        os.rename(ckpt, str(tmp_path / f".ckpt.old-{round:08x}"))
        barrier, answers = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_ask_after_barrier, args=(barrier, ckpt, answers)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [answers.get(timeout=5) for _ in procs] == [True, True], round


def _ask_after_barrier(barrier, ckpt, answers):
    from model.checkpoint import has_checkpoint
    barrier.wait()
    try:
        answers.put(has_checkpoint(ckpt))
    except Exception as e:                  # noqa: BLE001 (reported, not raised, in a child)
        answers.put(repr(e))


@pytest.mark.parametrize("train_state", [{"step": 3}, {"optimizer": {"state": 5}, "rng": None, "step": 1}])
def test_another_stages_or_a_damaged_training_state_is_one_line(tmp_path, train_state):
    """A train_state.pt copied from another stage (PPO's into lm/ckpt, or the reverse) or damaged."""
    from model import Llama, get_preset
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.files import CheckpointError
    from model.optim import make_optimizer
    from model.parallel import restore_training
    from model.ppo import restore_ppo
    model = Llama(get_preset("tiny"), head="lm")
    save_checkpoint(str(tmp_path / "c"), model, train_state=train_state)
    saved = load_checkpoint(str(tmp_path / "c"))
    with pytest.raises(CheckpointError, match="training state does not fit this stage .*; --redo the stage"):
        restore_training(saved, model, make_optimizer(model, 1e-3, 0.1))
    with pytest.raises(CheckpointError, match="is not PPO's"):
        restore_ppo(saved, None, None, [], 0)


def test_train_imports_only_what_the_gpu_machine_has(tmp_path):
    """bench/gpu_check.py runs train.py on a lent GPU machine that cannot install packages: it has
    torch (with jinja2), triton, numpy, safetensors, sentencepiece and einops. train.py and every
    module it imports at start must load without the rest (tqdm, matplotlib, tokenizers, gguf, ...)."""
    blocked = ["tqdm", "matplotlib", "tokenizers", "gguf", "google", "transformers", "accelerate",
               "huggingface_hub", "hypothesis", "pytest", "yaml", "PIL"]
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked))
    e = {**env(), "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-c", "import train, score; print('ok')"], cwd=ROOT, env=e,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
