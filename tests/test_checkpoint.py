"""Our checkpoint directory: exact round trips, atomic replacement, and errors that name the file."""
import json
import re
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model import Llama, Tokenizer, get_preset
from model import checkpoint as ckpt
from model.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"a {w} ran past {n} trees, then {w} slept" for n in range(40) for w in ("fox", "hen", "elk")]
    return Tokenizer.train(texts, str(tmp_path_factory.mktemp("tok") / "tok"), vocab_size=300)


def tiny_model(head="lm", tied=False, seed=0):
    torch.manual_seed(seed)
    return Llama(get_preset("tiny", dim=32, hidden_dim=48, vocab_size=320, tie_embeddings=tied), head=head)


def assert_same(a, b, where="train_state"):
    """Exact equality of nested containers, tensors compared bit for bit (and by dtype)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_weights(a, b):
    assert_same(dict(a.state_dict()), dict(b.state_dict()), "state_dict")


def trained_state(model):
    """A real resumable state: AdamW after two steps, every RNG, and a data position."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randint(0, 300, (2, 6))).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt, {"optimizer": opt.state_dict(), "step": 2, "rng": ckpt.rng_state(),
                 "data": {"epoch": 0, "position": 17, "order": [3, 1, 2]}, "best_val": 0.625}


def test_save_load_roundtrip_is_exact(tmp_path, tok):
    model = tiny_model()
    opt, state = trained_state(model)
    meta = {"val_reward_mean": 0.25, "val_reward_std": 1.5, "train_config": {"lr": 1e-3, "stage": "rm"}}
    path = save_checkpoint(tmp_path / "run", model, tokenizer=tok, meta=meta, train_state=state)
    assert sorted(os.listdir(path)) == ["model.safetensors", "rmlab.json", "tokenizer.model", "train_state.pt"]
    with open(os.path.join(path, "rmlab.json")) as f:
        manifest = json.load(f)
    assert manifest["format"] == "rmlab-checkpoint" and manifest["head"] == "lm"

    ck = load_checkpoint(path)
    assert_same_weights(model, ck.model)
    assert ck.model.config == model.config and ck.new_params == []
    assert ck.meta == meta and ck.tokenizer.model_proto() == tok.model_proto()
    assert_same(state, ck.train_state)

    # The loaded state resumes: the optimizer accepts it, and the RNGs continue where they were.
    torch.optim.AdamW(ck.model.parameters(), lr=1e-3).load_state_dict(ck.train_state["optimizer"])
    draws = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.set_rng_state(ck.train_state["rng"])
    assert_same(draws, (random.random(), np.random.rand(), torch.rand(3)), "draws after set_rng_state")


@pytest.mark.parametrize("head,tied", [("lm", True), ("reward", False)])
def test_heads_roundtrip(tmp_path, head, tied):
    model = tiny_model(head, tied, seed=1)
    if head == "reward":
        with torch.no_grad():
            model.head.bias.fill_(0.375)
    path = save_checkpoint(tmp_path / "run", model)
    stored = load_file(os.path.join(path, "model.safetensors"))
    assert ("head.weight" in stored) == (not tied)   # a tied head is stored once, as the embedding
    loaded = load_model(path)
    assert loaded.head_kind == head
    assert_same_weights(model, loaded)
    assert (loaded.head.weight is loaded.tok_embeddings.weight) == tied


def test_swapping_head_on_load_reports_new_params(tmp_path):
    lm = tiny_model("lm", seed=2)
    path = save_checkpoint(tmp_path / "lm", lm)
    ck = load_checkpoint(path, head="reward")
    assert ck.new_params == ["head.weight", "head.bias"] and ck.model.head_kind == "reward"
    trunk = {n: t for n, t in lm.state_dict().items() if not n.startswith("head.")}
    assert_same(trunk, {n: t for n, t in ck.model.state_dict().items() if not n.startswith("head.")}, "trunk")
    path = save_checkpoint(tmp_path / "rm", ck.model)
    assert load_checkpoint(path, head="lm").new_params == ["head.weight"]
    assert load_checkpoint(path, head="reward").new_params == []


# ---- atomic writes ---------------------------------------------------------------------------------

def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    old, new = tiny_model(seed=3), tiny_model(seed=4)
    path = save_checkpoint(tmp_path / "run", old, meta={"v": 1})
    with open(os.path.join(path, "log.txt"), "w") as f:
        f.write("step 1\n")

    def half_written(tensors, filename, metadata=None):   # the disk fills mid-write
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", half_written)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, new, meta={"v": 2})
    monkeypatch.undo()
    ck = load_checkpoint(path)
    assert ck.meta == {"v": 1}
    assert_same_weights(old, ck.model)
    assert sorted(os.listdir(tmp_path)) == ["run"]      # no temporary directory left behind

    # Failing at the last step, the rename into place: the old directory is put back.
    real_rename = os.rename

    def rename_fails_into_place(src, dst):
        if os.path.basename(src).startswith(".run.tmp-"):
            raise OSError("interrupted")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename_fails_into_place)
    with pytest.raises(OSError, match="interrupted"):
        save_checkpoint(path, new, meta={"v": 2})
    monkeypatch.undo()
    assert load_checkpoint(path).meta == {"v": 1} and sorted(os.listdir(tmp_path)) == ["run"]

    # A successful save replaces our files and keeps the others (a log being written there).
    save_checkpoint(path, new, meta={"v": 2})
    ck = load_checkpoint(path)
    assert ck.meta == {"v": 2} and ck.train_state is None
    assert_same_weights(new, ck.model)
    assert open(os.path.join(path, "log.txt")).read() == "step 1\n"
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_a_save_over_another_format_leaves_none_of_its_files(tmp_path, tok):
    """Every file a loader reads is replaced: a stale chat_template.jinja would override the exported
    template, and a stale rmlab.json (read before config.json) would make an HF export unloadable."""
    from model.checkpoint import export_hf
    model = tiny_model(seed=5)
    path = save_checkpoint(tmp_path / "run", model, tokenizer=tok)
    for name, text in (("chat_template.jinja", "STALE {{ messages }}"), ("notes.txt", "mine")):
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    export_hf(model, path)                                   # no tokenizer this time
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "notes.txt"]
    ck = load_checkpoint(path)
    assert ck.tokenizer is None
    assert_same_weights(model, ck.model)


def test_a_save_through_a_symlink_replaces_its_target(tmp_path):
    old, new = tiny_model(seed=3), tiny_model(seed=4)
    save_checkpoint(tmp_path / "real", old)
    os.symlink(tmp_path / "real", tmp_path / "link")
    save_checkpoint(tmp_path / "link", new)
    assert os.path.islink(tmp_path / "link") and sorted(os.listdir(tmp_path)) == ["link", "real"]
    assert_same_weights(new, load_checkpoint(tmp_path / "real").model)


def test_legacy_torch_files_load_without_mmap(tmp_path):
    """torch.save's pre-1.6 format (old pytorch_model.bin files) cannot be memory-mapped: read it whole."""
    from model.files import read_torch
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(sd, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    assert torch.equal(read_torch(str(tmp_path / "old.bin"), "cpu")["w"], sd["w"])


def test_a_full_disk_under_torch_save_is_an_oserror_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    old = tiny_model(seed=3)
    path = save_checkpoint(tmp_path / "run", old, train_state={"step": 1})

    def disk_full(obj, f):                 # what torch's zip writer raises when the disk fills
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(OSError, match="train_state.pt: not written"):       # train.py: one line, exit 1
        save_checkpoint(path, tiny_model(seed=4), train_state={"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path).train_state == {"step": 1} and sorted(os.listdir(tmp_path)) == ["run"]


def test_refused_save_touches_nothing(tmp_path):
    model = tiny_model(seed=5)
    path = save_checkpoint(tmp_path / "run", model, meta={"v": 1})
    with pytest.raises(ValueError, match=r"train_state\['rng'\]\['numpy'\] is a numpy.ndarray"):
        save_checkpoint(path, model, train_state={"rng": {"numpy": np.zeros(3)}})
    with pytest.raises(ValueError, match=r"train_state\['loss'\] is a numpy.float64"):
        save_checkpoint(path, model, train_state={"loss": np.float64(1.0)})
    with pytest.raises(ValueError, match="meta is not JSON-serialisable"):
        save_checkpoint(path, model, meta={"tensor": torch.ones(1)})
    assert load_checkpoint(path).meta == {"v": 1}


# ---- errors name the file ------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path, tok):
    model = tiny_model(seed=6)
    return save_checkpoint(tmp_path / "run", model, tokenizer=tok, train_state={"step": 1})


def test_missing_files(tmp_path, saved):
    with pytest.raises(CheckpointError, match="nowhere: checkpoint directory not found"):
        load_checkpoint(tmp_path / "nowhere")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="empty: not a checkpoint directory"):
        load_checkpoint(tmp_path / "empty")
    for name in ("tokenizer.model", "model.safetensors"):
        os.remove(os.path.join(saved, name))
        with pytest.raises(CheckpointError, match=f"run/{name}: file not found"):
            load_checkpoint(saved)


def test_corrupt_files(saved):
    weights = os.path.join(saved, "model.safetensors")
    data = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="run/model.safetensors: corrupt or unreadable safetensors"):
        load_checkpoint(saved)
    with open(weights, "wb") as f:
        f.write(data)

    for name, junk, message in [
        ("rmlab.json", b'{"format": "rmlab-checkpoint",\n  "version": ', r"rmlab.json: not valid JSON \(line 2"),
        ("tokenizer.model", b"not a protobuf" * 10, "tokenizer.model: not a SentencePiece model"),
        ("train_state.pt", b"PK\x03\x04 truncated zip", r"train_state.pt: cannot be read with torch.load"),
    ]:
        path = os.path.join(saved, name)
        good = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(junk)
        with pytest.raises(CheckpointError, match=f"run/{message}"):
            load_checkpoint(saved)
        with open(path, "wb") as f:
            f.write(good)
    load_checkpoint(saved)   # every file restored: loads again


@pytest.mark.parametrize("field, value, message", [
    ("config.n_kv_heads", 0, "n_kv_heads must be a positive int, got 0"),           # ZeroDivisionError before
    ("config.n_layers", 2.0, "n_layers must be a positive int, got 2.0"),
    ("config.norm_eps", -1e-5, "norm_eps must be a positive number"),                 # NaN scores before
    ("config.rope_theta", "1e4", "rope_theta must be a positive number"),
    ("config.tie_embeddings", "no", "tie_embeddings must be true or false"),
    ("files", [["model.safetensors"]], "field 'files' is"),
    ("tokenizer", ["sentencepiece"], "field 'tokenizer' is"),
    ("meta", [1], "field 'meta' is"),
    ("tokenizer.add_bos", "false", "field 'tokenizer.add_bos' is 'false', not true/false"),   # read as true before
])
def test_a_manifest_field_of_the_wrong_type_or_range_is_one_error(saved, field, value, message):
    path = os.path.join(saved, "rmlab.json")
    manifest = json.load(open(path))
    *parents, key = field.split(".")
    node = manifest
    for name in parents:
        node = node[name]
    node[key] = value
    json.dump(manifest, open(path, "w"))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(saved)


def test_tensors_that_do_not_match_the_config(saved):
    weights = os.path.join(saved, "model.safetensors")
    good = load_file(weights)
    cases = [
        ({**good, "layers.1.ffn_norm.weight": torch.ones(31)},
         r"run/model.safetensors: tensor 'layers.1.ffn_norm.weight' has shape \(31,\), but the config implies \(32,\)"),
        ({n: t for n, t in good.items() if n != "norm.weight"}, r"run/model.safetensors: .*missing \['norm.weight'\]"),
        ({**good, "layers.2.ffn_norm.weight": torch.ones(32)}, r"unexpected \['layers.2.ffn_norm.weight'\]"),
    ]
    for tensors, message in cases:
        save_file(tensors, weights)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(saved)


def test_never_unpickles_code(saved):
    marker = os.path.join(os.path.dirname(saved), "payload-ran")

    class Payload:   # unpickling it would call os.makedirs(marker)
        def __reduce__(self):
            return (os.makedirs, (marker,))

    torch.save({"step": Payload()}, os.path.join(saved, "train_state.pt"))
    with pytest.raises(CheckpointError, match="train_state.pt: holds pickled objects other than tensors"):
        load_checkpoint(saved)
    assert not os.path.exists(marker)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_map_location_cuda(tmp_path, tok):
    model = tiny_model("reward", seed=7)
    path = save_checkpoint(tmp_path / "run", model.cuda(), tokenizer=tok, train_state={"rng": ckpt.rng_state()})
    ck = load_checkpoint(path, map_location="cuda")
    assert ck.model.head.weight.is_cuda and ck.train_state["rng"]["torch"].device.type == "cpu"
    assert_same_weights(model, ck.model)
    ckpt.export_hf(ck.model, tmp_path / "hf")
    assert_same_weights(model.cpu(), load_checkpoint(tmp_path / "hf").model)
