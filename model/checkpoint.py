"""Checkpoints: our run directories, Hugging Face and Meta Llama checkpoints, and export to HF.

Our checkpoint directory, recognised by its manifest (so it is never taken for an HF dir):

    rmlab.json          {"format": "rmlab-checkpoint", "version": 1, "config": LlamaConfig dict,
                         "head": "lm" | "reward", "files": [...], "meta": {...}}
                        `meta` is the caller's: saved statistics (validation reward mean/std,
                        bias shift), the train config, anything JSON can hold.
    model.safetensors   our parameter names; a tied LM head is stored once, as tok_embeddings.
    tokenizer.model     the SentencePiece model's bytes (when a tokenizer is given).
    train_state.pt      optional resumable state (optimizer, step, RNG, data position): plain
                        dicts, lists, tuples, numbers, strings and tensors only, because it is
                        read back with torch.load(weights_only=True). rng_state() gives the RNGs
                        in that form.

Writes are atomic: everything goes into a temporary sibling directory, is fsynced, and the
directory is renamed into place (an existing one is renamed aside first and deleted after).
An interrupted save leaves the previous checkpoint whole. Files in an existing directory that
the save does not write (a log, a report) are hard-linked into the new one, not lost.

Loading never unpickles code: weights come from safetensors, or torch.load(weights_only=True).

load_checkpoint(path) recognises
    ours  rmlab.json
    HF    config.json + model.safetensors | model.safetensors.index.json + shards
          | pytorch_model.bin (or its index + shards); LlamaForCausalLM or
          LlamaForSequenceClassification (num_labels=1: its score.weight is our reward head);
          tokenizer.model beside it if present
    Meta  params.json + consolidated.NN.pth (model-parallel shards are merged);
          tokenizer.model beside it or one directory up (where Meta's download puts it)
Every unreadable input raises CheckpointError (a ValueError) whose message names the file.

Export to HF and the reward bias. HF's LlamaForSequenceClassification has `score` without a
bias; ours has one. export_hf writes the weight as `score.weight` and, when the bias is not
zero, its value to `rmlab_reward_bias.json` (and logs a warning). HF tools then return our
reward minus that constant: rankings, pairwise differences and Bradley-Terry probabilities
are unchanged, absolute values are off by the bias. load_checkpoint reads the file back, so
export followed by import is exact.
"""
import contextlib
import glob
import json
import logging
import os
import random
import shutil
import uuid
from collections import OrderedDict
from typing import Callable, Dict, List, NamedTuple, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import interop
from .config import LlamaConfig
from .llama import HEADS, Llama
from .tokenizer import Tokenizer

log = logging.getLogger("rmlab.checkpoint")

FORMAT, VERSION = "rmlab-checkpoint", 1
MANIFEST = "rmlab.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.model"
TRAIN_STATE = "train_state.pt"
REWARD_BIAS = "rmlab_reward_bias.json"
HF_CONFIG, META_PARAMS = "config.json", "params.json"
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                   "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, corrupt, or not matching its config."""


class Checkpoint(NamedTuple):
    model: Llama
    tokenizer: Optional[Tokenizer]
    meta: dict                      # ours: the saved `meta`; HF/Meta: where it came from
    train_state: Optional[dict]
    new_params: List[str]           # parameters initialised fresh because `head` was swapped


# ---- reading files: every failure names the file -----------------------------------------------

def _need_file(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")


def _read_json(path: str) -> dict:
    _need_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


def _read_safetensors(path: str, device: str) -> Dict[str, torch.Tensor]:
    _need_file(path)
    try:
        return load_file(path, device=device)
    except Exception as e:  # safetensors' Rust errors: truncated, bad header, ...
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})") from None


def _read_torch(path: str, device: str, tensors_only: bool = True):
    """torch.load with weights_only=True: tensors and plain containers, never code."""
    _need_file(path)
    try:
        obj = torch.load(path, map_location=device, weights_only=True, mmap=tensors_only)
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        code = [line for line in lines if "GLOBAL" in line]   # the unpickler met a class or function
        if code:
            raise CheckpointError(f"{path}: holds pickled objects other than tensors and plain containers, "
                                  f"which rmlab never loads ({code[0]})") from None
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True) ({lines[0]})") from None
    if tensors_only and not (isinstance(obj, dict) and all(isinstance(t, torch.Tensor) for t in obj.values())):
        raise CheckpointError(f"{path}: expected a flat dict of tensors")
    return obj


def _read_tokenizer(path: str) -> Tokenizer:
    try:
        return Tokenizer(path)
    except ValueError as e:  # not SentencePiece (e.g. Llama 3's tiktoken file); the message names the file
        raise CheckpointError(str(e)) from None


def _check_tensors(sd: Dict[str, torch.Tensor], unknown: List[str], cfg: LlamaConfig, head: str,
                   where: str, file_name: Callable[[str], str] = lambda n: n,
                   located: Optional[Dict[str, str]] = None):
    """Names and shapes of `sd` (our names) against what `cfg` implies; errors use the file's names.

    `unknown`: names in the file with no counterpart in ours. `located`: which file holds a
    tensor (sharded checkpoints), by its name in the file; `where` otherwise.
    """
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in Llama(cfg, head).state_dict().items()}
    if head == "lm" and cfg.tie_embeddings:
        expected.pop("head.weight")  # the tied head is the embedding: never stored twice

    def short(names):
        return f"{names[:6]}" + (f" and {len(names) - 6} more" if len(names) > 6 else "")

    missing = [file_name(n) for n in expected if n not in sd]
    unexpected = sorted(unknown + [file_name(n) for n in sd if n not in expected])
    if missing or unexpected:
        parts = ([f"missing {short(missing)}"] if missing else []) + \
                ([f"unexpected {short(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{where}: tensors do not match the config ({head} head): " + "; ".join(parts))
    for n, shape in expected.items():
        name = file_name(n)
        if tuple(sd[n].shape) != shape:
            raise CheckpointError(f"{(located or {}).get(name, where)}: tensor '{name}' has shape "
                                  f"{tuple(sd[n].shape)}, but the config implies {shape}")
        if not sd[n].is_floating_point():
            raise CheckpointError(f"{(located or {}).get(name, where)}: tensor '{name}' has dtype {sd[n].dtype}")


def _build(cfg: LlamaConfig, head: str, sd: Dict[str, torch.Tensor]) -> Llama:
    """A Llama whose parameters *are* the checked tensors of `sd` (no random init, no copy)."""
    with torch.device("meta"):
        model = Llama(cfg, head)
    tied = head == "lm" and cfg.tie_embeddings
    if tied:
        sd = {**sd, "head.weight": sd["tok_embeddings.weight"]}
    model.load_state_dict(sd, strict=True, assign=True)
    if tied:
        model.head.weight = model.tok_embeddings.weight  # one Parameter, as Llama ties it
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a buffer added to Llama that no checkpoint holds: it must be initialised here
        raise RuntimeError(f"checkpoint._build left tensors uninitialised: {left}")
    return model


# ---- our format ---------------------------------------------------------------------------------

def _read_ours(d: str, device: str):
    manifest_path = os.path.join(d, MANIFEST)
    m = _read_json(manifest_path)
    if m.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: field 'format' is {m.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(m.get("version"), int) or m["version"] > VERSION:
        raise CheckpointError(f"{manifest_path}: field 'version' is {m.get('version')!r}; this code reads <= {VERSION}")
    try:
        cfg = LlamaConfig.from_dict(m["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{manifest_path}: field 'config' is not a LlamaConfig ({e!r})") from None
    head = m.get("head")
    if head not in HEADS:
        raise CheckpointError(f"{manifest_path}: field 'head' is {head!r}, expected one of {HEADS}")
    files = m.get("files", [WEIGHTS])
    if not (isinstance(files, list) and WEIGHTS in files and set(files) <= {WEIGHTS, TOKENIZER, TRAIN_STATE}):
        raise CheckpointError(f"{manifest_path}: field 'files' is {files!r}")
    for name in files:  # a file the manifest lists but the directory lacks is an error, not a None
        _need_file(os.path.join(d, name))
    weights_path = os.path.join(d, WEIGHTS)
    sd = _read_safetensors(weights_path, device)
    _check_tensors(sd, [], cfg, head, weights_path)
    tok = _read_tokenizer(os.path.join(d, TOKENIZER)) if TOKENIZER in files else None
    # The train state stays on the CPU: RNG states must, and optimizer.load_state_dict moves the rest.
    state = _read_torch(os.path.join(d, TRAIN_STATE), "cpu", tensors_only=False) if TRAIN_STATE in files else None
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


def _weights_to_save(model: Llama) -> Dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.head_kind == "lm" and model.config.tie_embeddings:
        sd.pop("head.weight")  # the same tensor as tok_embeddings.weight
    return {n: t.detach().cpu().contiguous() for n, t in sd.items()}


def _fsync_tree(root: str):
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(dirpath)


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(src: str, dst: str):
    try:
        os.link(src, dst)       # same filesystem (a sibling dir): instant, and a log still being appended stays live
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def _atomic_dir(final: str, owned):
    """Yields a temporary sibling directory to write into; on success it replaces `final` whole.

    Entries of an existing `final` whose names are not in `owned` are carried over (hard links).
    On any failure the temporary directory is removed and `final` is as it was.
    """
    final = os.path.abspath(os.fspath(final))
    parent, name = os.path.split(final)
    if os.path.exists(final) and not os.path.isdir(final):
        raise ValueError(f"{final}: exists and is not a directory")
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)  # not tempfile.mkdtemp: its 0700 mode would become the checkpoint's
    try:
        yield tmp
        if os.path.isdir(final):
            for entry in os.listdir(final):
                src, dst = os.path.join(final, entry), os.path.join(tmp, entry)
                if entry in owned or os.path.lexists(dst):
                    continue
                if os.path.islink(src):
                    os.symlink(os.readlink(src), dst)
                elif os.path.isdir(src):
                    shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(src, dst)
        _fsync_tree(tmp)
        if not os.path.exists(final):
            os.rename(tmp, final)
        else:
            # Two renames: POSIX cannot swap two directories atomically. Between them the old
            # checkpoint sits whole at `aside`, and load_checkpoint points there if `final` is missing.
            aside = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(final, aside)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(aside, final)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(run_dir, model: Llama, tokenizer: Optional[Tokenizer] = None,
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
    files = [WEIGHTS] + ([TOKENIZER] if tokenizer is not None else []) + \
            ([TRAIN_STATE] if train_state is not None else [])
    manifest = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
                "head": model.head_kind, "files": files, "meta": meta}
    try:
        manifest_text = json.dumps(manifest, indent=2)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta is not JSON-serialisable: {e}") from None
    weights = _weights_to_save(model)

    with _atomic_dir(run_dir, owned={MANIFEST, WEIGHTS, TOKENIZER, TRAIN_STATE}) as tmp:
        save_file(weights, os.path.join(tmp, WEIGHTS))
        if tokenizer is not None:
            with open(os.path.join(tmp, TOKENIZER), "wb") as f:
                f.write(tokenizer.model_proto())
        if train_state is not None:
            torch.save(train_state, os.path.join(tmp, TRAIN_STATE))
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
    """Restores what rng_state() returned."""
    random.setstate(state["python"])
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- Hugging Face ----------------------------------------------------------------------------------

def _read_hf_weights(d: str, device: str):
    """All tensors of an HF dir (HF names), the file that stands for them, and which shard holds each."""
    present = [f for f in HF_WEIGHT_FILES if os.path.isfile(os.path.join(d, f))]
    if not present:
        raise CheckpointError(f"{os.path.join(d, HF_CONFIG)}: found, but no weights beside it "
                              f"(looked for {', '.join(HF_WEIGHT_FILES)})")
    path = os.path.join(d, present[0])  # HF's own preference order
    if not path.endswith(".index.json"):
        read = _read_safetensors if path.endswith(".safetensors") else _read_torch
        return read(path, device), path, {}
    weight_map = _read_json(path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: field 'weight_map' is missing or not an object")
    tensors, located = {}, {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{path}: shard name {shard!r} is not a file name in this directory")
        shard_path = os.path.join(d, shard)
        read = _read_safetensors if shard.endswith(".safetensors") else _read_torch
        part = read(shard_path, device)
        for name in [n for n, s in weight_map.items() if s == shard]:
            if name not in part:
                raise CheckpointError(f"{shard_path}: tensor '{name}' listed in {path} is not in the file")
        for name, t in part.items():
            if name in tensors:
                raise CheckpointError(f"{shard_path}: tensor '{name}' is also in {located[name]}")
            tensors[name], located[name] = t, shard_path
    return tensors, path, located


def _read_hf(d: str, device: str):
    config_path = os.path.join(d, HF_CONFIG)
    hf_config = _read_json(config_path)
    try:
        cfg, head = interop.config_from_hf(hf_config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    tensors, where, located = _read_hf_weights(d, device)
    if head is None:  # no `architectures` field: the tensors say which head
        head = "reward" if "score.weight" in tensors else "lm"
    # Tensors HF's own loader ignores as well: RoPE frequencies (older saves) and a tied head's copy.
    tensors = {n: t for n, t in tensors.items()
               if not n.endswith("rotary_emb.inv_freq") and not (n == "lm_head.weight" and cfg.tie_embeddings)}
    sd, unknown = interop.rename(tensors, lambda n: interop.hf_to_ours_name(n, head))
    if head == "reward":
        sd["head.bias"] = _read_reward_bias(d, sd.get("head.weight"))
    _check_tensors(sd, unknown, cfg, head, where, lambda n: interop.ours_to_hf_name(n, head), located)
    sd = interop.qk_hf_to_meta(sd, cfg)
    tok_path = os.path.join(d, TOKENIZER)
    tok = _read_tokenizer(tok_path) if os.path.isfile(tok_path) else None
    if tok is None:
        log.warning("%s: no tokenizer.model (SentencePiece) beside the weights; loading without a tokenizer", d)
    return cfg, head, sd, tok, {"source_format": "hf", "source_path": d}


def _read_reward_bias(d: str, score_weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Our reward head's bias: 0 (HF's score has none) unless export_hf stored one beside it."""
    dtype = score_weight.dtype if score_weight is not None else torch.float32
    device = score_weight.device if score_weight is not None else "cpu"
    path = os.path.join(d, REWARD_BIAS)
    if not os.path.isfile(path):
        return torch.zeros(1, dtype=dtype, device=device)
    stored = _read_json(path)
    if not isinstance(stored.get("bias"), (int, float)):
        raise CheckpointError(f"{path}: field 'bias' is missing or not a number")
    dtype = getattr(torch, str(stored.get("dtype", "")), dtype)
    return torch.tensor([float(stored["bias"])], dtype=dtype, device=device)


def export_hf(model: Llama, out_dir, tokenizer: Optional[Tokenizer] = None) -> str:
    """Writes an HF LlamaForCausalLM (LM head) or LlamaForSequenceClassification (reward head) dir.

    Files: config.json, model.safetensors (HF names, rotate-half q/k rows), tokenizer.model and
    tokenizer_config.json (with a tokenizer), rmlab_reward_bias.json (a non-zero reward bias,
    see the module docstring). Atomic like save_checkpoint. Returns the directory's path.
    """
    cfg, head = model.config, model.head_kind
    sd = _weights_to_save(model)
    bias = sd.pop("head.bias", None)
    hf_tensors = {interop.ours_to_hf_name(n, head): t for n, t in interop.qk_meta_to_hf(sd, cfg).items()}
    ids = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id) if tokenizer else {}
    hf_config = interop.config_to_hf(cfg, head, model.tok_embeddings.weight.dtype, **ids)
    owned = {HF_CONFIG, *HF_WEIGHT_FILES, TOKENIZER, "tokenizer_config.json", REWARD_BIAS}

    with _atomic_dir(out_dir, owned) as tmp:
        save_file(hf_tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(tmp, HF_CONFIG), hf_config)
        if tokenizer is not None:
            with open(os.path.join(tmp, TOKENIZER), "wb") as f:
                f.write(tokenizer.model_proto())
            piece = tokenizer.sp.id_to_piece
            _write_json(os.path.join(tmp, "tokenizer_config.json"), {
                "tokenizer_class": "LlamaTokenizer", "legacy": True,
                "add_bos_token": True, "add_eos_token": False,   # the reward is read at an EOS the caller appends
                "bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id),
                "unk_token": piece(tokenizer.sp.unk_id()), "pad_token": piece(tokenizer.pad_id),
                "model_max_length": cfg.max_seq_len})
        if bias is not None and float(bias) != 0.0:
            log.warning("HF's score layer has no bias: reward bias %.6g stored in %s; HF tools will "
                        "read rewards lower by that constant (rankings unchanged)", float(bias), REWARD_BIAS)
            _write_json(os.path.join(tmp, REWARD_BIAS), {
                "bias": float(bias), "dtype": str(bias.dtype).removeprefix("torch."),
                "note": "rmlab reward = LlamaForSequenceClassification score + bias"})
    return os.path.abspath(os.fspath(out_dir))


def _write_json(path: str, d: dict):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2)
        f.write("\n")


# ---- Meta ------------------------------------------------------------------------------------------

def _read_meta(d: str, device: str):
    params_path = os.path.join(d, META_PARAMS)
    params = _read_json(params_path)
    shard_paths = sorted(glob.glob(os.path.join(d, "consolidated.*.pth")))
    expected = [os.path.join(d, f"consolidated.{i:02d}.pth") for i in range(len(shard_paths))]
    if not shard_paths:
        raise CheckpointError(f"{params_path}: found, but no consolidated.*.pth beside it")
    if shard_paths != expected:
        raise CheckpointError(f"{d}: model-parallel shards must be consolidated.00.pth .. "
                              f"consolidated.{len(shard_paths) - 1:02d}.pth, found {[os.path.basename(p) for p in shard_paths]}")
    # Meta's download keeps tokenizer.model one level above the model directories.
    tok_paths = [p for p in (os.path.join(d, TOKENIZER), os.path.join(os.path.dirname(os.path.abspath(d)), TOKENIZER))
                 if os.path.isfile(p)]
    tok = _read_tokenizer(tok_paths[0]) if tok_paths else None
    shards = [_read_torch(p, device) for p in shard_paths]
    try:
        merged = interop.merge_meta_shards(shards, [os.path.basename(p) for p in shard_paths])
    except ValueError as e:
        raise CheckpointError(f"{d}: {e}") from None
    merged.pop("rope.freqs", None)  # Meta's precomputed RoPE frequencies; we derive them from rope_theta
    emb = merged.get("tok_embeddings.weight")
    try:
        cfg = interop.config_from_meta(params, tok.vocab_size if tok else None,
                                       emb.shape[0] if emb is not None else -1)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{params_path}: {e}") from None
    sd, unknown = interop.rename(merged, interop.meta_to_ours_name)
    where = shard_paths[0] if len(shard_paths) == 1 else os.path.join(d, "consolidated.*.pth")
    _check_tensors(sd, unknown, cfg, "lm", where, interop.ours_to_meta_name)
    return cfg, "lm", sd, tok, {"source_format": "meta", "source_path": d}


# ---- the loader ------------------------------------------------------------------------------------

def load_checkpoint(path, head: Optional[str] = None, map_location="cpu") -> Checkpoint:
    """Reads our checkpoint dir, an HF Llama dir or a Meta Llama dir (see the module docstring).

    head: None keeps the checkpoint's head; "lm" or "reward" swaps to it if it differs, and the
    freshly initialised parameter names are returned in `new_params` (and logged).
    """
    if head is not None and head not in HEADS:
        raise ValueError(f"head must be None or one of {HEADS}, got {head!r}")
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.basename(path) in (MANIFEST, HF_CONFIG, META_PARAMS):
        path = os.path.dirname(path) or "."
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found{_aside_hint(path)}")
    device = str(torch.device(map_location))
    train_state = None
    if os.path.isfile(os.path.join(path, MANIFEST)):
        cfg, ck_head, sd, tok, meta, train_state = _read_ours(path, device)
    elif os.path.isfile(os.path.join(path, HF_CONFIG)):
        cfg, ck_head, sd, tok, meta = _read_hf(path, device)
    elif os.path.isfile(os.path.join(path, META_PARAMS)):
        cfg, ck_head, sd, tok, meta = _read_meta(path, device)
    else:
        raise CheckpointError(f"{path}: not a checkpoint directory: no {MANIFEST} (rmlab), "
                              f"{HF_CONFIG} (Hugging Face) or {META_PARAMS} (Meta)")
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{tok.model_path}: the tokenizer has {tok.vocab_size} pieces but the "
                              f"model's embedding has {cfg.vocab_size} rows")
    model = _build(cfg, ck_head, sd)
    new_params = model.swap_head(head) if head is not None and head != ck_head else []
    return Checkpoint(model, tok, meta, train_state, new_params)


def load_model(path, head: Optional[str] = None, map_location="cpu") -> Llama:
    """load_checkpoint(...).model"""
    return load_checkpoint(path, head=head, map_location=map_location).model


def _aside_hint(path: str) -> str:
    """If a save was cut between its two renames, the previous checkpoint sits beside `path`."""
    parent, name = os.path.split(os.path.abspath(path))
    aside = sorted(glob.glob(os.path.join(parent, f".{glob.escape(name)}.old-*")))
    return f" (an interrupted save left the previous checkpoint at {aside[-1]}; rename it back)" if aside else ""
