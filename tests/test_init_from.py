"""train.py --init-from: a pretrained checkpoint is π₀ and brings its own tokenizer.

The checkpoint here is a tiny Hugging Face directory written by export_hf, with a tokenizer.json
in Llama 3's layout (BOS added by its post-processor, an end-of-turn eos, no pad). The rm stage
must train with exactly that tokenizer; the tokenizer and lm stages must not run; every misuse
is one line before any training.
"""
import json
import os
import random

import pytest
import torch

from model import Llama, LlamaConfig
from model.checkpoint import export_hf, load_checkpoint
from model.tokenizer import load_tokenizer
from test_tokenizers import llama3_style_dir
from test_train import train

WORDS = "he hell hello world fox ran past the old tree and slept".split()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("init")
    tok = load_tokenizer(llama3_style_dir(str(d / "tok"))[0])
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                              hidden_dim=48, max_seq_len=64))
    rng = random.Random(0)
    say = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))
    with open(d / "pairs.jsonl", "w") as f:
        for i in range(80):
            f.write(json.dumps({"prompt": f"q{i}: " + say(4), "chosen": " " + say(3), "rejected": " " + say(2)}) + "\n")
    return {"hf": export_hf(model, d / "hf", tokenizer=tok), "bare": export_hf(model, d / "bare"),
            "tok": os.path.join(d, "tok", "tokenizer.json"), "data": str(d / "pairs.jsonl"), "dir": d}


ARGS = ["--max-len", "48", "--epochs", "1", "--batch-pairs", "8", "--micro-pairs", "8", "--reward-prompts", "2",
        "--max-new-tokens", "4", "--split", "0.6,0.2,0.2", "--log-every", "5"]


def test_init_from_trains_reward_models_with_the_checkpoints_tokenizer(files):
    out = str(files["dir"] / "run")
    train("--init-from", files["hf"], "--data", files["data"], "--out", out, *ARGS)
    assert not os.path.exists(os.path.join(out, "tokenizer")) and not os.path.exists(os.path.join(out, "lm"))
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["tokenizer"] == {"from": os.path.abspath(files["hf"])} == report["lm"]
    rm = load_checkpoint(os.path.join(out, "rm", "reward", "model"))
    init = load_checkpoint(files["hf"]).tokenizer
    assert rm.model.head_kind == "reward" and rm.tokenizer.kind == "tokenizers"
    assert (rm.tokenizer.bos_prefix, rm.tokenizer.eos_ids, rm.tokenizer.pad_id) == \
        (init.bos_prefix, init.eos_ids, init.pad_id)
    assert rm.tokenizer.encode("hello old tree") == init.encode("hello old tree")


@pytest.mark.parametrize("case, needle", [
    ("own tokenizer and --tokenizer", "carries its own tokenizer"),
    ("no tokenizer at all", "no tokenizer rmlab can read beside it; pass --tokenizer"),
    ("a vocabulary bigger than the embedding", "pieces but"),
    ("the tokenizer stage named", "the tokenizer stage never runs"),
])
def test_misuse_is_one_line_before_training(files, tmp_path, case, needle):
    extra = {"own tokenizer and --tokenizer": ["--init-from", files["hf"], "--tokenizer", files["tok"]],
             "no tokenizer at all": ["--init-from", files["bare"]],
             "a vocabulary bigger than the embedding": ["--init-from", files["bare"], "--tokenizer", big_tokenizer(tmp_path)],
             "the tokenizer stage named": ["--init-from", files["hf"], "--stages", "tokenizer,rm"]}[case]
    proc = train(*extra, "--data", files["data"], "--out", str(tmp_path / "run"), *ARGS, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "run" / "rm")


def test_a_max_len_beyond_the_checkpoints_context_is_one_line(files, tmp_path):
    # max_seq_len 64: training at 65 would reach positions the model never saw, and score.py refuses them
    proc = train("--init-from", files["hf"], "--data", files["data"], "--out", str(tmp_path / "run"), *ARGS,
                 "--max-len", "65", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--max-len 65 is beyond" in proc.stderr and "context of 64 tokens" in proc.stderr


def big_tokenizer(tmp_path):
    from model import Tokenizer
    texts = [f"word{i} other{i * 7} thing{i % 13}" for i in range(400)]
    return Tokenizer.train(texts, str(tmp_path / "big"), vocab_size=600).model_path
