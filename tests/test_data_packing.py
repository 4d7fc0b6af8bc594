"""The two layouts give the same rewards (fp32, 1e-5), with a real model and a real tokenizer.

The reference is the padded layout: one response per row, nothing shared. The packed
layout shares the prompt, restarts positions and hides responses from each other with a
block mask; if any of that were wrong, the rewards would differ.
"""
import itertools
import os

import pytest
import torch

from data import encode_records, load_records, make_batch, plan_batches
from data.encode import EncodedPrompt

model = pytest.importorskip("model")

HH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "hh-rlhf")


@pytest.fixture(scope="module")
def reward_model():
    torch.manual_seed(0)
    m = model.Llama(model.get_preset("tiny"), head="reward").float().eval()
    with torch.no_grad():  # a head of unit scale, so that 1e-5 is a real tolerance on O(1) rewards
        m.head.weight.normal_(0.0, 1.0)
        m.head.bias.fill_(0.3)
    return m


def rewards(m, batch):
    with torch.no_grad():
        return m(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 end_idx=batch.end_idx)


def random_prompts(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    def ids(lo, hi):
        return torch.randint(4, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
    out = []
    for i in range(n):
        k = 2 + i % 3                                   # pairs and 3- and 4-way rankings
        pairs = list(itertools.combinations(range(k), 2))
        out.append(EncodedPrompt([1] + ids(1, 20), [ids(1, 12) + [2] for _ in range(k)], pairs,
                                 [1.0] * len(pairs), [0.0] * len(pairs), [None] * len(pairs), index=i))
    return out


def test_packed_equals_padded_on_random_data(reward_model):
    enc = random_prompts(9, reward_model.config.vocab_size, seed=1)
    unique_tokens = sum(e.packed_tokens for e in enc)
    for max_len in (32, 64):
        packed = make_batch(enc, "packed", max_len=max_len, pad_id=0)
        right = make_batch(enc, "padded", "right", max_len=max_len, pad_id=0)
        left = make_batch(enc, "padded", "left", max_len=max_len, pad_id=0)
        if max_len == 32:   # some prompts' responses are split into segments, each with a prompt copy
            assert packed.n_real_tokens > unique_tokens
        else:               # everything fits once, and several prompts share a row
            assert packed.n_real_tokens == unique_tokens and packed.input_ids.shape[0] < len(enc)
        assert torch.equal(packed.pairs, right.pairs)
        reference = rewards(reward_model, right)
        assert reference.std() > 0.1                    # the comparison is not between constants
        torch.testing.assert_close(rewards(reward_model, packed), reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(rewards(reward_model, left), reference, rtol=0, atol=1e-5)
        assert packed.n_computed_tokens < right.n_computed_tokens


@pytest.fixture(scope="module")
def hh_sample():
    path = os.path.join(HH_DIR, "helpful-base", "test.jsonl.gz")
    if not os.path.isfile(path):
        pytest.skip("HH-RLHF test data not present")
    records, _ = load_records(path)
    return records[:300]


@pytest.fixture(scope="module")
def hh_tokenizer(hh_sample, tmp_path_factory):
    """A real SentencePiece BPE (the project's settings), trained on a few hundred transcripts."""
    texts = [r.prompt + resp for r in hh_sample for resp in r.responses]
    return model.Tokenizer.train(texts, str(tmp_path_factory.mktemp("tok") / "hh"), vocab_size=400)


def test_real_tokenizer_keeps_response_ends_and_one_prompt(hh_sample, hh_tokenizer):
    tok = hh_tokenizer
    enc, stats = encode_records(hh_sample[:60], tok, max_len=128)
    # HH prompts and responses are long (this tokenizer is nearly byte-level): both rules fire.
    assert stats.n_prompts_truncated >= 15 and stats.n_responses_too_long >= 15 and len(enc) >= 20
    for e in enc:
        record = hh_sample[e.index]
        full_prompt = tok.encode(record.prompt)
        assert e.prompt_ids[0] == tok.bos_id and e.prompt_ids[1:] == full_prompt[e.n_prompt_tokens_cut:]
        for j, ids in zip(e.response_index, e.response_ids):
            assert ids == tok.encode(record.responses[j]) + [tok.eos_id]     # the whole response, and EOS
            assert len(e.prompt_ids) + len(ids) <= 128
        if e.n_prompt_tokens_cut:                        # cut only as much as the longest response needs
            assert len(e.prompt_ids) + max(map(len, e.response_ids)) == 128


def test_packed_equals_padded_on_hh_records(reward_model, hh_sample, hh_tokenizer):
    tok = hh_tokenizer
    assert tok.vocab_size <= reward_model.config.vocab_size
    enc, _ = encode_records(hh_sample[:40], tok, max_len=128)
    assert len(enc) >= 15
    for batch_pairs in (4, 40):
        for items in plan_batches([e.n_pairs for e in enc], batch_pairs):
            packed, padded = (make_batch([enc[i] for i in items], layout, max_len=128, pad_id=tok.pad_id)
                              for layout in ("packed", "padded"))
            torch.testing.assert_close(rewards(reward_model, packed), rewards(reward_model, padded),
                                       rtol=0, atol=1e-5)
