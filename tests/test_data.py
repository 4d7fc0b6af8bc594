"""data/: formats, errors, margins, K-way pairs, the length policy, layouts, batching, splits.

Independent references: hand-written expected records and masks, the published Llama 2
margin tables, the HH-RLHF README's own counts of its quirks, and a second layout.
"""
import gzip
import hashlib
import io
import json
import os
import sys

import pytest
import torch

from data import (RATING_MARGINS, DataError, PrefRecord, encode_records, load_records, make_batch,
                  margins_for, plan_batches, render_conversation, shard, split_records)
from data.batch import micro_batches
from data.encode import EncodedPrompt
from data.records import parse_data_spec
from data.split import split_of

HH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "hh-rlhf")
HH_FILES = ["harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"]


class ByteTokenizer:
    """Stand-in tokenizer: one id per UTF-8 byte (4..259); bos 1, eos 2, pad 3."""
    bos_id, eos_id, pad_id, vocab_size = 1, 2, 3, 260
    bos_prefix = [1]

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [b + 4 for b in text.encode("utf-8")] + [self.eos_id] * eos

    def decode(self, ids):
        return bytes(i - 4 for i in ids if i >= 4).decode("utf-8", "replace")


def write(tmp_path, name, lines):
    path = tmp_path / name
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return str(path)


# ---- formats ---------------------------------------------------------------------------------

def test_explicit_pair_with_optional_fields(tmp_path):
    path = write(tmp_path, "pairs.jsonl", [
        {"prompt": "Q?", "chosen": " yes", "rejected": " no", "margin": 0.5, "rating": "Better",
         "is_safety": True, "category": "c", "source": "s", "id": 7},
        {"prompt": "Q2", "chosen": "a", "rejected": "b"},
    ])
    records, stats = load_records(path)
    assert (stats.n_read, stats.n_kept) == (2, 2)
    r = records[0]
    assert (r.prompt, r.responses, r.pairs, r.pair_weight) == ("Q?", [" yes", " no"], [(0, 1)], [1.0])
    assert (r.margin, r.rating, r.is_safety, r.category, r.source) == ([0.5], ["better"], True, "c", "s")
    assert r.fields == {"id": 7} and r.origin == f"{path}:line 1"
    assert records[1].source == f"{tmp_path.name}/pairs"   # default source: the file's label


def test_conversation_renders_like_the_hh_transcript(tmp_path):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Add 2 and 3"}]
    transcript = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Add 2 and 3\n\nAssistant:"
    assert render_conversation(messages) == transcript
    path = write(tmp_path, "mix.jsonl", [
        {"prompt": messages, "chosen": "5", "rejected": "6"},                                # conversation
        {"chosen": transcript + " 5", "rejected": transcript + " 6"},                       # HH transcript
        {"chosen": messages + [{"role": "assistant", "content": "5"}],                      # TRL implicit
         "rejected": messages + [{"role": "assistant", "content": "6"}]},
        {"prompt": messages, "chosen": [{"role": "assistant", "content": "5"}],             # TRL explicit
         "rejected": [{"role": "assistant", "content": "6"}]},
    ])
    records, _ = load_records(path)
    assert len({(r.prompt, tuple(r.responses)) for r in records}) == 1
    assert records[0].prompt == transcript and records[0].responses == [" 5", " 6"]


def test_hh_quirks_dropped_and_counted(tmp_path):
    t = "\n\nHuman: a\n\nAssistant:"
    path = write(tmp_path, "hh.jsonl", [
        {"chosen": t + " x", "rejected": t + " y"},
        {"chosen": t + " x", "rejected": "\n\nHuman: b\n\nAssistant: y"},   # prefixes differ
        {"chosen": t + " x", "rejected": t + " x"},                         # identical
        {"chosen": t + " ", "rejected": t + " y"},                          # empty final turn: data
        {"chosen": t + " x", "rejected": t + " y\n\nHuman: thanks"},        # ends with the Human's turn
    ])
    records, stats = load_records(path)
    assert len(records) == 2 and records[1].responses == ["", " y"]
    assert dict(stats.dropped) == {"prefix_mismatch": 1, "identical": 1, "ends_with_human": 1}
    assert stats.n_empty_responses == 1
    assert "kept 2, dropped 3 (ends_with_human 1, identical 1, prefix_mismatch 1)" in stats.summary()


def test_a_repeated_response_ranked_apart_is_dropped_and_a_harmless_mix_of_forms_kept(tmp_path):
    """Scores given response by response can rank one text twice, apart: its pairs contradict each
    other (a > b > a), so the record is dropped and counted; tied repeats are data. After a
    conversation prompt a string and a one-message list both get HH's space: the same text."""
    path = write(tmp_path, "k.jsonl", [
        {"prompt": "p", "responses": ["Yes.", "No.", "Yes."], "scores": [9, 5, 2]},
        {"prompt": "p", "responses": ["Yes.", "No.", "Yes."], "scores": [9, 5, 9]},
        {"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "x"}],
         "rejected": "y"}])
    records, stats = load_records(path)
    assert dict(stats.dropped) == {"contradictory": 1} and len(records) == 2
    assert records[0].pairs == [(0, 1), (2, 1)]
    assert records[1].responses == [" x", " y"]
    from data.records import parse_record         # score.py's score-only form may carry a pair's fields
    assert parse_record({"prompt": "p", "response": "a", "rating": "better"}, "f:line 1", unranked=True)


def test_an_empty_response_means_the_same_in_every_format(tmp_path):
    """HH transcript, TRL's explicit and conversational formats, a ranking: an empty response is
    data ("" that encodes as EOS alone), and two of them are an identical pair, dropped."""
    t = "\n\nHuman: a\n\nAssistant:"
    conv = [{"role": "user", "content": "a"}]
    path = write(tmp_path, "empty.jsonl", [
        {"chosen": t + " ", "rejected": t + " y"},
        {"prompt": t, "chosen": "", "rejected": " y"},
        {"prompt": conv, "chosen": [{"role": "assistant", "content": "  "}],
         "rejected": [{"role": "assistant", "content": "y"}]},
        {"prompt": t, "responses": ["", " y", "\n"], "ranking": [1, 0, 2]},
        {"prompt": t, "chosen": "", "rejected": "   "},                  # both empty: identical
    ])
    records, stats = load_records(path)
    assert [r.responses[0] for r in records[:3]] == ["", "", ""] and records[3].responses == ["", " y", ""]
    assert records[0].prompt == records[1].prompt and records[0].responses == records[1].responses
    assert records[3].pairs == [(1, 0), (1, 2)]                           # the two empties form no pair
    assert dict(stats.dropped) == {"identical": 1} and stats.n_empty_responses == 5   # kept records only
    (e,), _ = encode_records(records[:1], ByteTokenizer(), max_len=64)
    assert e.response_ids[0] == [ByteTokenizer.eos_id]


def test_a_corrupt_gzip_body_is_a_data_error(tmp_path):
    good = gzip.compress(b'{"prompt": "p", "chosen": "x", "rejected": "y"}\n' * 50)
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(good[:20] + bytes(b ^ 0xFF for b in good[20:40]) + good[40:])   # deflate body damaged
    with pytest.raises(DataError, match=f"{path}.*corrupt gzip stream"):
        load_records(str(path))


def test_kway_ranking_pairs_and_weights(tmp_path):
    path = write(tmp_path, "rank.jsonl", [
        {"prompt": "P", "responses": ["a", "b", "c", "d"], "ranking": [2, 0, 3, 1]},
        {"prompt": "P", "responses": ["a", "b", "c", "d"], "scores": [3, 1, 3, 2]},
        {"prompt": "P", "responses": ["a", "b"], "scores": [1, 1]},
    ])
    records, stats = load_records(path)
    ranked, scored = records
    # C(4,2) = 6 pairs, best first: 2 > 0 > 3 > 1.
    assert ranked.pairs == [(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)]
    assert ranked.pair_weight == [1 / 6] * 6
    # Scores 3,1,3,2: the tie between 0 and 2 gives no pair; the rest keep 1/C(4,2) each.
    assert sorted(scored.pairs) == [(0, 1), (0, 3), (2, 1), (2, 3), (3, 1)]
    assert scored.pair_weight == [1 / 6] * 5
    assert dict(stats.dropped) == {"no_pairs": 1}


def test_json_list_gzip_and_stdin(tmp_path, monkeypatch):
    items = [{"prompt": "A", "chosen": "x", "rejected": "y"}, {"prompt": "B", "chosen": "x", "rejected": "y"}]
    path = tmp_path / "list.json"
    path.write_text('[\n  {"prompt": "A", "chosen": "x", "rejected": "y"},\n\n  {"prompt": "B", "chosen": "x",\n'
                    '   "rejected": "y"}\n]\n')
    records, _ = load_records(str(path))
    assert [r.prompt for r in records] == ["A", "B"]
    assert [r.origin.rsplit(":", 1)[1] for r in records] == ["line 2", "line 4"]
    gz = write(tmp_path, "data.gz", items)          # gzip found by its magic bytes, not the name
    assert [r.prompt for r in load_records(gz)[0]] == ["A", "B"]
    stdin = io.TextIOWrapper(io.BytesIO(gzip.compress("\n".join(map(json.dumps, items)).encode())))
    monkeypatch.setattr(sys, "stdin", stdin)
    records, _ = load_records("-")
    assert [r.prompt for r in records] == ["A", "B"] and records[0].source == "stdin"


def test_tag_sets_source_and_safety(tmp_path):
    path = write(tmp_path, "s.jsonl", [{"prompt": "A", "chosen": "x", "rejected": "y", "is_safety": False,
                                        "source": "mine"}])
    (safe,), _ = load_records(path, tag="safety")
    (helpful,), _ = load_records(path, tag="helpful")
    assert (safe.source, safe.is_safety) == ("safety", True)
    assert (helpful.source, helpful.is_safety) == ("helpful", False)
    assert parse_data_spec("safety=" + path) == ("safety", path)
    assert parse_data_spec(path) == (None, path)


@pytest.mark.skipif(not os.path.isdir(HH_DIR), reason="HH-RLHF test data not present")
def test_hh_rlhf_files_parse_with_the_readme_counts():
    # The data README counts 5+9+0+3 differing prefixes and 0+2+2+32 identical pairs.
    records, stats = load_records([os.path.join(HH_DIR, d, "test.jsonl.gz") for d in HH_FILES])
    assert stats.n_read == 8552
    # and 2 helpful-online lines whose rejected transcript ends with a Human turn after the last Assistant.
    assert dict(stats.dropped) == {"prefix_mismatch": 17, "identical": 36, "ends_with_human": 2}
    assert stats.n_kept == len(records) == 8552 - 55 and stats.n_skipped == 0
    for r in records[::97]:
        assert r.prompt.endswith("\n\nAssistant:") and r.prompt.startswith("\n\nHuman:")
        assert r.responses[0] != r.responses[1]
    assert {r.source for r in records} == {f"{d}/test" for d in HH_FILES}


# ---- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("line, field, problem", [
    ("{not json", None, "not valid JSON"),
    ('["a list"]', None, "expected a JSON object"),
    ('{"prompt": "p", "chosen": "x"}', "rejected", "missing"),
    ('{"prompt": 3, "chosen": "x", "rejected": "y"}', "prompt", "expected a string"),
    ('{"prompt": "p", "chosen": "x", "rejected": "y", "margin": "big"}', "margin", "expected a number"),
    ('{"prompt": "p", "chosen": "x", "rejected": "y", "rating": "much better"}', "rating", "must be one of"),
    ('{"prompt": "p", "chosen": "x", "rejected": "y", "is_safety": "yes"}', "is_safety", "true/false"),
    ('{"prompt": [{"role": "bot", "content": "x"}], "chosen": "x", "rejected": "y"}', "prompt[0].role", "must be"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}', "ranking", "permutation"),
    ('{"prompt": "p", "responses": ["a", "b"], "scores": [1]}', "scores", "2 numbers"),
    ('{"chosen": "no assistant turn", "rejected": "y"}', "chosen", "no"),
    ('{"prompt": "\\ud800", "chosen": "x", "rejected": "y"}', "prompt", "lone surrogate"),
    ('{"prompt": "p", "chosen": "x", "rejected": "y", "margin": 1' + "0" * 400 + '}', "margin", "finite"),
    # A message-list response is read as " " + content, a string verbatim: mixed, they would differ by a space.
    ('{"prompt": "p", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "x"}', "rejected",
     "one form"),
    ('{"prompt": "p", "responses": ["a", [{"role": "assistant", "content": "b"}]], "ranking": [0, 1]}',
     "responses[1]", "one form"),
    # A ranking's pairs come from its order: a pair's margin, rating or responses are refused, not dropped.
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "margin": 3}', "margin", "not to a ranking"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "chosen": "a"}', "chosen", "not to a ranking"),
    ('{"prompt": "p", "chosen": "x", "rejected": "y", "chosen": "y"}', "chosen", "appears twice"),   # json keeps "y"
    ('{"prompt": [{"role": "user", "content": "a", "role": "assistant"}], "chosen": "x", "rejected": "y"}',
     "prompt[0].role", "appears twice"),
])
def test_errors_name_file_line_and_field(tmp_path, line, field, problem):
    path = write(tmp_path, "bad.jsonl", ['{"prompt": "ok", "chosen": "x", "rejected": "y"}', "", line])
    with pytest.raises(DataError) as info:
        load_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}:line 3: ")          # the blank line 2 still counts for numbering
    assert (f"field {field!r}" in message) if field else "field" not in message
    assert problem in message
    records, stats = load_records(path, skip_bad=True)
    assert (len(records), stats.n_skipped, stats.n_read) == (1, 1, 2) and stats.errors == [message]


# ---- margins ---------------------------------------------------------------------------------

def test_rating_margin_tables_are_llama2s():
    # Touvron et al. 2023 (§3.2.2): the small and large margin variants, exactly.
    assert RATING_MARGINS["small"] == {"significantly better": 1.0, "better": 2 / 3, "slightly better": 1 / 3,
                                       "negligibly better": 0.0, "unsure": 0.0}
    assert RATING_MARGINS["large"] == {"significantly better": 3.0, "better": 2.0, "slightly better": 1.0,
                                       "negligibly better": 0.0, "unsure": 0.0}


def test_margin_modes():
    both = PrefRecord.pair("p", "a", "b", margin=0.25, rating="better")
    rating_only = PrefRecord.pair("p", "a", "b", rating="slightly better")
    neither = PrefRecord.pair("p", "a", "b")
    expected = {  # mode: (both, rating only, neither)
        "auto": (0.25, 1 / 3, 0.0), "none": (0.0, 0.0, 0.0), "field": (0.25, 0.0, 0.0),
        "small": (2 / 3, 1 / 3, 0.0), "large": (2.0, 1.0, 0.0)}
    for mode, values in expected.items():
        assert tuple(margins_for(r, mode)[0] for r in (both, rating_only, neither)) == values, mode
    with pytest.raises(ValueError, match="margin_mode"):
        margins_for(both, "medium")


# ---- the length policy -----------------------------------------------------------------------

def test_truncation_keeps_the_end_and_one_shared_prompt():
    tok = ByteTokenizer()
    record = PrefRecord("P" * 20 + "END", ["abcdefgh", "xy", "z" * 30], [(0, 1), (0, 2), (1, 2)],
                        [1 / 3] * 3, [None] * 3, [None] * 3)
    (e,), stats = encode_records([record], tok, max_len=16)
    # "z"*30 cannot fit even alone: it and its two pairs go; "abcdefgh" (8 + EOS) sets the budget.
    assert e.pairs == [(0, 1)] and e.response_index == [0, 1] and e.pair_weight == [1 / 3]
    assert tok.decode(e.response_ids[0][:-1]) == "abcdefgh" and e.response_ids[0][-1] == tok.eos_id
    assert e.prompt_ids[0] == tok.bos_id and tok.decode(e.prompt_ids[1:]) == ("P" * 20 + "END")[-6:]
    assert len(e.prompt_ids) + len(e.response_ids[0]) == 16          # the longest fills max_len exactly
    assert (stats.n_responses_too_long, stats.n_pairs_kept, stats.n_prompt_tokens_cut) == (1, 1, 17)
    assert "1 responses too long" in stats.summary()
    # A prompt whose every response is too long is dropped, and counted.
    _, stats = encode_records([PrefRecord.pair("p", "x" * 40, "y" * 40)], tok, max_len=16)
    assert (stats.n_prompts_kept, stats.n_pairs_kept) == (0, 0)


# ---- layouts (the equal-rewards test with a real model is in test_data_packing.py) ------------

def encoded(prompt, *responses, pairs=None, index=0):
    pairs = pairs or [(0, j) for j in range(1, len(responses))]
    return EncodedPrompt(prompt_ids=list(prompt), response_ids=[list(r) for r in responses], pairs=pairs,
                         pair_weight=[1.0] * len(pairs), margin=[0.0] * len(pairs), rating=[None] * len(pairs),
                         index=index)


def test_packed_block_mask_positions_and_end_idx_by_hand():
    # Row: [1 5 | 6 2 | 7 2]: prompt (1 5), response a (6 2), response b (7 2).
    batch = make_batch([encoded([1, 5], [6, 2], [7, 2])], "packed", max_len=8, pad_id=0)
    M = [[1, 0, 0, 0, 0, 0],
         [1, 1, 0, 0, 0, 0],
         [1, 1, 1, 0, 0, 0],
         [1, 1, 1, 1, 0, 0],
         [1, 1, 0, 0, 1, 0],   # response b sees the prompt and itself, not response a
         [1, 1, 0, 0, 1, 1]]
    assert batch.attention_mask[0].int().tolist() == M
    assert batch.input_ids.tolist() == [[1, 5, 6, 2, 7, 2]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 3]]
    assert batch.end_idx.tolist() == [3, 5] and batch.pairs.tolist() == [[0, 1]]
    assert (batch.n_real_tokens, batch.n_computed_tokens) == (6, 6)


def test_packed_rows_share_prompts_split_segments_and_pad_safely():
    a = encoded([1, 9, 9], [6, 6, 2], [7, 2], index=0)     # 8 tokens
    b = encoded([1, 8], [5, 2], [4, 4, 4, 2], index=1)     # 8 tokens
    # 6 + 4 + 5 + 2 > 12: two segments, each with a copy of the prompt: (6 + 5) and (6 + 4 + 2).
    c = encoded([1] + [3] * 5, [6] * 3 + [2], [7] * 4 + [2], [8, 2], index=2)
    batch = make_batch([a, b, c], "packed", max_len=12, pad_id=0)
    ids, pos, mask = batch.input_ids, batch.position_ids, batch.attention_mask
    flat_ids, flat_pos = ids.reshape(-1), pos.reshape(-1)
    # Every response ends at an EOS, at position len(prompt) + len(response) - 1.
    prompts = [3, 3, 2, 2, 6, 6, 6]
    assert (flat_ids[batch.end_idx] == 2).all()
    response_len = [len(r) for e in (a, b, c) for r in e.response_ids]
    assert flat_pos[batch.end_idx].tolist() == [p + L - 1 for p, L in zip(prompts, response_len)]
    assert batch.n_real_tokens == 8 + 8 + (6 + 5) + (6 + 4 + 2)
    assert batch.input_ids.shape == (4, 12)                 # first-fit decreasing: 12, 11, 8 + ..., 8
    # What each response's EOS sees is exactly its padded row (BOS + prompt + response) at
    # positions 0..L-1: no other response, no other prompt.
    padded = make_batch([a, b, c], "padded", max_len=12, pad_id=0)
    for r in range(len(batch.end_idx)):
        n, i = divmod(batch.end_idx[r].item(), T := ids.shape[1])
        keys = mask[n, i].nonzero().flatten()
        row = padded.input_ids.reshape(-1)[padded.end_idx[r] - torch.arange(len(keys)).flip(0)]
        assert ids[n, keys].tolist() == row.tolist()
        assert pos[n, keys].tolist() == list(range(len(keys))) == list(range(padded.attention_mask[r].sum()))
    pad = ids == 0
    assert (mask[pad].sum(-1) == 1).all()                             # padding sees only itself
    assert mask.any(-1).all()                                         # no empty softmax row


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_padded_layout(pad_side):
    batch = make_batch([encoded([1, 5], [6, 2], [7, 7, 2])], "padded", pad_side, max_len=8, pad_id=0)
    rows = [[1, 5, 6, 2, 0], [1, 5, 7, 7, 2]] if pad_side == "right" else [[0, 1, 5, 6, 2], [1, 5, 7, 7, 2]]
    assert batch.input_ids.tolist() == rows
    assert batch.attention_mask.tolist() == [[int(t != 0) for t in r] for r in rows]
    assert batch.input_ids.reshape(-1)[batch.end_idx].tolist() == [2, 2]
    assert batch.position_ids[0].tolist() == ([0, 1, 2, 3, 0] if pad_side == "right" else [0, 0, 1, 2, 3])
    assert (batch.n_real_tokens, batch.n_computed_tokens) == (9, 10)


def test_make_batch_rejects_bad_arguments():
    e = [encoded([1, 5], [6, 2], [7, 2])]
    for kwargs, name in [(dict(layout="dense"), "layout"), (dict(pad_side="top"), "pad_side"),
                         (dict(max_len=None), "max_len"), (dict(pad_id=None), "pad_id"), (dict(max_len=3), "max_len")]:
        with pytest.raises(ValueError, match=name):
            make_batch(e, **{"layout": "packed", "max_len": 8, "pad_id": 0, **kwargs})


# ---- batching, resume, sharding ---------------------------------------------------------------

def many_prompts(n=40):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        k = 2 + i % 3
        out.append(encoded([1] + torch.randint(4, 50, (1 + i % 7,), generator=g).tolist(),
                           *[torch.randint(4, 50, (1 + (i + j) % 5,), generator=g).tolist() + [2] for j in range(k)],
                           index=i))
    return out


def test_plan_is_deterministic_whole_prompts_and_resumable():
    enc = many_prompts()
    sizes = [e.n_pairs for e in enc]
    plan = plan_batches(sizes, 6, seed=3)
    # A function of its arguments: a resumed run recomputes the same plan and goes on from its step.
    assert plan == plan_batches(sizes, 6, seed=3) != plan_batches(sizes, 6, seed=4)
    assert sorted(i for b in plan for i in b) == list(range(len(enc)))          # every prompt once
    assert all(sum(enc[i].n_pairs for i in b) <= 6 for b in plan)
    assert plan_batches(sizes, 6, shuffle=False)[0] == [0, 1, 2]


def test_plan_counts_fractional_epochs_and_sequences():
    # 10 sequences of size 1, 2.5 epochs: 25 items = three shuffled passes cut after 25, in
    # batches of 4 (the last one short); each full pass holds every item once.
    plan = plan_batches([1] * 10, 4, epochs=2.5, seed=7)
    flat = [i for b in plan for i in b]
    assert [len(b) for b in plan] == [4] * 6 + [1] and len(flat) == 25
    assert sorted(flat[:10]) == sorted(flat[10:20]) == list(range(10)) and flat[:10] != flat[10:20]
    assert flat[:20] == [i for b in plan_batches([1] * 10, 4, epochs=2.0, seed=7) for i in b]
    # an item larger than the batch is a batch of its own
    assert plan_batches([1, 9, 1], 4, shuffle=False) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="per_batch"):
        plan_batches([1], 0)


@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_shards_partition_each_global_batch(world_size):
    enc = many_prompts()
    sizes = [e.n_pairs for e in enc]
    weight = lambda items: make_batch([enc[i] for i in items], max_len=32, pad_id=0).pair_weight.sum().item()
    for batch in plan_batches(sizes, 10, seed=1):
        parts = [shard(batch, sizes, r, world_size) for r in range(world_size)]
        assert sum(parts, []) == batch                                    # disjoint, ordered, complete
        assert sum(weight(p) for p in parts if p) == pytest.approx(weight(batch))
        # Each rank's micro-batches cover its shard; every rank runs as many (empty ones pad).
        micro = [micro_batches(batch, sizes, 4, r, world_size) for r in range(world_size)]
        assert [sum(m, []) for m in micro] == parts and len({len(m) for m in micro}) == 1
        assert all(len(m) == 1 or sum(sizes[i] for i in m) <= 4 for ms in micro for m in ms)
    assert shard([5, 6], sizes, 1, 2) == [6] and shard([5, 6], sizes, 0, 1) == [5, 6]
    with pytest.raises(ValueError, match="rank"):
        shard([5], sizes, 2, 2)


# ---- splits ----------------------------------------------------------------------------------

def test_split_is_prompt_disjoint_deterministic_and_order_free():
    records = [PrefRecord.pair(f"prompt {i % 700}", "a", f"b{i}") for i in range(2000)]
    split = split_records(records)
    again = split_records(records[::-1])
    for name in ("train", "val", "test"):
        assert sorted(id(r) for r in split[name]) == sorted(id(r) for r in again[name])
    prompts = {name: {r.prompt for r in rs} for name, rs in split.items()}
    assert not (prompts["train"] & prompts["val"] or prompts["train"] & prompts["test"]
                or prompts["val"] & prompts["test"])
    assert 0.85 < len(prompts["train"]) / 700 < 0.95
    # The hash is sha256 of the text (never Python's salted hash()), cut at 0.90 and 0.95.
    for text in ("Hello", "prompt 3", "\n\nHuman: é\n\nAssistant:"):
        u = int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) / 2 ** 64
        assert split_of(text) == ("train" if u < 0.9 else "val" if u < 0.95 else "test")
    with pytest.raises(ValueError, match="sum to 1"):
        split_records(records, {"train": 0.9, "test": 0.2})
