"""Scoring encoded records with a reward model, the accuracy tables built from the scores, and
a trained reward model's calibration on validation pairs.

Shared by train.py (validation, test) and score.py (which scores PrefRecords response by
response: score_responses, pair_outcomes). Accuracy counts every comparison once (a K-way
ranking contributes its C(K,2) pairs); a tie (equal rewards) is neither right nor wrong and
is reported on its own, so accuracy + ties + errors = 1.
"""
import math
from collections import defaultdict
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

import torch

from model.rewards import fit_temperature

from .batch import make_batch
from .encode import encode_records


@torch.no_grad()
def score_records(model, encoded: Sequence, pad_id: int, max_len: int, device="cpu",
                  batch_tokens: int = 8192, layout: str = "packed", features=None) -> List[List[float]]:
    """Rewards of every kept response of every encoded prompt, in input order.

    Prompts are sorted by length and batched up to about `batch_tokens` computed tokens, so
    padding goes only to the longest sequence of each batch; the packed layout computes each
    prompt once for all its responses. `features`: a data/features.py FeatureCache of `encoded`
    (train.py --train-layers), so only the blocks above the frozen ones run.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].packed_tokens)
    scores: List[List[float]] = [[] for _ in encoded]
    i = 0
    while i < len(order):
        j, longest, n_rows = i, 0, 0
        while j < len(order):
            e = encoded[order[j]]
            longest = max(longest, e.padded_tokens // max(1, len(e.response_ids)))
            n_rows += len(e.response_ids)
            if j > i and n_rows * longest > batch_tokens:
                break
            j += 1
        chunk = [encoded[k] for k in order[i:j]]
        batch = make_batch(chunk, layout=layout, max_len=max_len, pad_id=pad_id).to(device)
        # the precision is the caller's (train.py and score.py run this under their --dtype)
        if features is None:
            rewards = model(batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, end_idx=batch.end_idx).float().cpu()
        else:   # the cache holds the input of block f for exactly this packed layout
            h = model.blocks(features.hidden(chunk).to(device), batch.attention_mask, batch.position_ids,
                             first=features.first_layer)                                  # (N, T, D)
            rewards = model.score_hidden(h, batch.end_idx).float().cpu()
        per_prompt = rewards.split([len(e.response_ids) for e in chunk])   # make_batch's order: by prompt
        for k, prompt_rewards in zip(order[i:j], per_prompt):
            scores[k] = prompt_rewards.tolist()
        i = j
    model.train(was_training)
    return scores


def self_pairs(records: Sequence) -> List:
    """Copies of PrefRecords with each response in a pair with itself, (j, j), and no other.

    encode_records keeps a response only while it is in some pair; as a self-pair every
    response that fits is kept, whether or not it is in a preference pair, under the same
    keep-the-end policy as training. For scoring, never for a loss.
    """
    return [replace(r, pairs=[(j, j) for j in range(len(r.responses))], pair_weight=[1.0] * len(r.responses),
                    margin=[None] * len(r.responses), rating=[None] * len(r.responses)) for r in records]


def score_responses(model, records: Sequence, tokenizer, max_len: int, device="cpu",
                    batch_tokens: int = 8192, layout: str = "packed", long_responses: str = "drop",
                    chat=None):
    """Every response of every PrefRecord scored on its own, for score.py.

    Returns (scores, EncodeStats, cuts): scores[i][j] is the reward of records[i].responses[j],
    or None for a response longer than max_len by itself (with long_responses="drop"; with
    "keep_end" it is scored on its end). cuts[i][j] counts the tokens its sequence lost from
    the start (prompt first, then the response's own start), None where not scored. The real
    pairs are read from the records afterwards (pair_outcomes). `chat` (a data.chat.ChatFormat)
    encodes them in a checkpoint's chat format, as encode_records does.
    """
    encoded, stats = encode_records(self_pairs(records), tokenizer, max_len, margin_mode="none",
                                    long_responses=long_responses, chat=chat)
    per_prompt = score_records(model, encoded, tokenizer.pad_id, max_len, device, batch_tokens, layout)
    scores: List[List[Optional[float]]] = [[None] * len(r.responses) for r in records]
    cuts: List[List[Optional[int]]] = [[None] * len(r.responses) for r in records]
    for e, s in zip(encoded, per_prompt):
        for j, value, cut in zip(e.response_index, s, e.response_tokens_cut):
            scores[e.index][j], cuts[e.index][j] = value, e.n_prompt_tokens_cut + cut
    return scores, stats, cuts


def pair_outcomes(prompts: Sequence, scores: Sequence[Sequence[Optional[float]]]) -> List[Dict]:
    """One dict per comparison of EncodedPrompts or PrefRecords: correct, tie, gap = r_chosen −
    r_rejected, and its labels. A pair with an unscored response (None: score_responses) is left out;
    a NaN or infinite score is a FloatingPointError (a NaN pair would count as wrong, inf − inf too),
    which train.py stops on with one line."""
    out = []
    for e, s in zip(prompts, scores):
        for p, (c, r) in enumerate(e.pairs):
            if s[c] is not None and s[r] is not None:
                if not math.isfinite(s[c]) or not math.isfinite(s[r]):
                    raise FloatingPointError(f"{getattr(e, 'origin', None) or 'a record'}: a reward is not "
                                             f"finite ({s[c]}, {s[r]}): the model overflowed or is broken")
                gap = s[c] - s[r]
                out.append({"correct": gap > 0, "tie": gap == 0, "gap": gap, "rating": e.rating[p],
                            "category": e.category, "is_safety": bool(e.is_safety)})
    return out


def _acc(rows) -> Dict:
    n = len(rows)
    mean = lambda key: sum(r[key] for r in rows) / n if n else float("nan")
    accuracy = mean("correct")
    return {"n": n, "accuracy": accuracy, "ties": mean("tie"), "mean_gap": mean("gap"),
            "ci95": wilson_interval(accuracy, n)}


def wilson_interval(p: float, n: int, z: float = 1.96) -> List[float]:
    """Wilson's 95% interval of a proportion p over n trials. Unlike p ± z·sqrt(p(1−p)/n) it stays
    inside [0, 1] and is not empty at p = 0 or 1 (10 of 10 right gives [0.72, 1.00])."""
    if not n:
        return [float("nan"), float("nan")]
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, center - half), min(1.0, center + half)]


def accuracy_table(outcomes: List[Dict]) -> Dict:
    """Overall, per rating (Llama 2 Table 8), per category, helpful vs safety."""
    table = _acc(outcomes)
    group_keys = {"per_rating": lambda o: o["rating"], "per_category": lambda o: o["category"],
                  "by_kind": lambda o: "safety" if o["is_safety"] else "helpful"}
    for name, key in group_keys.items():
        groups = defaultdict(list)
        for o in outcomes:
            if key(o) is not None:
                groups[key(o)].append(o)
        table[name] = {k: _acc(v) for k, v in sorted(groups.items())}
    return table


def win_rate_terms(scores: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]]) -> List[float]:
    """Per-prompt win-rates of scores[i] over baseline[i] (the samples of prompt i), ties ½:
    every sample meets every baseline sample of its prompt. Returns [n, Σ rate, Σ rate²],
    which add up over processes; win_rate turns them into the mean and its CI."""
    rates = [sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b) / (len(a) * len(b))
             for a, b in zip(scores, baseline)]
    return [len(rates), sum(rates), sum(r * r for r in rates)]


def win_rate(n: float, total: float, squares: float):
    """(mean win-rate, half-width of its 95% CI): prompts are the independent units."""
    mean = total / n
    var = (squares - n * mean ** 2) / (n - 1) if n > 1 else float("nan")
    return mean, 1.96 * math.sqrt(max(var, 0.0) / n) if n > 1 else float("nan")


MIN_SCALE = 0.05     # the calibration never shrinks a reward model by more than 20x


def calibrate_and_evaluate(model, encoded, pad_id: int, max_len: int, device, features=None) -> Dict:
    """Fixes the offset and scale on validation pairs, then scores the test pairs.

    The pairwise loss never sets the offset (b cancels): the head bias is shifted until the
    validation rewards have mean 0. Then the head is divided by the temperature that makes
    σ(R_c − R_r) calibrated on validation (model/rewards.py says why the 0.15 rule needs it).
    One affine map of the head: rankings and accuracy do not change. encoded: {"val", "test"};
    features: None or their FeatureCaches, {"val", "test"} (score_records).
    """
    features = features or {}
    model.eval()
    val_scores = score_records(model, encoded["val"], pad_id, max_len, device,
                               features=features.get("val"))
    flat = torch.tensor([s for rec in val_scores for s in rec], dtype=torch.float64)
    shift = -float(flat.mean())
    gaps = [o["gap"] for o in pair_outcomes(encoded["val"], val_scores)]
    scale = fit_temperature(gaps, min_scale=MIN_SCALE)
    with torch.no_grad():
        model.head.bias += shift
        model.head.weight *= scale
        model.head.bias *= scale
    flat = (flat + shift) * scale
    val_scores = [[(x + shift) * scale for x in r] for r in val_scores]
    val = accuracy_table(pair_outcomes(encoded["val"], val_scores))
    lengths = torch.tensor([len(ids) for e in encoded["val"] for ids in e.response_ids], dtype=torch.float64)
    corr = float(torch.corrcoef(torch.stack([flat, lengths]))[0, 1])
    test_scores = score_records(model, encoded["test"], pad_id, max_len, device,
                                features=features.get("test"))
    test = accuracy_table(pair_outcomes(encoded["test"], test_scores))
    # "The longer response wins", scored like the model (ties on their own), on the same test pairs.
    length = accuracy_table(pair_outcomes(encoded["test"], [[len(r) for r in e.response_ids]
                                                             for e in encoded["test"]]))
    return {"val": val, "test": test, "length_baseline_test": length, "corr_reward_length": corr,
            "bias_shift": shift, "scale": scale, "val_reward_std": float(flat.std())}
