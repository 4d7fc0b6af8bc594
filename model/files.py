"""The file plumbing every checkpoint format shares: reads that name the file on failure,
tensor checks against a config, and atomic directory writes.

Loading never unpickles code: weights come from safetensors, or torch.load(weights_only=True).
Writes go into a temporary sibling directory, are fsynced, and the directory is renamed into place.
"""
import contextlib
import fnmatch
import json
import os
import shutil
import uuid
import zipfile
from typing import Callable, Dict, List, Optional

import torch
from safetensors.torch import load_file

from .config import LlamaConfig
from .llama import Llama
from .tokenizer import load_tokenizer

class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, corrupt, or not matching its config."""


# ---- reading files: every failure names the file -----------------------------------------------

def need_file(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")


def read_json(path: str) -> dict:
    need_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: "
                              f"{e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


def read_safetensors(path: str, device: str) -> Dict[str, torch.Tensor]:
    need_file(path)
    try:
        return load_file(path, device=device)
    except Exception as e:  # safetensors' Rust errors: truncated, bad header, ...
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})") from None


def read_torch(path: str, device: str, tensors_only: bool = True):
    need_file(path)
    # mmap saves a copy of large weights, but only torch's zip format (torch >= 1.6) can be mapped
    mmap = tensors_only and zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        code = [line for line in lines if "GLOBAL" in line]   # the unpickler met a class or function
        if code:
            raise CheckpointError(f"{path}: holds pickled objects other than tensors and plain containers, "
                                  f"which rmlab never loads ({code[0]})") from None
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True) "
                              f"({lines[0]})") from None
    flat = isinstance(obj, dict) and all(isinstance(t, torch.Tensor) for t in obj.values())
    if tensors_only and not flat:
        raise CheckpointError(f"{path}: expected a flat dict of tensors")
    return obj


def read_tokenizer(path: str):
    """A SentencePiece .model or a tokenizer.json (with the special ids of the files beside it)."""
    try:
        return load_tokenizer(path)
    except ValueError as e:  # not SentencePiece (e.g. Llama 3's tiktoken file); the message names the file
        raise CheckpointError(str(e)) from None
    except FileNotFoundError as e:      # a finished run folder missing its tokenizer, say
        raise CheckpointError(f"{e.filename}: file not found" if e.filename else str(e)) from None
    except (TypeError, AttributeError, KeyError) as e:   # a field of an unexpected type in its JSON files
        raise CheckpointError(f"{path}: unreadable tokenizer files ({type(e).__name__}: {e})") from None


def check_tensors(sd: Dict[str, torch.Tensor], unknown: List[str], cfg: LlamaConfig, head: str,
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
    missing = [file_name(n) for n in expected if n not in sd]
    unexpected = sorted(unknown + [file_name(n) for n in sd if n not in expected])
    parts = [f"{what} {names[:6]}" + (f" and {len(names) - 6} more" if len(names) > 6 else "")
             for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
    if parts:
        raise CheckpointError(f"{where}: tensors do not match the config ({head} head): " + "; ".join(parts))
    for n, shape in expected.items():
        t, name = sd[n], file_name(n)
        tensor = f"{(located or {}).get(name, where)}: tensor '{name}'"
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{tensor} has shape {tuple(t.shape)}, but the config implies {shape}")
        if not t.is_floating_point():
            raise CheckpointError(f"{tensor} has dtype {t.dtype}")
        # A NaN weight would score every response NaN. A sum is NaN or inf iff an element is (or
        # the sum overflows, which needs weights near 1e31): 16x faster than isfinite().all().
        if not bool(torch.isfinite(t.sum(dtype=torch.float32))):
            raise CheckpointError(f"{tensor} holds NaN or inf values")


def build(cfg: LlamaConfig, head: str, sd: Dict[str, torch.Tensor]) -> Llama:
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
        raise RuntimeError(f"files.build left tensors uninitialised: {left}")
    return model


def weights_to_save(model: Llama) -> Dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.head_kind == "lm" and model.config.tie_embeddings:
        sd.pop("head.weight")  # the same tensor as tok_embeddings.weight
    return {n: t.detach().cpu().contiguous() for n, t in sd.items()}


def fsync_tree(root: str):
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(dirpath)


def fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(src: str, dst: str):
    """A hard link where it can (a sibling dir): instant, and a log still being appended stays live."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def atomic_dir(final: str, owned):
    """Yields a temporary sibling directory to write into; on success it replaces `final` whole.

    Entries of an existing `final` whose names match none of `owned` (names or fnmatch patterns)
    are carried over (hard links). On any failure the temporary directory is removed and
    `final` is as it was.
    """
    final = os.path.realpath(os.fspath(final))      # a symlink stays; its target is replaced
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
                if os.path.lexists(dst) or any(fnmatch.fnmatchcase(entry, pattern) for pattern in owned):
                    continue
                if os.path.islink(src):
                    os.symlink(os.readlink(src), dst)
                elif os.path.isdir(src):
                    shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
                else:
                    link_or_copy(src, dst)
        fsync_tree(tmp)
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
            doomed = os.path.join(parent, f".{name}.del-{uuid.uuid4().hex[:8]}")
            os.rename(aside, doomed)          # first: a kill mid-delete leaves no half checkpoint named .old-
            shutil.rmtree(doomed, ignore_errors=True)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str, d: dict):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2)
        f.write("\n")
