"""Fuzz the loader and the layouts with garbage: the only exception is DataError, and
kept + dropped + skipped == records read, whatever comes in."""
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data import DataError, encode_records, load_records, make_batch
from test_data import ByteTokenizer

KEYS = ["prompt", "chosen", "rejected", "responses", "ranking", "scores", "margin", "rating", "is_safety",
        "category", "source", "role", "content"]
json_scalars = st.none() | st.booleans() | st.integers(-3, 5) | st.floats(allow_nan=False) | st.text(max_size=30)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=4),
                           max_leaves=12)
hh = st.text(max_size=20).map(lambda t: f"\n\nHuman: {t}\n\nAssistant:")
plausible = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=20) | json_values, "chosen": st.text(max_size=20) | json_values,
                           "rejected": st.text(max_size=20)},
                          optional={"margin": json_values, "rating": st.sampled_from(["better", "unsure", "meh"]),
                                    "is_safety": json_values}),
    st.fixed_dictionaries({"chosen": st.tuples(hh, st.text(max_size=10)).map("".join),
                           "rejected": st.tuples(hh, st.text(max_size=10)).map("".join)}),
    st.fixed_dictionaries({"prompt": st.text(max_size=10), "responses": st.lists(st.text(max_size=8), max_size=5)},
                          optional={"ranking": st.lists(st.integers(-1, 5), max_size=5),
                                    "scores": st.lists(st.integers(0, 2) | json_scalars, max_size=5)}),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "bot"]),
                                    "content": st.text(max_size=8) | json_scalars}), max_size=3)
    .map(lambda m: {"prompt": m, "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}),
)
line = st.one_of(plausible.map(json.dumps), json_values.map(json.dumps),
                 st.text(max_size=40).map(lambda t: t.replace("\n", " ")))


def check_file(path, n_records):
    try:
        records, stats = load_records(path)
        assert stats.n_skipped == 0
    except DataError as e:
        assert str(e).startswith(f"{path}:line ") or str(e).startswith(f"{path}: ")
    records, stats = load_records(path, skip_bad=True)
    assert stats.n_read == n_records
    assert stats.n_kept + stats.n_dropped + stats.n_skipped == stats.n_read and stats.n_kept == len(records)
    return records


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line, max_size=8))
def test_loader_only_raises_data_error_and_accounts_for_every_line(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    # A record is a non-blank line, unless the whole file is one JSON list.
    n_records = sum(1 for raw in path.read_bytes().split(b"\n") if raw.strip())
    try:
        whole = json.loads(path.read_bytes().decode("utf-8"))
        if isinstance(whole, list) and path.read_bytes().lstrip()[:1] == b"[":
            n_records = len(whole)
    except (ValueError, UnicodeDecodeError):
        pass
    records = check_file(str(path), n_records)
    # Whatever was kept encodes and lays out in both layouts, with every reward read at an EOS.
    tok = ByteTokenizer()
    encoded, enc_stats = encode_records(records, tok, max_len=24)
    assert enc_stats.n_prompts_kept == len(encoded)
    if encoded:
        for layout in ("packed", "padded"):
            batch = make_batch(encoded, layout, max_len=24, pad_id=tok.pad_id)
            assert (batch.input_ids.reshape(-1)[batch.end_idx] == tok.eos_id).all()
            assert batch.pairs.shape[0] == sum(e.n_pairs for e in encoded)


HOSTILE = {
    "bad-bytes": b"\xff\xfe not utf-8\n",
    "huge-string": b'{"prompt": "' + b"x" * 300_000 + b'", "chosen": "a", "rejected": "b"}\n',
    "deep-nesting": b"[" * 100_000 + b"\n",
    "list-with-bad-item": b'[{"prompt": "p", "chosen": "a", "rejected": "b"}, 7]',
    "bom-and-blank-lines": b'\xef\xbb\xbf{"prompt": "p", "chosen": "a", "rejected": "b"}\n\r\n \n',
    "lone-surrogate": b'{"prompt": "p", "chosen": "\\ud800", "rejected": "b"}\n',
}


@pytest.mark.parametrize("content", list(HOSTILE.values()), ids=list(HOSTILE))
def test_loader_on_hostile_files(tmp_path, content):
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(content)
    n_records = 2 if content.startswith(b"[{") else 1
    check_file(str(path), n_records)


def test_huge_record_is_truncated_not_lost(tmp_path):
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"prompt": "x" * 200_000, "chosen": "a", "rejected": "b"}))
    records, _ = load_records(str(path))
    (e,), stats = encode_records(records, ByteTokenizer(), max_len=32)
    assert len(e.prompt_ids) == 30 and stats.n_prompt_tokens_cut == 200_000 - 29
    assert torch.equal(make_batch([e], "packed", max_len=32, pad_id=3).input_ids[0, -2:], torch.tensor([101, 2]))
