"""data/records.py and data/jsonfile.py: inputs that were read silently wrong, now one-line refusals or
read as their canonical form. An accepted form is checked against a second layout of the same data."""
import gzip
import json

import pytest

from data import DataError, load_records

CANON = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Sum 2 3\n\nAssistant:"    # HH's own transcript
STRIPPED = CANON[2:]                                                          # "Human: Hi ... Assistant:"
MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Sum 2 3"}]


def write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def refusal(tmp_path, record):
    """The DataError of `record`, written on line 2 after a good record."""
    path = write(tmp_path, [{"prompt": "ok", "chosen": "x", "rejected": "y"}, record])
    with pytest.raises(DataError) as info:
        load_records(path)
    return path, str(info.value)


def same(record):
    return record.prompt, record.responses, record.prompt_turns, record.response_contents


# ---- S2: a pair's record with a ranking's fields ------------------------------------------------

@pytest.mark.parametrize("record, field", [
    ({"prompt": "p", "chosen": "a", "rejected": "b", "scores": [1, 0]}, "scores"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "ranking": [1, 0]}, "ranking"),
    ({"chosen": CANON + " a", "rejected": CANON + " b", "scores": [0, 1]}, "scores"),
])
def test_a_pair_with_a_rankings_fields_is_refused(tmp_path, record, field):
    path, message = refusal(tmp_path, record)
    assert message == (f"{path}:line 2: field {field!r}: belongs to a ranking {{prompt, responses, "
                       "ranking|scores}, not to a pair {prompt, chosen, rejected}")
    assert len(load_records(path, skip_bad=True)[0]) == 1


# ---- S4: HH prompts as people write them --------------------------------------------------------

def test_stripped_and_spaced_hh_prompts_read_as_the_canonical_transcript(tmp_path):
    layouts = [
        {"prompt": MESSAGES, "chosen": "5", "rejected": "6"},                          # a conversation
        {"prompt": CANON, "chosen": " 5", "rejected": " 6"},                            # canonical HH split
        {"chosen": CANON + " 5", "rejected": CANON + " 6"},                             # HH's own form
        {"prompt": STRIPPED, "chosen": " 5", "rejected": " 6"},                         # stripped prompt
        {"chosen": STRIPPED + " 5", "rejected": STRIPPED + " 6"},                       # stripped transcripts
        {"prompt": CANON + " ", "chosen": "5", "rejected": "6"},                        # "Assistant: " + "5"
        {"prompt": STRIPPED + " ", "chosen": "5", "rejected": "6"},                     # both
        {"prompt": CANON + " ", "chosen": [{"role": "assistant", "content": "5"}],      # messages after it
         "rejected": [{"role": "assistant", "content": "6"}]},
    ]
    records, stats = load_records(write(tmp_path, layouts))
    assert stats.n_kept == len(layouts)
    assert all(same(r) == same(records[0]) for r in records), [same(r) for r in records]
    assert records[0].prompt_turns[0] == ("user", "Hi")            # the tag is a tag, not text of the turn


def test_a_ranking_after_a_spaced_hh_prompt_reads_as_the_canonical_one(tmp_path):
    spaced = {"prompt": STRIPPED + " ", "responses": ["5", "6", "7"], "ranking": [2, 0, 1]}
    canon = {"prompt": CANON, "responses": [" 5", " 6", " 7"], "ranking": [2, 0, 1]}
    (a, b), _ = load_records(write(tmp_path, [spaced, canon]))
    assert same(a) == same(b) and a.pairs == b.pairs


def test_a_prompt_that_is_not_hh_stays_verbatim(tmp_path):
    prompt = "Human: name a colour "
    (r,), _ = load_records(write(tmp_path, [{"prompt": prompt, "chosen": "red", "rejected": "x"}]))
    assert (r.prompt, r.responses, r.prompt_turns) == (prompt, ["red", "x"], [("user", prompt)])


# ---- S5: responses that repeat the prompt -------------------------------------------------------

@pytest.mark.parametrize("record, field", [
    ({"prompt": CANON, "chosen": CANON + " 5", "rejected": CANON + " 6"}, "chosen"),
    ({"prompt": STRIPPED, "chosen": STRIPPED + " 5", "rejected": STRIPPED + " 6"}, "chosen"),
    ({"prompt": CANON, "responses": [CANON + " 5", STRIPPED + " 6"], "scores": [1, 0]}, "responses[0]"),
])
def test_responses_that_repeat_the_prompt_are_refused(tmp_path, record, field):
    path, message = refusal(tmp_path, record)
    assert message.startswith(f"{path}:line 2: field {field!r}: every response starts with the prompt text")
    assert "without 'prompt'" in message
    # the same data without "prompt" is the implicit form, and reads as the canonical pair
    if "chosen" in record:
        implicit = {k: record[k] for k in ("chosen", "rejected")}
        canon = {"prompt": CANON, "chosen": " 5", "rejected": " 6"}
        (a, b), _ = load_records(write(tmp_path, [implicit, canon], "ok.jsonl"))
        assert same(a) == same(b)


def test_one_response_starting_with_the_prompt_is_data(tmp_path):
    (r,), _ = load_records(write(tmp_path, [{"prompt": "Yes", "chosen": "Yes, 5", "rejected": "No"}]))
    assert r.responses == ["Yes, 5", "No"]


@pytest.mark.parametrize("prompt, chosen, rejected", [
    ("Q", "Quick", "Quiet"), ("Hello", "Hello! How can I help?", "Hello."), ("Hi", "Hi", "Hi there")])
def test_responses_that_start_like_a_plain_prompt_are_data(tmp_path, prompt, chosen, rejected):
    """Only after an HH prompt is a response that starts with it a transcript: a greeting is not."""
    (r,), _ = load_records(write(tmp_path, [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]))
    assert r.responses == [chosen, rejected]


def test_a_human_tag_after_a_plain_prompt_is_content(tmp_path):
    """A plain prompt's response is one answer: a dialogue it writes is text, not a Human turn."""
    chosen = "Sure:\n\nHuman: hi\n\nAssistant: hello"
    (r,), _ = load_records(write(tmp_path, [{"prompt": "Write a dialogue.", "chosen": chosen, "rejected": "No."}]))
    assert r.responses == [chosen, "No."]


# ---- S7: a response that holds a Human turn ------------------------------------------------------

def test_a_human_turn_in_a_response_is_dropped_in_either_layout(tmp_path):
    tail = " 6\n\nHuman: and 4?"
    explicit = {"prompt": CANON, "chosen": " 5", "rejected": tail}
    implicit = {"chosen": CANON + " 5", "rejected": CANON + tail}
    outcomes = []
    for i, record in enumerate([explicit, implicit]):
        records, stats = load_records(write(tmp_path, [record], f"{i}.jsonl"))
        outcomes.append((len(records), dict(stats.dropped)))
    assert outcomes[0] == outcomes[1] == (0, {"ends_with_human": 1})


# ---- T1: numbers beyond float32 ------------------------------------------------------------------

@pytest.mark.parametrize("record, field", [
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1e39}, "margin"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": -3.5e38}, "margin"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2.0 ** 128 - 2.0 ** 103}, "margin"),  # to inf
])
def test_a_number_that_is_inf_in_float32_is_refused(tmp_path, record, field):
    path, message = refusal(tmp_path, record)
    assert message.startswith(f"{path}:line 2: field {field!r}: must be finite in float32")


def test_scores_only_order_responses_so_any_finite_one_is_data(tmp_path):
    (r,), _ = load_records(write(tmp_path, [{"prompt": "p", "responses": ["a", "b"], "scores": [0.5, 1e39]}]))
    assert r.pairs == [(1, 0)]


def test_the_largest_float32_is_a_margin(tmp_path):
    (r,), _ = load_records(write(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b",
                                             "margin": 3.4028234663852886e38}]))
    assert r.margin == [3.4028234663852886e38]


# ---- U2, U4: files that cannot be read at all -----------------------------------------------------

def test_a_json_list_with_a_syntax_error_names_its_line(tmp_path):
    items = [{"prompt": f"Q{i}", "chosen": "a", "rejected": "b"} for i in range(4)]
    text = json.dumps(items, indent=2)
    lines = text.split("\n")
    bad = next(i for i, line in enumerate(lines) if '"Q2"' in line)
    lines[bad] = lines[bad].rstrip(",")                      # a missing comma after "prompt": "Q2"
    path = tmp_path / "list.json"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=rf"^{path}:line {bad + 2}: not valid JSON \(Expecting ','"):
        load_records(str(path))
    _, stats = load_records(str(path), skip_bad=True)        # read as JSONL, each line counted
    assert stats.errors[0].startswith(f"{path}:line {bad + 2}: ")
    assert stats.n_read == len([line for line in lines if line.strip()])
    path.write_text(text)
    assert [r.prompt for r in load_records(str(path))[0]] == ["Q0", "Q1", "Q2", "Q3"]


def test_jsonl_lines_that_are_lists_are_still_jsonl(tmp_path):
    path = write(tmp_path, ['["a"]', '{"prompt": "p", "chosen": "a", "rejected": "b"}', "[1,"])
    records, stats = load_records(path, skip_bad=True)
    assert (len(records), stats.n_read, stats.n_skipped) == (1, 3, 2)
    assert [e.split(": ")[0] for e in stats.errors] == [f"{path}:line 1", f"{path}:line 3"]


@pytest.mark.parametrize("encoding, name", [("utf-16-le", "UTF-16-LE"), ("utf-16-be", "UTF-16-BE"),
                                            ("utf-32-le", "UTF-32-LE"), ("utf-32-be", "UTF-32-BE")])
@pytest.mark.parametrize("gz", [False, True])
def test_a_utf16_file_is_refused_by_name(tmp_path, encoding, name, gz):
    raw = "\ufeff" + json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
    path = tmp_path / "u16.jsonl"
    path.write_bytes(gzip.compress(raw.encode(encoding)) if gz else raw.encode(encoding))
    for skip_bad in (False, True):
        with pytest.raises(DataError, match=rf"^{path}: {name} text .*save it as UTF-8$"):
            load_records(str(path), skip_bad=skip_bad)


# ---- U3: one JSON object over many lines ----------------------------------------------------------

PAIRS = [{"prompt": f"Q{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
EXPECTED = "expected JSONL (one record per line) or a JSON list of records"


@pytest.mark.parametrize("text, problem", [
    (json.dumps(PAIRS[0], indent=2), f"one JSON object over many lines; {EXPECTED}"),
    (json.dumps({"data": PAIRS}, indent=2),
     f'one JSON object over many lines; {EXPECTED}: the records seem to be under "data": give that list'),
    (json.dumps({"version": 2, "rows": PAIRS}, indent=1),
     f'one JSON object over many lines; {EXPECTED}: the records seem to be under "rows": give that list'),
    ("".join(json.dumps(p, indent=2) + "\n" for p in PAIRS),                       # `jq .` of a JSONL file
     f"JSON objects over many lines (pretty-printed); {EXPECTED}"),
], ids=["object", "wrapper", "wrapper-with-metadata", "jq"])
@pytest.mark.parametrize("gz", [False, True])
def test_a_pretty_printed_object_is_one_line_naming_the_file(tmp_path, text, problem, gz):
    path = tmp_path / "obj.json"
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    for skip_bad in (False, True):                    # the file, not a line: --skip-bad cannot skip it
        with pytest.raises(DataError) as info:
            load_records(str(path), skip_bad=skip_bad)
        assert str(info.value) == f"{path}: {problem}"
    # what the message asks for, the list, reads as the JSONL of the same records
    path.write_text(json.dumps(PAIRS, indent=2))
    jsonl = write(tmp_path, PAIRS)
    assert [same(r) for r in load_records(str(path))[0]] == [same(r) for r in load_records(jsonl)[0]]


def test_records_wrapped_on_one_line_name_their_key(tmp_path):
    path, message = refusal(tmp_path, {"data": PAIRS})
    assert message == f"{path}:line 2: field 'data': a list of records, not a record: give that list"


@pytest.mark.parametrize("record", [
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},     # ShareGPT
    {"instruction": "hi", "completions": [{"model": "x", "response": "a"}]}])                # UltraFeedback
def test_lists_of_objects_that_are_not_records_are_not_called_wrapped_records(tmp_path, record):
    path, message = refusal(tmp_path, record)
    assert message.startswith(f"{path}:line 2: field 'chosen': missing")


def test_a_jsonl_record_broken_over_two_lines_is_still_jsonl(tmp_path):
    """A record split by a stray newline is two bad lines (skippable), not a file-wide refusal."""
    path = write(tmp_path, ['{"prompt": "p",', '"chosen": "a", "rejected": "b"}', PAIRS[0]])
    records, stats = load_records(path, skip_bad=True)
    assert (len(records), stats.n_read, stats.n_skipped) == (1, 3, 2)
    assert stats.errors[0].startswith(f"{path}:line 1: not valid JSON")


# ---- U5a: responses given twice, messages with more than role and content ------------------------

@pytest.mark.parametrize("record, other", [
    ({"prompt": "p", "response": "a", "responses": ["b", "c"], "ranking": [0, 1]}, "responses"),
    ({"prompt": "p", "response": "a", "chosen": "b", "rejected": "c"}, "chosen"),
    ({"response": "a", "chosen": CANON + " b", "rejected": CANON + " c"}, "chosen"),
])
def test_response_beside_other_responses_is_refused(tmp_path, record, other):
    path, message = refusal(tmp_path, record)
    assert message == (f"{path}:line 2: field 'response': "
                       f"beside {other!r}, which alone would be read: keep one")


def test_response_beside_responses_is_refused_in_scores_form_too():
    from data.records import parse_record
    with pytest.raises(DataError) as info:
        parse_record({"prompt": "p", "response": "a", "responses": ["b", "c"]}, "f:line 3", unranked=True)
    assert str(info.value) == ("f:line 3: field 'response': beside 'responses', which alone would be read: "
                               "keep one")


@pytest.mark.parametrize("value", [["a", "b"], ["a"]])
def test_several_responses_in_response_say_where_they_go(value):
    from data.records import parse_record
    with pytest.raises(DataError) as info:
        parse_record({"prompt": "p", "response": value}, "f:line 3", unranked=True)
    assert str(info.value) == (f"f:line 3: field 'response': expected a string or one assistant message, got "
                               f"{value!r}; several responses go in 'responses'")


RENDERED = "only role and content are read, and a chat template would show this in the turn: " \
           "fold it into content or drop it"


@pytest.mark.parametrize("record, field", [
    ({"prompt": [MESSAGES[0], {**MESSAGES[1], "tool_calls": [{"id": "1", "type": "function"}]}, MESSAGES[2]],
      "chosen": "5", "rejected": "6"}, "prompt[1].tool_calls"),
    ({"prompt": MESSAGES, "chosen": [{"role": "assistant", "content": "5", "reasoning_content": "2+3"}],
      "rejected": "6"}, "chosen[0].reasoning_content"),
    ({"chosen": MESSAGES + [{"role": "assistant", "content": "5"}],
      "rejected": MESSAGES + [{"role": "assistant", "content": "", "function_call": {"name": "add"}}]},
     "rejected[3].function_call"),
])
def test_message_keys_a_template_would_render_are_refused(tmp_path, record, field):
    path, message = refusal(tmp_path, record)
    assert message == f"{path}:line 2: field {field!r}: {RENDERED}"


def test_message_keys_no_template_renders_are_ignored(tmp_path):
    """OpenAI-style "name", and "tool_calls": null as API exports write it, change no text here."""
    extra = {"name": "bob", "tool_calls": None, "function_call": None, "weight": 0}
    layouts = [{"prompt": MESSAGES, "chosen": "5", "rejected": "6"},
               {"prompt": [{**m, **extra} for m in MESSAGES], "chosen": [{"role": "assistant", "content": "5",
                                                                        **extra}], "rejected": "6"}]
    (a, b), _ = load_records(write(tmp_path, layouts))
    assert same(a) == same(b)
