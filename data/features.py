"""Frozen lower blocks, computed once per example and cached on disk (train.py --train-layers k).

With the embedding and blocks 0..f-1 frozen (f = n − k), the input of block f — the "features"
here — is a function of the tokens each position sees, and the shared-prefix packed layout fixes
those: a prompt token sees its prompt, a response token its prompt and itself (data/batch.py).
So the features of every training example are computed once, and an epoch runs only blocks
f..n-1, the final norm and the head: about k/n of a full forward, and no backward below f.

Slots. The cache is one (S, D) array; each row ("slot") holds one token's features. An example's
slots follow its packed layout: segment after segment (data.batch.prompt_segments: a copy of the
prompt and the responses that fit with it in max_len), the prompt's tokens, then each response's.
A prompt split into several segments has one copy per segment, as the batch has.
To lay a batch out from the cache, its examples are laid out twice by make_batch: once with
their token ids, which gives the positions and the block mask, and once as "slot examples",
one per segment, whose ids are the slot numbers of their tokens. The lengths are the same, so
make_batch puts every slot exactly where it puts the token, and `hidden = states[slots]` is the
batch's input of block f, with positions and masks unchanged.

Exactness. With fp32 storage, blocks f..n-1 on the gathered features are bit for bit the full
model's trunk (Llama.trunk) on a batch laid out as the cache was filled: the same examples in
the same rows at the same offsets, rows of the same length (the caching batches, `cache_batches`).
Any other grouping of the same examples, such as every training micro-batch, differs from the
full model's forward of that grouping by fp32 reassociation only: PyTorch's CPU attention rounds
differently with the row length and with a token's offset in its row (not with the number of
rows), so the full model differs as much between two groupings of itself (≤ 5e-8 relative at
block 29 of SmolLM2, measured). bf16 storage rounds every feature to bf16 (relative error
≤ 2^-9 ≈ 0.2%), which the top blocks carry on: SmolLM2's rewards with k = 1 move by about 1e-2
(tests/test_features.py states the bound it checks).

Key. sha256 of: this format's version, the model config, the bytes of the frozen weights (the
embedding and blocks below f, as loaded: the checkpoint's content whatever its file format), f,
the storage dtype, max_len and every example's token ids. The ids carry the data files, the
split, the tokenizer, its chat template and the length policy; max_len also fixes the segments.
A second run with the same key reads the cache and starts at once; any other key fills a new one.

Files, FOLDER/<first 16 hex of the key>/:
    states.npy   (S, D) float32, or bf16 bits stored as int16 (NumPy has no bf16); no pickles
    offsets.npy  (E + 1,) int64: example e's slots are offsets[e] .. offsets[e+1] - 1
    key.json     everything that was hashed, readable, and the shapes
They are written into FOLDER/<key>.partial and renamed once whole: a folder with the key's
name is complete. Under torchrun every rank fills its share of the caching batches into the
one file (rank 0 creates it; the rows are disjoint), and rank 0 renames it.
"""
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

try:
    from tqdm import tqdm
except ImportError:          # bench/gpu_check.py's GPU machine cannot install it: no progress bar there
    class tqdm(contextlib.nullcontext):
        def __init__(self, **_):
            super().__init__(self)

        def update(self, n):
            pass

from model.files import CheckpointError
from model.parallel import barrier

from .batch import make_batch, plan_batches, prompt_segments
from .encode import EncodedPrompt

FORMAT = 1
# storage dtype: (torch dtype of the values, torch dtype of their bits as NumPy holds them, NumPy dtype)
STORAGE = {"fp32": (torch.float32, torch.float32, np.float32),
           "bf16": (torch.bfloat16, torch.int16, np.int16)}


def check_train_layers(train_layers: int, n: int) -> int:
    """n, when --train-layers fits a model of n blocks (train.py checks it as soon as the model is
    known, before π₀ trains); else one line."""
    if not 0 <= train_layers < n:
        raise CheckpointError(f"--train-layers {train_layers}: the model has {n} blocks (0 trains all; "
                              f"1..{n - 1} the top ones)")
    return n


def freeze_lower(model, train_layers: int) -> int:
    """Freezes the embedding and every block but the top `train_layers`; returns f, the first
    trained block. The final norm and the head stay trainable. 0 = train everything (f = 0); all n
    blocks with a frozen embedding is not offered (nothing would be worth caching)."""
    n = check_train_layers(train_layers, model.config.n_layers)
    first = n - train_layers if train_layers else 0
    for module in [model.tok_embeddings, *model.layers[:first]] if first else []:
        module.requires_grad_(False)
    return first


# ---- slots -----------------------------------------------------------------------------------

def n_slots(e: EncodedPrompt, max_len: int) -> int:
    """Slots of one example: each segment's copy of the prompt and its responses."""
    return sum(len(e.prompt_ids) + sum(len(e.response_ids[j]) for j in group)
               for group in prompt_segments(e, max_len))


def slot_examples(examples: Sequence[EncodedPrompt], start: Dict[int, int],
                  max_len: int) -> List[EncodedPrompt]:
    """One example per segment, whose ids are slot numbers (start[e.index] is e's first slot).

    make_batch lays out a list of these exactly as it lays out `examples`: it forms the same
    segments in the same order (each slot example is one segment already, so first-fit leaves
    it whole) and places segments into rows by their lengths only.
    """
    out = []
    for e in examples:
        slots = itertools.count(start[e.index])           # e's slots, taken in layout order
        for group in prompt_segments(e, max_len):
            prompt = list(itertools.islice(slots, len(e.prompt_ids)))
            responses = [list(itertools.islice(slots, len(e.response_ids[j]))) for j in group]
            out.append(EncodedPrompt(prompt, responses, [], [], [], [], index=e.index))
    return out


def layout_slots(examples: Sequence[EncodedPrompt], start: Dict[int, int], max_len: int) -> torch.Tensor:
    """(N, T) int64: the slot of each position of make_batch(examples, "packed"), -1 on padding."""
    return make_batch(slot_examples(examples, start, max_len), layout="packed", max_len=max_len,
                      pad_id=-1).input_ids


def cache_batches(encoded: Sequence[EncodedPrompt], max_len: int, batch_tokens: int) -> List[List[int]]:
    """The caching pass's batches: consecutive examples, about batch_tokens slots each. More
    examples per batch fill the packed rows better (HH in SmolLM2's chat format, max_len 1024:
    88% of the computed tokens are real at 4,096 slots a batch, 95% at 16,384)."""
    return plan_batches([n_slots(e, max_len) for e in encoded], batch_tokens, shuffle=False)


# ---- the key ---------------------------------------------------------------------------------

def _sha256_tensors(tensors) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().data)        # raw bytes, whatever the dtype
    return h.hexdigest()


def _sha256_examples(encoded: Sequence[EncodedPrompt]) -> str:
    h = hashlib.sha256()
    for e in encoded:       # the counts and lengths first, so that two examples can never hash as one
        h.update(np.array([len(e.prompt_ids), len(e.response_ids), *map(len, e.response_ids)],
                          dtype=np.int64).data)
        h.update(np.array(e.prompt_ids + [t for r in e.response_ids for t in r], dtype=np.int64).data)
    return h.hexdigest()


def cache_key(model, encoded: Sequence[EncodedPrompt], first: int, max_len: int,
              dtype: str) -> Tuple[str, dict]:
    """(sha256 hex, the inputs it hashes) of the features of blocks below `first` (module docstring)."""
    frozen = [(n, p) for n, p in model.named_parameters()
              if n.startswith("tok_embeddings.")
              or (n.startswith("layers.") and int(n.split(".")[1]) < first)]
    inputs = {"format": FORMAT, "config": model.config.to_dict(),
              "frozen_weights_sha256": _sha256_tensors(frozen),
              "first_layer": first, "dtype": dtype, "max_len": max_len, "n_examples": len(encoded),
              "examples_sha256": _sha256_examples(encoded)}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest(), inputs


# ---- the cache -------------------------------------------------------------------------------

class FeatureCache:
    """The features of a list of encoded examples, read from disk (memory-mapped)."""

    def __init__(self, path: str, encoded: Sequence[EncodedPrompt], max_len: int):
        with open(os.path.join(path, "key.json")) as f:
            self.info = json.load(f)
        self.path, self.max_len, self.first_layer = path, max_len, self.info["first_layer"]
        self.states = np.load(os.path.join(path, "states.npy"), mmap_mode="r", allow_pickle=False)   # (S, D)
        offsets = np.load(os.path.join(path, "offsets.npy"), allow_pickle=False)
        if len(offsets) != len(encoded) + 1 or offsets[-1] != len(self.states):
            raise ValueError(f"offsets.npy holds {len(offsets)} offsets up to {offsets[-1]}, for "
                             f"{len(encoded)} examples and {len(self.states)} states")
        self.start = {e.index: int(o) for e, o in zip(encoded, offsets[:-1])}
        self.values = STORAGE[self.info["dtype"]][0]

    def hidden(self, examples: Sequence[EncodedPrompt]) -> torch.Tensor:
        """(N, T, D) fp32: the input of block f for make_batch(examples, "packed", max_len),
        zeros on padding (a padding position sees only itself, and nothing reads it)."""
        slots = layout_slots(examples, self.start, self.max_len)                  # (N, T)
        rows = self.states[slots.clamp(min=0).numpy()]                           # (N, T, D), read from disk
        h = torch.from_numpy(rows).view(self.values).float()
        return h.masked_fill_((slots < 0)[..., None], 0.0)


@torch.no_grad()
def cache_features(model, encoded: Sequence[EncodedPrompt], first: int, max_len: int, folder: str,
                   dtype: str = "fp32", rank: int = 0, world: int = 1, batch_tokens: int = 16384,
                   log=print) -> FeatureCache:
    """The features (input of block `first`) of every example of `encoded`, from
    folder/<key> when it holds them, else computed now and written there (module docstring).
    Runs in the caller's autocast; every rank calls it and gets the same cache."""
    if dtype not in STORAGE:
        raise ValueError(f"dtype must be one of {sorted(STORAGE)}, got {dtype!r}")
    key, inputs = cache_key(model, encoded, first, max_len, dtype)
    path = os.path.join(folder, key[:16])
    if os.path.isdir(path):
        log(f"features of blocks 0..{first - 1}: reusing {path}")
        try:                                # written whole (os.replace below): damaged since, by hand
            return FeatureCache(path, encoded, max_len)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: a damaged feature cache ({e}); delete it to rebuild") from None
    sizes = [n_slots(e, max_len) for e in encoded]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    S, D, device = int(offsets[-1]), model.config.dim, model.tok_embeddings.weight.device
    start = {e.index: int(o) for e, o in zip(encoded, offsets[:-1])}
    partial, (values, bits, np_dtype) = path + ".partial", STORAGE[dtype]
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)        # what a killed run left
        os.makedirs(partial)
        np.lib.format.open_memmap(os.path.join(partial, "states.npy"), mode="w+", dtype=np_dtype,
                                  shape=(S, D)).flush()
    barrier()
    states = np.load(os.path.join(partial, "states.npy"), mmap_mode="r+")
    mine = cache_batches(encoded, max_len, batch_tokens)[rank::world]
    log(f"features of blocks 0..{first - 1} for {len(encoded)} examples ({S} tokens, {dtype}, "
        f"{S * D * np.dtype(np_dtype).itemsize / 2**30:.2f} GiB) into {path}")
    started = time.perf_counter()
    with tqdm(total=sum(sizes[i] for b in mine for i in b), unit="tok", unit_scale=True, disable=rank != 0,
              desc="caching frozen blocks", mininterval=2.0) as bar:
        for b in mine:
            examples = [encoded[i] for i in b]
            # pad_id 0: any id will do, a padding position sees only itself and is not stored
            batch = make_batch(examples, layout="packed", max_len=max_len, pad_id=0).to(device)
            slots = layout_slots(examples, start, max_len)                            # (N, T)
            h = model.blocks(model.tok_embeddings(batch.input_ids), batch.attention_mask, batch.position_ids,
                             last=first)                                              # (N, T, D)
            real = slots >= 0
            states[slots[real].numpy()] = h[real.to(device)].to(values).view(bits).cpu().numpy()   # (real, D)
            bar.update(int(real.sum()))
    states.flush()
    del states
    log(f"computed in {(time.perf_counter() - started) / 60:.1f} min")
    barrier()
    if rank == 0:
        np.save(os.path.join(partial, "offsets.npy"), offsets, allow_pickle=False)
        with open(os.path.join(partial, "key.json"), "w") as f:
            json.dump({**inputs, "key": key, "n_slots": S, "dim": D}, f, indent=1)
        os.replace(partial, path)
    barrier()
    return FeatureCache(path, encoded, max_len)

