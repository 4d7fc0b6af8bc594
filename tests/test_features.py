"""data/features.py: the frozen lower blocks' outputs, cached once, give the forward of the full model.

The references are independent of the cache: make_batch's own token ids (the slot layout must
put every cached row where make_batch puts its token) and the full model's trunk on the same
batch (bit for bit in fp32 where the layout is the cache's own, to fp32 rounding elsewhere).
On SmolLM2 with real HH pairs in its chat format, the top block then trains and its loss falls.
"""
import copy
import gzip
import json
import os
import random

import numpy as np
import pytest
import torch

from data import load_records, make_batch
from data.chat import ChatFormat
from data.encode import EncodedPrompt, encode_records
from data.batch import prompt_segments
from data.features import cache_batches, cache_features, cache_key, freeze_lower, layout_slots
from model import Llama, get_preset
from model.rewards import PairwiseRewardLoss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf", "helpful-base", "test.jsonl.gz")


def random_examples(n, vocab, seed):
    """BOS + 1..26 prompt tokens, 2-4 responses of 1..20 + EOS: at max_len 48 many need several segments."""
    rng = random.Random(seed)
    ids = lambda lo, hi: [rng.randrange(4, vocab) for _ in range(rng.randint(lo, hi))]
    out = []
    for i in range(n):
        k = rng.randint(2, 4)
        pairs = [(j, j + 1) for j in range(k - 1)]
        out.append(EncodedPrompt([1] + ids(1, 26), [ids(1, 20) + [2] for _ in range(k)], pairs,
                                 [1.0] * len(pairs), [0.0] * len(pairs), [None] * len(pairs), index=10 * i))
    return out


def test_slots_are_laid_out_where_make_batch_puts_the_tokens():
    enc, max_len = random_examples(30, 500, seed=0), 48
    start, token_of_slot = {}, {}
    for e in enc:               # the module docstring's rule, written out again: segment by segment
        start[e.index] = len(token_of_slot)
        for group in prompt_segments(e, max_len):
            for t in e.prompt_ids + [t for j in group for t in e.response_ids[j]]:
                token_of_slot[len(token_of_slot)] = t
    assert len(token_of_slot) > sum(e.packed_tokens for e in enc)     # some prompts were copied
    for subset in (enc, enc[::-1], enc[3:11]):
        real = make_batch(subset, "packed", max_len=max_len, pad_id=0)
        slots = layout_slots(subset, start, max_len)                  # what FeatureCache.hidden gathers by
        assert slots.shape == real.input_ids.shape
        mapped = torch.tensor([[token_of_slot.get(int(s), 0) for s in row] for row in slots])
        assert torch.equal(mapped, real.input_ids)
        assert torch.equal(slots < 0, real.input_ids == 0)


def tiny_reward_model():
    torch.manual_seed(0)
    return Llama(get_preset("tiny"), head="reward").eval()


def test_second_run_reuses_the_cache_and_another_key_does_not(tmp_path, monkeypatch):
    model, enc = tiny_reward_model(), random_examples(12, 500, seed=1)
    first = freeze_lower(model, 1)
    calls = []
    forward = model.blocks
    monkeypatch.setattr(model, "blocks", lambda *a, **k: calls.append(1) or forward(*a, **k))
    a = cache_features(model, enc, first, 48, str(tmp_path), batch_tokens=100, log=lambda line: None)
    n_batches = len(cache_batches(enc, 48, 100))
    assert len(calls) == n_batches > 1
    b = cache_features(model, enc, first, 48, str(tmp_path), batch_tokens=100, log=lambda line: None)
    assert len(calls) == n_batches and a.path == b.path                  # read, not computed
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(a.path)]      # no .partial left
    key = cache_key(model, enc, first, 48, "fp32")[0]
    for changed in (cache_key(model, enc, first - 1, 48, "fp32"), cache_key(model, enc, first, 64, "fp32"),
                    cache_key(model, enc, first, 48, "bf16"), cache_key(model, enc[1:], first, 48, "fp32")):
        assert changed[0] != key
    with torch.no_grad():
        model.layers[0].attention.wq.weight[0, 0] += 1.0                   # the checkpoint's content
    c = cache_features(model, enc, first, 48, str(tmp_path), batch_tokens=100, log=lambda line: None)
    assert c.path != a.path and len(calls) == 2 * n_batches
    # a key.json that says what was hashed
    info = json.load(open(os.path.join(a.path, "key.json")))
    assert (info["first_layer"], info["max_len"], info["dtype"], info["n_examples"]) == (first, 48, "fp32", 12)


@pytest.mark.parametrize("damage", ["truncate states", "break key.json", "key.json a list", "short offsets"])
def test_a_damaged_cache_is_one_line_not_a_traceback(tmp_path, damage):
    from model.files import CheckpointError
    model, enc = tiny_reward_model(), random_examples(6, 500, seed=2)
    first = freeze_lower(model, 1)
    path = cache_features(model, enc, first, 48, str(tmp_path), batch_tokens=100, log=lambda line: None).path
    if damage == "truncate states":
        os.truncate(os.path.join(path, "states.npy"), 1000)
    elif damage == "short offsets":
        offsets = np.load(os.path.join(path, "offsets.npy"))
        np.save(os.path.join(path, "offsets.npy"), offsets[:-1])
    else:
        open(os.path.join(path, "key.json"), "w").write("{" if damage == "break key.json" else "[]")
    with pytest.raises(CheckpointError, match="a damaged feature cache .*; delete it to rebuild"):
        cache_features(model, enc, first, 48, str(tmp_path), batch_tokens=100, log=lambda line: None)


def test_evaluation_from_the_cache_scores_like_the_full_model(tmp_path):
    # train.py --train-layers caches val and test too, and scores them from the cache: the rewards
    # must be the full model's (score_records groups prompts its own way: fp32 rounding only).
    from data.evaluate import score_records
    model, enc = tiny_reward_model(), random_examples(20, 500, seed=2)
    first = freeze_lower(model, 1)
    cache = cache_features(model, enc, first, 48, str(tmp_path), batch_tokens=100, log=lambda line: None)
    for batch_tokens in (64, 100000):
        full = score_records(model, enc, 0, 48, batch_tokens=batch_tokens)
        cached = score_records(model, enc, 0, 48, batch_tokens=batch_tokens, features=cache)
        assert [len(s) for s in full] == [len(e.response_ids) for e in enc]
        torch.testing.assert_close(torch.tensor(sum(cached, [])), torch.tensor(sum(full, [])), rtol=1e-5, atol=1e-6)


def test_freeze_lower_freezes_the_embedding_and_the_blocks_below():
    model = tiny_reward_model()
    n = model.config.n_layers
    assert freeze_lower(model, 1) == n - 1
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {name for name, _ in model.named_parameters()
                       if name.startswith((f"layers.{n - 1}.", "norm.", "head."))}
    assert freeze_lower(tiny_reward_model(), 0) == 0
    for too_many in (n, n + 1):        # n would freeze nothing, the embedding included
        with pytest.raises(ValueError, match="blocks"):
            freeze_lower(tiny_reward_model(), too_many)


def test_examples_that_split_their_tokens_differently_have_different_keys():
    """The same token stream cut into other prompts and responses is other features: the key
    hashes each example's response count and lengths, not only its ids."""
    model = tiny_reward_model()
    one = lambda prompt, responses, i: EncodedPrompt(prompt, responses, [(0, len(responses) - 1)], [1.0],
                                                     [0.0], [None], index=i)
    a = [one([1], [[7]], 0), one([1, 1], [[5, 6]], 1)]
    b = [one([7], [[2], [2]], 0), one([5], [[6]], 1)]
    assert cache_key(model, a, 1, 16, "fp32")[0] != cache_key(model, b, 1, 16, "fp32")[0]


# ---- the real model: SmolLM2, HH pairs in its chat format, the top block trained ---------------------

@pytest.fixture(scope="module")
def smollm2_pairs(smollm2, tmp_path_factory):
    if not os.path.isfile(HH):
        pytest.skip("../shared/data/hh-rlhf is not present")
    path = tmp_path_factory.mktemp("hh") / "pairs.jsonl"
    with gzip.open(HH, "rt") as f, open(path, "w") as out:
        out.writelines(line for _, line in zip(range(24), f))
    records, _ = load_records(str(path))
    tok = smollm2.tokenizer
    enc, _ = encode_records(records, tok, 96, chat=ChatFormat(tok))
    enc = enc[:6]                   # the first six pairs whose responses fit 96 tokens
    torch.manual_seed(0)
    model = copy.deepcopy(smollm2.model)
    model.swap_head("reward")
    return model, enc, tok


def features_of(model, examples, max_len, first, cache=None):
    """The trunk's pre-norm output (N, T, D) of make_batch(examples): the full model, or the cache's."""
    batch = make_batch(examples, "packed", max_len=max_len, pad_id=0)
    with torch.no_grad():
        if cache is None:
            return model.trunk(batch.input_ids, batch.attention_mask, batch.position_ids, final_norm=False), batch
        return model.blocks(cache.hidden(examples), batch.attention_mask, batch.position_ids, first=first), batch


def test_smollm2_cache_is_exact_and_the_top_block_learns(smollm2_pairs, tmp_path):
    model, enc, tok = smollm2_pairs
    max_len, first = 96, freeze_lower(model, 1)
    assert first == 29 and sum(len(e.response_ids) for e in enc) == 12
    cache = cache_features(model, enc, first, max_len, str(tmp_path), batch_tokens=400, log=lambda line: None)
    batches = cache_batches(enc, max_len, 400)
    assert len(batches) >= 2
    # 1. Bit for bit, in fp32, the full trunk on a batch laid out as the cache was filled.
    for b in batches:
        examples = [enc[i] for i in b]
        full, batch = features_of(model, examples, max_len, first)
        cached, _ = features_of(model, examples, max_len, first, cache)
        real = batch.input_ids != 0
        assert torch.equal(full[real], cached[real]), b
    # 2. Another grouping (one batch, another order): fp32 rounding of the attention only.
    full, batch = features_of(model, enc[::-1], max_len, first)
    cached, _ = features_of(model, enc[::-1], max_len, first, cache)
    real = batch.input_ids != 0
    torch.testing.assert_close(cached[real], full[real], rtol=1e-5, atol=1e-4)
    # 3. bf16 storage: the rewards move by bf16's rounding of the features, carried by one block.
    half = cache_features(model, enc, first, max_len, str(tmp_path), "bf16", batch_tokens=400, log=lambda line: None)
    assert half.path != cache.path and half.states.nbytes * 2 == cache.states.nbytes
    with torch.no_grad():
        model.head.weight.normal_(0.0, 1.0 / model.config.dim ** 0.5)     # rewards of order 1
        r32 = model.score_hidden(features_of(model, enc, max_len, first, cache)[0], batch_end(enc, max_len))
        r16 = model.score_hidden(features_of(model, enc, max_len, first, half)[0], batch_end(enc, max_len))
    assert 0 < float((r16 - r32).abs().max()) < 2e-2 * max(1.0, float(r32.abs().max()))
    # 4. The top block, norm and head train on the cached features: the loss falls, nothing below moves.
    frozen_before = model.layers[first - 1].feed_forward.w2.weight.clone()
    loss_fn = PairwiseRewardLoss(model, "reference", first)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) < 0.05 * sum(
        p.numel() for p in model.parameters())
    batch = make_batch(enc, "packed", max_len=max_len, pad_id=tok.pad_id)
    hidden = cache.hidden(enc)
    losses = []
    for _ in range(8):
        out = loss_fn(batch, hidden)
        opt.zero_grad()
        (out.loss / batch.pair_weight.sum()).backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.7 * losses[0], losses
    assert torch.equal(model.layers[first - 1].feed_forward.w2.weight, frozen_before)
    assert model.tok_embeddings.weight.grad is None


def batch_end(examples, max_len):
    return make_batch(examples, "packed", max_len=max_len, pad_id=0).end_idx
