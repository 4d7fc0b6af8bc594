"""train.py --init-from a chat model: pairs in its chat format, --train-layers, and score.py.

The checkpoint is a small random Llama exported with SmolLM2's own tokenizer and chat template,
so that train.py runs in seconds on real HH pairs. score.py, reading the saved model the way
a user would, must give the test pairs the same rewards as train.py's own evaluation did.
"""
import gzip
import json
import os
import subprocess
import sys

import pytest
import torch

from data import load_records, split_records
from model import Llama, LlamaConfig
from model.checkpoint import export_hf, load_checkpoint
from test_train import ROOT, env, train

HH = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf", "helpful-base", "test.jsonl.gz")
SPLIT = "0.6,0.2,0.2"


@pytest.fixture(scope="module")
def chat_run(smollm2, tmp_path_factory):
    if not os.path.isfile(HH):
        pytest.skip("../shared/data/hh-rlhf is not present")
    d = tmp_path_factory.mktemp("chat")
    tok = smollm2.tokenizer
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                              hidden_dim=128, max_seq_len=1024))
    hf = export_hf(model, d / "hf", tokenizer=tok)
    data = str(d / "pairs.jsonl")
    with gzip.open(HH, "rt") as f, open(data, "w") as out:      # 60 short pairs: nothing is cut at 384
        out.writelines([line for line in f if len(line) < 1000][:60])
    out = str(d / "run")
    proc = train("--init-from", hf, "--data", data, "--out", out, "--stages", "rm", "--train-layers", "1",
                 "--max-len", "384", "--epochs", "2", "--batch-pairs", "8", "--micro-pairs", "8",
                 "--split", SPLIT, "--log-every", "5", "--dtype", "fp32")
    return dict(hf=hf, data=data, out=out, proc=proc, dir=d)


def test_train_layers_trains_the_top_block_in_the_chat_format(chat_run):
    out, stdout = chat_run["out"], chat_run["proc"].stdout
    assert "in the checkpoint's chat format" in stdout and "caching" in chat_run["proc"].stderr
    init = load_checkpoint(chat_run["hf"]).model.state_dict()
    rm = load_checkpoint(os.path.join(out, "rm", "reward", "model"))
    assert rm.meta["chat_format"] is True and rm.tokenizer.chat_template == load_checkpoint(
        chat_run["hf"]).tokenizer.chat_template
    saved = rm.model.state_dict()
    for name, value in init.items():           # a whole model: the frozen part is π₀'s, the top block moved
        if name.startswith(("tok_embeddings.", "layers.0.", "layers.1.")):
            assert torch.equal(saved[name], value), name
        elif name.startswith("layers.2."):
            assert not torch.equal(saved[name], value), name
    caches = os.listdir(os.path.join(out, "cache"))       # train, val and test: evaluation reads them too
    assert len(caches) == 3 and all(json.load(open(os.path.join(out, "cache", c, "key.json")))["first_layer"] == 2
                                    for c in caches)


def test_score_py_gives_the_test_pairs_the_rewards_of_training_evaluation(chat_run):
    summary = json.load(open(os.path.join(chat_run["out"], "rm", "stage.json")))["summary"]["models"]["reward"]
    scores = str(chat_run["dir"] / "scores.jsonl")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "score.py"), "--rm", chat_run["out"], "--data",
                           chat_run["data"], "--out", scores, "--max-len", "384", "--dtype", "fp32"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    records, _ = load_records(chat_run["data"])
    test = {r.origin for r in split_records(records, dict(zip(("train", "val", "test"),
                                                              map(float, SPLIT.split(",")))))["test"]}
    rows = [json.loads(line) for line in open(scores)]
    gaps = [row["score_chosen"] - row["score_rejected"] for rec, row in zip(records, rows) if rec.origin in test]
    assert len(gaps) == summary["test"]["n"] > 0
    assert sum(g > 0 for g in gaps) / len(gaps) == summary["test"]["accuracy"]
    assert sum(gaps) / len(gaps) == pytest.approx(summary["test"]["mean_gap"], rel=1e-5, abs=1e-6)
    assert summary["test"]["mean_gap"] != 0


def test_a_second_run_reuses_the_cache(chat_run):
    proc = train("--init-from", chat_run["hf"], "--data", chat_run["data"], "--out", chat_run["out"], "--stages",
                 "rm", "--train-layers", "1", "--max-len", "384", "--epochs", "2", "--batch-pairs", "8",
                 "--micro-pairs", "8", "--split", SPLIT, "--log-every", "5", "--redo", "rm", "--dtype", "fp32")
    assert proc.stdout.count("reusing") == 3 and "caching" not in proc.stderr
    assert len(os.listdir(os.path.join(chat_run["out"], "cache"))) == 3


def test_a_fraction_of_an_epoch_caches_only_the_prompts_it_trains_on(chat_run, tmp_path):
    # --epochs 0.5: a seeded half of the training prompts, and the caching pass (the expensive
    # part from a pretrained model) computes only those; val and test are cached whole.
    out = str(tmp_path / "half")
    proc = train("--init-from", chat_run["hf"], "--data", chat_run["data"], "--out", out, "--stages", "rm",
                 "--train-layers", "1", "--max-len", "384", "--epochs", "0.5", "--batch-pairs", "8",
                 "--split", SPLIT, "--dtype", "fp32")
    records, _ = load_records(chat_run["data"])
    splits = split_records(records, dict(zip(("train", "val", "test"), map(float, SPLIT.split(",")))))
    cached = [json.load(open(os.path.join(out, "cache", c, "key.json")))["n_examples"]
              for c in os.listdir(os.path.join(out, "cache"))]
    expected = [round(0.5 * len(splits["train"])), len(splits["val"]), len(splits["test"])]
    assert sorted(cached) == sorted(expected), proc.stdout


def test_torchrun_fills_the_same_cache_and_trains_the_same_model(chat_run, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29523",
           os.path.join(ROOT, "train.py"), "--init-from", chat_run["hf"], "--data", chat_run["data"], "--out", out,
           "--stages", "rm", "--train-layers", "1", "--max-len", "384", "--epochs", "2", "--batch-pairs", "8",
           "--micro-pairs", "8", "--split", SPLIT, "--log-every", "5", "--dtype", "fp32"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (sorted(os.listdir(os.path.join(d, "cache"))) for d in (chat_run["out"], out))
    assert one == two            # the same keys, and each rank's share of the rows in one file per split
    read = lambda d, key: open(os.path.join(d, "cache", key, "states.npy"), "rb").read()
    assert all(read(chat_run["out"], key) == read(out, key) for key in one)
    test = lambda d: json.load(open(os.path.join(d, "rm", "stage.json")))["summary"]["models"]["reward"]["test"]
    assert test(out)["mean_gap"] == pytest.approx(test(chat_run["out"])["mean_gap"], rel=1e-4)
