"""Checkpoints: our run directories, and one loader for ours, Hugging Face, Meta and GGUF.

Our checkpoint directory, recognised by its manifest (so it is never taken for an HF dir):

    rmlab.json          {"format": "rmlab-checkpoint", "version": 2, "config": LlamaConfig dict,
                         "head": "lm" | "reward", "files": [...], "tokenizer": {...}, "meta": {...}}
                        `tokenizer` (version 2): the kind stored and its specials() (special
                        ids, whether BOS starts a sequence, the chat template).
                        `meta` is the caller's: saved statistics (validation reward mean/std,
                        bias shift), the train config, anything JSON can hold.
                        Version 1 manifests (no `tokenizer`, no rope_scaling/head_dim) still load.
    model.safetensors   our parameter names; a tied LM head is stored once, as tok_embeddings.
    tokenizer.model     a SentencePiece model's bytes, or
    tokenizer.json      a Hugging Face tokenizers tokenizer (when a tokenizer is given).
    train_state.pt      optional resumable state (optimizer, step, RNG, data position), in the
                        types torch.load(weights_only=True) reads back (_check_plain; rng_state()).

Writes are atomic (files.atomic_dir): an interrupted save leaves the previous checkpoint whole,
and files of an existing directory that the save does not write (a log, a report) are kept.

load_checkpoint(path) also reads Hugging Face and Meta Llama directories (model/formats.py) and
GGUF files (model/gguf.py); README's "Real checkpoints" table lists what is read and what is
refused. Every unreadable input raises CheckpointError (a ValueError) whose message names the
file, and so do non-finite weights.
"""
import glob
import json
import os
import random
from collections import OrderedDict
from typing import List, NamedTuple, Optional

import numpy as np
import torch
from safetensors.torch import save_file

from .config import LlamaConfig
from .files import (CheckpointError, atomic_dir, build, check_tensors, need_file, read_json, read_safetensors,
                    read_tokenizer, read_torch, weights_to_save)
from .formats import export_hf  # noqa: F401  (model.checkpoint.export_hf, as before the split)
from .formats import (CHECKPOINT_FILES, HF_CONFIG, HF_TOKENIZER, META_PARAMS, SP_TOKENIZER, read_hf,
                      read_meta)
from .gguf import read_gguf
from .llama import HEADS, Llama
from .tokenizer import HFTokenizer

FORMAT, VERSION = "rmlab-checkpoint", 2
MANIFEST = "rmlab.json"
WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
assert {MANIFEST, WEIGHTS, TRAIN_STATE} <= set(CHECKPOINT_FILES)


class Checkpoint(NamedTuple):
    model: Llama
    tokenizer: object               # model.tokenizer.Tokenizer | HFTokenizer | None
    meta: dict                      # ours: the saved `meta`; HF/Meta: where it came from
    train_state: Optional[dict]
    new_params: List[str]           # parameters initialised fresh because `head` was swapped


# ---- our format ---------------------------------------------------------------------------------

def _read_ours(d: str, device: str):
    manifest_path = os.path.join(d, MANIFEST)
    m = read_json(manifest_path)
    if m.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: field 'format' is {m.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(m.get("version"), int) or m["version"] > VERSION:
        raise CheckpointError(f"{manifest_path}: field 'version' is {m.get('version')!r}; this code reads "
                              f"<= {VERSION}")
    try:
        cfg = LlamaConfig.from_dict(m["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{manifest_path}: field 'config' is not a LlamaConfig ({e!r})") from None
    head = m.get("head")
    if head not in HEADS:
        raise CheckpointError(f"{manifest_path}: field 'head' is {head!r}, expected one of {HEADS}")
    files = m.get("files", [WEIGHTS])
    allowed = {WEIGHTS, SP_TOKENIZER, HF_TOKENIZER, TRAIN_STATE}
    if not (isinstance(files, list) and all(isinstance(f, str) for f in files) and WEIGHTS in files
            and set(files) <= allowed and not {SP_TOKENIZER, HF_TOKENIZER} <= set(files)):
        raise CheckpointError(f"{manifest_path}: field 'files' is {files!r}")
    for name in files:  # a file the manifest lists but the directory lacks is an error, not a None
        need_file(os.path.join(d, name))
    weights_path = os.path.join(d, WEIGHTS)
    sd = read_safetensors(weights_path, device)
    check_tensors(sd, [], cfg, head, weights_path)
    tok, specials = None, m.get("tokenizer", {})
    for name in ("tokenizer", "meta"):
        if not isinstance(m.get(name, {}), dict):
            raise CheckpointError(f"{manifest_path}: field {name!r} is {m[name]!r}, not an object")
    if not isinstance(specials.get("add_bos", True), bool):
        raise CheckpointError(f"{manifest_path}: field 'tokenizer.add_bos' is {specials['add_bos']!r}, "
                              "not true/false")
    if SP_TOKENIZER in files:
        tok = read_tokenizer(os.path.join(d, SP_TOKENIZER))
        tok.set_specials(specials.get("add_bos", True), specials.get("chat_template"),
                         specials.get("eos_ids"))
    elif HF_TOKENIZER in files:
        path = os.path.join(d, HF_TOKENIZER)
        try:
            tok = HFTokenizer.from_file(path, **{k: v for k, v in specials.items() if k != "kind"})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{manifest_path}: field 'tokenizer' does not describe {path} "
                                  f"({e})") from None
    state = None
    if TRAIN_STATE in files:  # on the CPU: RNG states must be, and optimizer.load_state_dict moves the rest
        state = read_torch(os.path.join(d, TRAIN_STATE), "cpu", tensors_only=False)
    return cfg, head, sd, tok, m.get("meta", {}), state


_PLAIN_LEAVES = (int, float, complex, bool, str, bytes, type(None), torch.Tensor, torch.nn.Parameter,
                 torch.dtype, torch.device, torch.Size)


def _check_plain(obj, where: str):
    """Raises ValueError naming the first value torch.load(weights_only=True) could not read back.

    Exact types: np.float64 is a float subclass and pickles as a numpy object; a namedtuple
    pickles as its class.
    """
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            _check_plain(k, f"{where} key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
    elif type(obj) in (list, tuple, set):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif type(obj) not in _PLAIN_LEAVES:
        raise ValueError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
                         "torch.load(weights_only=True) cannot read back; use dicts, lists, tuples, "
                         "Python numbers, strings and tensors (rng_state() converts the RNGs)")


def save_checkpoint(run_dir, model: Llama, tokenizer=None,
                    meta: Optional[dict] = None, train_state: Optional[dict] = None) -> str:
    """Writes our checkpoint directory atomically (see the module docstring). Returns its path."""
    # Everything is checked before the first byte is written: a refused save touches nothing.
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    if train_state is not None:
        if not isinstance(train_state, dict):
            raise ValueError(f"train_state must be a dict, got {type(train_state).__name__}")
        _check_plain(train_state, "train_state")
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    tok_file = None if tokenizer is None else HF_TOKENIZER if tokenizer.kind == "tokenizers" else SP_TOKENIZER
    files = [WEIGHTS] + ([tok_file] if tok_file else []) + ([TRAIN_STATE] if train_state is not None else [])
    manifest = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
                "head": model.head_kind, "files": files, "meta": meta}
    if tokenizer is not None:
        manifest["tokenizer"] = {"kind": tokenizer.kind, **tokenizer.specials()}
    try:
        manifest_text = json.dumps(manifest, indent=2)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta is not JSON-serialisable: {e}") from None
    weights = weights_to_save(model)

    with atomic_dir(run_dir, owned=CHECKPOINT_FILES) as tmp:
        save_file(weights, os.path.join(tmp, WEIGHTS))
        if tok_file is not None:
            with open(os.path.join(tmp, tok_file), "wb") as f:
                f.write(tokenizer.to_json().encode("utf-8") if tok_file == HF_TOKENIZER
                        else tokenizer.model_proto())
        if train_state is not None:
            try:
                torch.save(train_state, os.path.join(tmp, TRAIN_STATE))
            except RuntimeError as e:       # how torch's zip writer reports a full or read-only disk
                why = (str(e).splitlines() or [type(e).__name__])[0]
                raise OSError(f"{run_dir}/{TRAIN_STATE}: not written ({why})") from None
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            f.write(manifest_text + "\n")
    return os.path.abspath(os.fspath(run_dir))


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states, in a form train_state.pt holds under weights_only."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (str(np_name), np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the loader ------------------------------------------------------------------------------------

def load_checkpoint(path, head: Optional[str] = None, map_location="cpu",
                    dtype: Optional[torch.dtype] = torch.float32) -> Checkpoint:
    """Reads our checkpoint dir, an HF or Meta Llama dir, or a GGUF file (see the module docstring).

    head: None keeps the checkpoint's head; "lm" or "reward" swaps to it if it differs, and the
    freshly initialised parameter names are returned in `new_params` (and logged).
    dtype: the floating-point weights are cast to it. float32 by default, whatever the file holds:
    rmlab trains fp32 weights and bf16 is autocast over them (model/precision.py), so a bf16 hub
    checkpoint computes what --dtype says. None keeps the file's dtype (GGUF's quantized tensors
    dequantize to float32), e.g. to halve the memory of a bf16 model scored under bf16.
    """
    if head is not None and head not in HEADS:
        raise ValueError(f"head must be None or one of {HEADS}, got {head!r}")
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.basename(path) in (MANIFEST, HF_CONFIG, META_PARAMS):
        path = os.path.dirname(path) or "."
    device = str(torch.device(map_location))
    train_state = None
    if os.path.isfile(path) and path.endswith(".gguf"):
        cfg, ck_head, sd, tok, meta = read_gguf(path, device)
    elif not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found (nor a .gguf file){_aside_hint(path)}")
    elif os.path.isfile(os.path.join(path, MANIFEST)):
        cfg, ck_head, sd, tok, meta, train_state = _read_ours(path, device)
    elif os.path.isfile(os.path.join(path, HF_CONFIG)):
        cfg, ck_head, sd, tok, meta = read_hf(path, device)
    elif os.path.isfile(os.path.join(path, META_PARAMS)):
        cfg, ck_head, sd, tok, meta = read_meta(path, device)
    else:
        raise CheckpointError(f"{path}: not a checkpoint directory: no {MANIFEST} (rmlab), {HF_CONFIG} "
                              f"(Hugging Face) or {META_PARAMS} (Meta), and not a .gguf file")
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{tok.model_path}: the tokenizer has {tok.vocab_size} pieces but the "
                              f"model's embedding has {cfg.vocab_size} rows")
    if dtype is not None:
        sd = {n: t.to(dtype) if t.is_floating_point() else t for n, t in sd.items()}
    model = build(cfg, ck_head, sd)
    new_params = model.swap_head(head) if head is not None and head != ck_head else []
    return Checkpoint(model, tok, meta, train_state, new_params)


def load_model(path, head: Optional[str] = None, map_location="cpu",
               dtype: Optional[torch.dtype] = torch.float32) -> Llama:
    return load_checkpoint(path, head=head, map_location=map_location, dtype=dtype).model


def _asides(path: str) -> List[str]:
    """If a save was cut between its two renames, the previous checkpoint sits beside `path`."""
    parent, name = os.path.split(os.path.abspath(path))
    return sorted(glob.glob(os.path.join(parent, f".{glob.escape(name)}.old-*")), key=os.path.getmtime)


def _aside_hint(path: str) -> str:
    aside = _asides(path)
    if not aside:
        return ""
    return f" (an interrupted save left the previous checkpoint at {aside[-1]}; rename it back)"


def has_checkpoint(path: str) -> bool:
    """Whether `path` holds one of our checkpoints, after putting back the previous one if a save
    was cut between its two renames (train.py's --resume then loses that one save, not the stage)."""
    if not os.path.exists(path):
        try:                      # ranks race here: the loser finds the aside gone (renamed: path exists)
            os.rename(_asides(path)[-1], path)
        except (OSError, IndexError):
            pass                  # no aside, or another rank put it back first
    return os.path.isfile(os.path.join(path, MANIFEST))


def pretrained_tokenizer(path: str, tokenizer_path: str = "", max_len: int = 0):
    """(tokenizer, LlamaConfig) of a pretrained checkpoint (train.py --init-from): its own
    tokenizer, or `tokenizer_path` only when it carries none rmlab reads."""
    ck = load_checkpoint(path, head="lm")
    context = ck.model.config.max_seq_len
    if max_len > context:
        raise CheckpointError(f"--max-len {max_len} is beyond {path}'s context of {context} tokens "
                              "(its max_seq_len)")
    if ck.tokenizer is not None and tokenizer_path:
        raise CheckpointError(f"--tokenizer: {path} carries its own tokenizer ({ck.tokenizer.kind}); drop "
                              "--tokenizer, a different one would not match its embedding")
    tok = ck.tokenizer or (read_tokenizer(tokenizer_path) if tokenizer_path else None)
    if tok is None:
        raise CheckpointError(f"--init-from {path}: no tokenizer rmlab can read beside it; pass --tokenizer "
                              "(the model's tokenizer.json or SentencePiece .model)")
    if tok.vocab_size > ck.model.config.vocab_size:
        raise CheckpointError(f"--tokenizer has {tok.vocab_size} pieces but {path}'s embedding has "
                              f"{ck.model.config.vocab_size} rows")
    return tok, ck.model.config
