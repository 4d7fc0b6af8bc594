"""Batches in two layouts that give the same rewards, and the plan that groups prompts into them.

Both layouts order the R responses the same way (prompt by prompt, responses in order), so
`rewards[pairs[:, 0]] - rewards[pairs[:, 1]]` means the same thing in either.

Padded: one row per response, BOS + prompt + response + EOS, right- or left-padded to the
longest row of the batch. attention_mask (N, T) 0/1 (the model adds causality), position
ids 0..L-1 on the real tokens (0 on padding), end_idx = flat index of each row's EOS.

Shared-prefix packed: BOS + prompt once, then each of its responses, in the same row:

    row:   [BOS p p p | a a a EOS | b b EOS | BOS q q | c EOS | d d EOS | pad pad]
    pos:    0  1 2 3    4 5 6 7     4 5 6     0  1 2   3 4     3 4 5     0   0

The block mask (N, T, T) (True = query row may attend to key column) is causal within the
prompt; a response sees its prompt and itself (causally) but no other response; nothing
crosses from one prompt to another; a padding token sees only itself, so no softmax row is
empty (NaN). Position ids restart at the prompt's length for each response, so every
response is computed exactly as in its own padded row: same tokens, same positions, same
visible keys. If a prompt and all its responses exceed `max_len`, its responses are split
into several segments, each with its own copy of the prompt (responses into segments, and
segments into rows of `max_len` tokens, both by first-fit decreasing); T is the fullest row.
`pad_side` applies to the padded layout only: packed rows are padded at the end.

n_real_tokens: positions that hold a real token; n_computed_tokens: N * T, what the model runs.
"""
import math
from dataclasses import dataclass, fields, replace
from typing import List, Sequence

import numpy as np
import torch

from .encode import EncodedPrompt

LAYOUTS = ("packed", "padded")
PAD_SIDES = ("right", "left")


@dataclass
class Batch:
    input_ids: torch.Tensor          # (N, T) int64
    attention_mask: torch.Tensor     # (N, T) int64 0/1 (padded) or (N, T, T) bool (packed)
    position_ids: torch.Tensor       # (N, T) int64
    end_idx: torch.Tensor            # (R,) int64 flat index into N*T of each response's EOS
    pairs: torch.Tensor              # (P, 2) int64 (chosen, rejected) into R
    margin: torch.Tensor             # (P,) fp32
    pair_weight: torch.Tensor        # (P,) fp32
    n_real_tokens: int = 0
    n_computed_tokens: int = 0

    @property
    def n_pairs(self) -> int:
        return self.pairs.shape[0]

    def to(self, device) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def make_batch(encoded: Sequence[EncodedPrompt], layout: str = "packed", pad_side: str = "right",
               max_len: int = None, pad_id: int = None) -> Batch:
    """Lays out `encoded` prompts (all their responses and pairs) as one Batch."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if pad_side not in PAD_SIDES:
        raise ValueError(f"pad_side must be one of {PAD_SIDES}, got {pad_side!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 3:
        raise ValueError(f"max_len must be an int >= 3, got {max_len!r}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise ValueError(f"pad_id must be an int, got {pad_id!r}")
    for e in encoded:
        longest = len(e.prompt_ids) + max(len(r) for r in e.response_ids)
        if longest > max_len:
            raise ValueError(f"max_len={max_len} is shorter than record {e.index} ({longest} tokens); "
                             "encode with the same max_len")
    build = _packed if layout == "packed" else _padded
    ids, mask, pos, end_idx, n_real = build(encoded, max_len, pad_id, pad_side)
    return Batch(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 position_ids=torch.from_numpy(pos), end_idx=torch.from_numpy(end_idx),
                 n_real_tokens=int(n_real), n_computed_tokens=int(ids.size),
                 **_pair_tensors(encoded))


def _pair_tensors(encoded: Sequence[EncodedPrompt]) -> dict:
    """Everything about pairs, which does not depend on the layout."""
    pairs, base = [], 0
    for e in encoded:
        pairs += [(base + c, base + r) for c, r in e.pairs]
        base += len(e.response_ids)
    return dict(pairs=torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
                margin=torch.tensor([m for e in encoded for m in e.margin], dtype=torch.float32),
                pair_weight=torch.tensor([w for e in encoded for w in e.pair_weight], dtype=torch.float32))


def _padded(encoded, max_len, pad_id, pad_side):
    rows = [e.prompt_ids + r for e in encoded for r in e.response_ids]
    N, T = len(rows), max((len(r) for r in rows), default=1)
    ids = np.full((N, T), pad_id, dtype=np.int64)
    mask = np.zeros((N, T), dtype=np.int64)
    pos = np.zeros((N, T), dtype=np.int64)
    end_idx = np.zeros(N, dtype=np.int64)
    for i, row in enumerate(rows):
        L = len(row)
        start = 0 if pad_side == "right" else T - L
        ids[i, start:start + L] = row
        mask[i, start:start + L] = 1
        pos[i, start:start + L] = np.arange(L)
        end_idx[i] = i * T + start + L - 1
    return ids, mask, pos, end_idx, mask.sum()


def _first_fit_decreasing(sizes: List[int], capacity: int) -> List[List[int]]:
    """Bins (lists of item indices) of total size <= capacity: largest item first, first bin it fits."""
    bins, room = [], []
    for item in sorted(range(len(sizes)), key=lambda i: -sizes[i]):   # stable among equal sizes
        b = next((b for b in range(len(bins)) if room[b] >= sizes[item]), len(bins))
        if b == len(bins):
            bins.append([])
            room.append(capacity)
        bins[b].append(item)
        room[b] -= sizes[item]
    return bins


def prompt_segments(e: EncodedPrompt, max_len: int) -> List[List[int]]:
    """The packed layout's segments of one prompt, in the order they are laid out: groups of its
    response indices (each sorted) that fit with one copy of the prompt in max_len. A function
    of the prompt alone, whatever else is in the batch (data/features.py relies on it)."""
    return [sorted(group) for group in _first_fit_decreasing([len(r) for r in e.response_ids],
                                                             max_len - len(e.prompt_ids))]


def _packed(encoded, max_len, pad_id, pad_side):
    # 1. Segments: one copy of a prompt and the responses that fit with it in max_len.
    segments = [(p, group) for p, e in enumerate(encoded) for group in prompt_segments(e, max_len)]
    seg_len = [len(encoded[p].prompt_ids) + sum(len(encoded[p].response_ids[j]) for j in group)
               for p, group in segments]
    # 2. Segments into rows of max_len tokens; T is the fullest row.
    rows = _first_fit_decreasing(seg_len, max_len)
    N, T = len(rows), max((sum(seg_len[s] for s in row) for row in rows), default=1)
    # 3. Tokens, positions, and per-token (segment id, part) labels for the mask:
    #    segment -1 = padding; part 0 = prompt, part k = the k-th response of the segment.
    ids = np.full((N, T), pad_id, dtype=np.int64)
    pos = np.zeros((N, T), dtype=np.int64)
    seg = np.full((N, T), -1, dtype=np.int64)
    part = np.zeros((N, T), dtype=np.int64)
    first_response = np.cumsum([0] + [len(e.response_ids) for e in encoded])
    end_idx = np.zeros(first_response[-1], dtype=np.int64)
    for i, row in enumerate(rows):
        t = 0
        for s in row:
            p, group = segments[s]
            e = encoded[p]
            P = len(e.prompt_ids)
            ids[i, t:t + P], pos[i, t:t + P], seg[i, t:t + P] = e.prompt_ids, np.arange(P), s
            t += P
            for k, j in enumerate(group, 1):
                r = e.response_ids[j]
                L = len(r)
                ids[i, t:t + L], pos[i, t:t + L] = r, np.arange(P, P + L)
                seg[i, t:t + L], part[i, t:t + L] = s, k
                end_idx[first_response[p] + j] = i * T + t + L - 1
                t += L
    # 4. The block mask: same segment, causal, and the key is prompt or the query's own response.
    causal = np.tril(np.ones((T, T), dtype=bool))
    same_segment = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    visible_part = (part[:, None, :] == 0) | (part[:, :, None] == part[:, None, :])
    mask = same_segment & visible_part & causal
    mask |= np.eye(T, dtype=bool)[None]  # padding sees itself; real tokens already do
    return ids, mask, pos, end_idx, (seg >= 0).sum()


# ---- sampled responses: one row per prompt + response -----------------------------------------

class Rollouts:
    """Prompt + response token rows, right-padded, and where each response token is predicted.

    ids, mask (B, T); targets, resp_mask (B, L) for the L = longest response; pred_pos (B, L)
    is the flat index into (B·T) of the hidden state that predicts response token t, i.e. the
    position just before it. Log-probs, values and the KL all read these same positions.
    """

    def __init__(self, prompt_ids: List[List[int]], responses: List[List[int]], pad_id: int, device="cpu"):
        B = len(prompt_ids)
        T = max(len(p) + len(r) for p, r in zip(prompt_ids, responses))
        L = max(1, max(len(r) for r in responses))
        self.ids = torch.full((B, T), pad_id, dtype=torch.long)
        self.mask = torch.zeros(B, T, dtype=torch.long)
        self.targets = torch.zeros(B, L, dtype=torch.long)
        self.resp_mask = torch.zeros(B, L, dtype=torch.bool)
        self.pred_pos = torch.zeros(B, L, dtype=torch.long)
        for i, (p, r) in enumerate(zip(prompt_ids, responses)):
            self.ids[i, :len(p) + len(r)], self.mask[i, :len(p) + len(r)] = torch.tensor(p + r), 1
            self.targets[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            self.resp_mask[i, :len(r)] = True
            self.pred_pos[i] = i * T + len(p) - 1 + torch.arange(L).clamp(max=max(len(r) - 1, 0))
        for name in ("ids", "mask", "targets", "resp_mask", "pred_pos"):
            setattr(self, name, getattr(self, name).to(device))
        self.prompts, self.responses, self.pad_id = prompt_ids, responses, pad_id

    def subset(self, index) -> "Rollouts":
        """The rows `index` (a list or tensor of ints), laid out again for their own longest one."""
        index = [int(i) for i in index]
        return Rollouts([self.prompts[i] for i in index], [self.responses[i] for i in index], self.pad_id,
                        self.ids.device)


# ---- the plan: batches, shards, micro-batches --------------------------------------------

def plan_batches(sizes: Sequence[int], per_batch: int, epochs: float = 1.0, seed: int = 0,
                 shuffle: bool = True) -> List[List[int]]:
    """The one batch planner: global batches as lists of item indices, about `per_batch` units each.

    sizes[i] is item i's weight in units: its pairs for a reward model (whole prompts stay
    together), 1 for a language-model sequence. An item joins the current batch while the
    batch stays within `per_batch`; an item larger than that is a batch of its own.
    `epochs` may be fractional: ceil(epochs) passes, shuffled by one generator seeded with `seed`, cut after
    round(epochs * n) items. The plan is a function of its arguments only, so every rank and
    a resumed run agree on it.
    """
    if isinstance(per_batch, bool) or not isinstance(per_batch, int) or per_batch < 1:
        raise ValueError(f"per_batch must be a positive int, got {per_batch!r}")
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs!r}")
    n, generator = len(sizes), torch.Generator().manual_seed(seed)     # torch's CPU generator: stable
    order = []
    for _ in range(math.ceil(epochs)):
        order += torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    order = order[:max(1, round(epochs * n))] if n else []
    plan, current, units = [], [], 0
    for i in order:
        if current and units + sizes[i] > per_batch:
            plan.append(current)
            current, units = [], 0
        current.append(i)
        units += sizes[i]
    if current:
        plan.append(current)
    return plan


def shard(batch: Sequence[int], sizes: Sequence[int], rank: int, world_size: int) -> List[int]:
    """This rank's contiguous slice of a global batch, balanced by size.

    Item i goes to rank floor(W * (units before i + half of its own) / total units), so the
    slices are disjoint, cover the batch, and do not depend on anything but the batch. A rank
    may get nothing: when the batch has fewer items than ranks, or when one item outweighs the
    rest (sizes [20, 1, 1] over 3 ranks give [], [0], [1, 2]); train.py runs such a rank at weight 0.
    """
    if not (isinstance(world_size, int) and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    counts = [sizes[i] for i in batch]
    total, before, mine = max(1, sum(counts)), 0, []
    for i, k in zip(batch, counts):
        if min(world_size - 1, (2 * before + k) * world_size // (2 * total)) == rank:
            mine.append(i)
        before += k
    return mine


def micro_batches(batch: Sequence[int], sizes: Sequence[int], per_micro: int, rank: int,
                  world_size: int) -> List[List[int]]:
    """This rank's shard of a global batch in micro-batches of about `per_micro` units, padded
    with empty ones to the most any rank has: FSDP gathers weights in every forward, so every
    rank must run as many."""
    micro = [[[mine[j] for j in b] for b in plan_batches([sizes[i] for i in mine], per_micro, shuffle=False)]
             for mine in (shard(batch, sizes, r, world_size) for r in range(world_size))]
    return micro[rank] + [[]] * (max(map(len, micro)) - len(micro[rank]))
