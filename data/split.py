"""Deterministic, prompt-disjoint splits by a stable hash of the prompt text.

Each prompt goes to the split whose interval of [0, 1) holds u = the first 8 bytes of
sha256(prompt text, UTF-8) read as an integer / 2^64. Records with the same prompt always
land together, the assignment never depends on record order, the seed or the machine
(unlike Python's salted `hash()`), and adding records never moves old ones.
"""
import hashlib
from typing import Dict, List, Sequence

import torch

DEFAULT_SPLIT = {"train": 0.90, "val": 0.05, "test": 0.05}


def check_fractions(fractions: Dict[str, float]) -> Dict[str, float]:
    if not isinstance(fractions, dict) or not fractions:
        raise ValueError(f"fractions must be a non-empty dict of split name -> fraction, got {fractions!r}")
    for name, f in fractions.items():
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise ValueError(f"fractions[{name!r}] must be a number in [0, 1], got {f!r}")
    if abs(sum(fractions.values()) - 1.0) > 1e-9:
        raise ValueError(f"fractions must sum to 1, got {sum(fractions.values())} from {fractions}")
    return fractions


def split_of(text: str, fractions: Dict[str, float] = DEFAULT_SPLIT) -> str:
    """The name of the split that prompt `text` belongs to."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    u, edge = int.from_bytes(digest[:8], "big") / 2.0 ** 64, 0.0           # in [0, 1)
    for name, f in fractions.items():
        edge += f
        if u < edge:
            return name
    return name  # u within rounding of 1.0: the last split


def split_records(records: Sequence, fractions: Dict[str, float] = DEFAULT_SPLIT) -> Dict[str, List]:
    """{split name: records (anything with a `.prompt` string) whose prompt hashes into it},
    in input order."""
    check_fractions(fractions)
    out = {name: [] for name in fractions}
    for record in records:
        out[split_of(record.prompt, fractions)].append(record)
    return out


def spread(records: Sequence, n: int) -> List:
    """n records evenly spaced over the list (all of them when n >= len). Files are loaded one
    after another, so the first n held-out records of HH-RLHF would all be harmless-base ones."""
    if n >= len(records):
        return list(records)
    return [records[i * len(records) // n] for i in range(n)]


def rm_mixes(records: Sequence, mode: str, seed: int,
             helpful_safety_share: float = 1.0) -> Dict[str, List[int]]:
    """Llama 2's data mixes, as indices into `records`: {"helpful": ..., "safety": ...}, or
    {"reward": all} for one model (mode "single", or "auto" without both kinds of prompt).

    safety model:      all safety pairs + helpful pairs at 90/10;
    helpfulness model: all helpful pairs + helpful_safety_share × as many safety pairs (capped).
    Counted in pairs, as Llama 2 counts its data: whole prompts are drawn in a seeded order until
    they hold that many pairs (a built-in helpful prompt holds 4, a safety prompt 1).
    """
    safety = [i for i, r in enumerate(records) if r.is_safety]
    helpful = [i for i, r in enumerate(records) if not r.is_safety]
    if mode == "single" or (mode == "auto" and (not safety or not helpful)):
        return {"reward": list(range(len(records)))}
    if not safety or not helpful:
        raise ValueError("rm_mixes: two models need both safety and helpful records "
                         "(tag a file with safety=PATH)")
    generator = torch.Generator().manual_seed(seed)
    n_pairs = lambda pool: sum(len(records[i].pairs) for i in pool)

    def pick(pool, n):           # prompts of `pool`, seeded, until they hold n pairs
        chosen, held = [], 0
        for i in torch.randperm(len(pool), generator=generator).tolist():
            if held >= n:
                break
            chosen.append(pool[i])
            held += len(records[pool[i]].pairs)
        return chosen
    return {"helpful": sorted(helpful + pick(safety, round(helpful_safety_share * n_pairs(helpful)))),
            "safety": sorted(safety + pick(helpful, n_pairs(safety) // 9))}
