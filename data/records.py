"""Preference records: one type for pairs, HH transcripts, K-way rankings and conversations.

Every input format becomes a `PrefRecord`: one prompt, its responses, and the preference
pairs (chosen, rejected) between them. The format is detected per record (per JSON object):

  {"prompt", "chosen", "rejected", ...}   explicit pair (TRL). Optional "margin" (float),
                                          "rating" (a Llama 2 label), "is_safety", "category", "source".
  {"chosen", "rejected"}                  implicit pair: two full transcripts (Anthropic HH-RLHF)
                                          split at the last "\\n\\nAssistant:", or two message
                                          lists (TRL's implicit conversational form) split
                                          before the last message.
  {"prompt", "responses", "ranking"}      K-way ranking, indices best first, or
  {"prompt", "responses", "scores"}       one score per response, higher is better.

`prompt` may be a string or a conversation (a list of {"role", "content"} messages). A
conversation is rendered with one template, HH's, so that a conversation and the HH
transcript of the same dialogue become the same text:

    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
     {"role": "user", "content": "Sum 2 3"}]
    ->  "\\n\\nHuman: Hi\\n\\nAssistant: Hello\\n\\nHuman: Sum 2 3\\n\\nAssistant:"

and a response `c` to a conversation prompt is the text " " + c (the space after "Assistant:"),
exactly what splitting the transcript "...\\n\\nAssistant: c" gives. With a string prompt,
responses are taken verbatim (prompt + response is the full text, as in TRL). A string HH
prompt is read as that split: "...\\n\\nAssistant: " leaves its space to the responses, a
transcript stripped of its leading "\\n\\n" ("Human: Hi\\n\\nAssistant:") gets it back (_prompt,
_unstripped), and responses that all start with it would repeat it, and are refused. A response may
also be a one-message list [{"role": "assistant", "content": c}], read as " " + c; after a
string prompt, a record's responses are all strings or all such lists.
Roles: "user"/"human" -> "Human", "assistant" -> "Assistant", "system" -> "System". A message is its
role and content: keys no template here shows ("name") are ignored, those a chat template shows as
text of the turn (RENDERED_KEYS: "tool_calls", ...) are refused, as they would be lost.

Records also keep their turns, for a checkpoint's own chat template (data/chat.py): `prompt_turns`
is the dialogue before the responses as (role, content) with chat roles ("system", "user",
"assistant"), and `response_contents` the assistant message of each response. A conversation
gives its own messages ("human" -> "user"); a string prompt that ends with "\n\nAssistant:" is
an HH transcript, split at its tags (hh_turns); any other string prompt is one user turn, and
it and its responses are verbatim. So a conversation and the HH transcript of the same dialogue have
the same turns, as they have the same text. Content is never stripped beyond the one space
after a tag; a blank response is "" here too. Records built in code get turns from `record_turns`.

Rules for pairs:
- Pair weight: 1 for a pair; 1/C(K,2) for each pair of a K-way ranking (InstructGPT counts
  a prompt's comparisons as one unit). Equal scores form no pair, and the prompt keeps
  1/C(K,2) per remaining pair, so ties lower that prompt's total weight.
- Dropped and counted, not errors: an implicit pair whose two prompts differ
  ("prefix_mismatch"), an HH transcript whose last turn is the Human's, or, the same text, a
  string response with "\\n\\nHuman:" after an HH prompt ("ends_with_human": the response would
  hold a Human turn), a pair whose responses are identical ("identical"), a ranking left with no pair
  ("no_pairs"), a ranking that puts one text both above and below another (a repeated response
  ranked apart: "contradictory").
- An empty response (present, but blank: "", "  ", an empty final turn) is data, the same in
  every format: it becomes "" and encodes as EOS alone. HH-RLHF has 11 empty final turns in
  its test splits (in harmless-base the silent answer was preferred 4 times, in helpful-* it
  was rejected 7 times), and TRL's explicit format writes them as "chosen": "". Two empty
  responses are an identical pair (dropped and counted). They are counted in `LoadStats.n_empty_responses`.

Files are read by data/jsonfile.py (JSONL, gzipped or not, or one JSON list; "-" is stdin). A
malformed record raises `DataError` naming the file, the line and the field; with `skip_bad=True`
it is counted and skipped instead. Blank lines are not records. Malformed too: "response" (score.py's
one response) beside "responses" or "chosen"/"rejected", and records wrapped as {"data": [records]}.
Invariant: `n_kept + sum(dropped.values()) + n_skipped == n_read`.

A per-file `tag` (e.g. "safety" for `safety=PATH` on the command line) sets `source` to the
tag and `is_safety` to `tag in SAFETY_TAGS` for every record of that file.
"""
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from .jsonfile import DataError, RepeatedKey, iter_json_values, wrapped_records

ASSISTANT_TAG = "\n\nAssistant:"
ROLE_TAGS = {"user": "\n\nHuman:", "human": "\n\nHuman:", "assistant": "\n\nAssistant:",
             "system": "\n\nSystem:"}
# HH's own tags -> chat roles (what chat templates expect); "\n\nSystem:" too, so that hh_turns
# undoes render_conversation (HH itself has no system turns).
HH_ROLES = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant", "\n\nSystem:": "system"}
CHAT_ROLES = {role: HH_ROLES[tag] for role, tag in ROLE_TAGS.items()}   # a message's role -> chat role
_HH_TAG = re.compile("(" + "|".join(map(re.escape, HH_ROLES)) + ")")
_BARE_TAG = re.compile("|".join(re.escape(tag[2:]) for tag in HH_ROLES))   # "Human:" etc. without "\n\n"

# Llama 2 (Touvron et al. 2023, §3.2.2; two variants in its appendix): the margin m(r) in the
# ranking loss -log sigmoid(r_c - r_r - m(r)), by the annotator's rating of how much better `chosen` is.
RATINGS = ("significantly better", "better", "slightly better", "negligibly better", "unsure")
RATING_MARGINS = {
    "small": {"significantly better": 1.0, "better": 2.0 / 3.0, "slightly better": 1.0 / 3.0,
              "negligibly better": 0.0, "unsure": 0.0},
    "large": {"significantly better": 3.0, "better": 2.0, "slightly better": 1.0,
              "negligibly better": 0.0, "unsure": 0.0},
}
# "auto": the record's margin, else its rating through the small table, else 0.
# "none": 0.  "small"/"large": the rating through that table (0 without a rating; a margin
# field is ignored).  "field": the record's margin only (0 without one).
MARGIN_MODES = ("auto", "none", "small", "large", "field")
SAFETY_TAGS = ("safety", "harmless")
# Message keys a chat template shows as text of the turn: the turn would lose it (module docstring)
RENDERED_KEYS = ("tool_calls", "function_call", "reasoning_content")
# float32, the loss's dtype for margins, rounds |x| from here up to inf (its max 2^128 - 2^104, plus
# half a step); a sum of large margins may still overflow, and train.py stops on it in one line
_FLOAT32_INF = 2.0 ** 128 - 2.0 ** 103
MAX_ERRORS = 20                   # LoadStats keeps the first messages of this many skipped records


@dataclass
class PrefRecord:
    prompt: str
    responses: List[str]
    pairs: List[Tuple[int, int]]          # (chosen, rejected) indices into responses
    pair_weight: List[float]              # per pair
    margin: List[Optional[float]]         # per pair, as given (None = not given)
    rating: List[Optional[str]]           # per pair, one of RATINGS or None
    is_safety: bool = False
    category: Optional[str] = None
    source: Optional[str] = None
    fields: dict = field(default_factory=dict)   # the input's keys that no rule above consumed
    origin: Optional[str] = None          # "FILE:line N", for messages and scoring output
    # The same dialogue as chat turns (see the module docstring); None for records built in code.
    prompt_turns: Optional[List[Tuple[str, str]]] = None   # (role, content), roles system/user/assistant
    response_contents: Optional[List[str]] = None          # per response, its assistant message

    @classmethod
    def pair(cls, prompt: str, chosen: str, rejected: str, margin: Optional[float] = None,
             rating: Optional[str] = None, **kw) -> "PrefRecord":
        return cls(prompt, [chosen, rejected], [(0, 1)], [1.0], [margin], [rating], **kw)


def margins_for(record: PrefRecord, mode: str = "auto") -> List[float]:
    """The margin of each pair of `record` under `mode` (see MARGIN_MODES)."""
    if mode not in MARGIN_MODES:
        raise ValueError(f"margin_mode must be one of {MARGIN_MODES}, got {mode!r}")
    out = []
    for margin, rating in zip(record.margin, record.rating):
        if mode in ("auto", "field") and margin is not None:       # in "auto", the field wins
            out.append(float(margin))
        elif mode in ("auto", "small", "large") and rating is not None:
            out.append(float(RATING_MARGINS["small" if mode == "auto" else mode][rating]))
        else:
            out.append(0.0)
    return out


# ---- conversations --------------------------------------------------------------------------

def render_conversation(messages, where: str = "<conversation>", field_name: str = "prompt") -> str:
    """A list of {"role", "content"} messages -> the HH-style prompt text ending in "Assistant:"."""
    if not isinstance(messages, list) or not messages:
        raise DataError(where, field_name, "must be a non-empty list of {role, content} messages")
    parts = []
    for i, msg in enumerate(messages):
        role, content = _message(msg, where, f"{field_name}[{i}]")
        parts.append(f"{ROLE_TAGS[role]} {content}")
    if role == "assistant":
        raise DataError(where, f"{field_name}[{len(messages) - 1}]",
                        "a prompt must not end with an assistant message")
    return "".join(parts) + ASSISTANT_TAG


def split_transcript(text: str, where: str, field_name: str) -> Tuple[str, str]:
    """HH transcript -> (prompt up to and including the last "\\n\\nAssistant:", final response)."""
    cut = text.rfind(ASSISTANT_TAG)
    if cut < 0:
        raise DataError(where, field_name, 'transcript has no "\\n\\nAssistant:" turn')
    cut += len(ASSISTANT_TAG)
    return text[:cut], text[cut:]


# ---- turns: the same dialogue for a chat template (data/chat.py) ---------------------------------

def _drop_space(text: str) -> str:
    """HH writes one space after "Human:" / "Assistant:"; it belongs to the tag, not the message."""
    return text[1:] if text.startswith(" ") else text


def hh_turns(text: str) -> List[Tuple[str, str]]:
    """An HH transcript -> [(role, content)], split at every "\n\nHuman:", "\n\nAssistant:" and
    "\n\nSystem:" (the tags render_conversation writes), each turn without the one space after its tag.

    "\n\nHuman: Hi\n\nAssistant: Hello" -> [("user", "Hi"), ("assistant", "Hello")]. Text before the
    first tag is a user turn of its own. Consecutive turns of one role stay as they are (HH has
    some); whether that is a valid conversation is the chat template's to say.
    """
    parts = _HH_TAG.split(text)          # [lead, tag, content, tag, content, ...]
    turns = [("user", parts[0])] if parts[0] else []
    return turns + [(HH_ROLES[tag], _drop_space(content)) for tag, content in zip(parts[1::2], parts[2::2])]


def text_turns(prompt: str, responses: Sequence[str]) -> Tuple[List[Tuple[str, str]], List[str]]:
    """(prompt turns, response contents) of a prompt given as text: an HH transcript if it ends
    in "\n\nAssistant:" (each response loses its leading space), else one user turn."""
    if prompt.endswith(ASSISTANT_TAG):
        return (hh_turns(prompt[: -len(ASSISTANT_TAG)]),
                [_response_text(_drop_space(r)) for r in responses])
    return [("user", prompt)], [_response_text(r) for r in responses]


def record_turns(record: "PrefRecord") -> Tuple[List[Tuple[str, str]], List[str]]:
    """The record's turns as loaded, or, for a record built in code (score.py, the built-in world),
    the turns of its text."""
    if record.prompt_turns is not None:
        return record.prompt_turns, record.response_contents
    return text_turns(record.prompt, record.responses)


def _fill_turns(record: "PrefRecord", obj: dict):
    """Sets the record's turns from its checked input `obj` (the rules of the module docstring):
    a conversation's own messages where it has them, else the turns of the record's text."""
    turns, contents = text_turns(record.prompt, record.responses)
    values = (obj["responses"] if "responses" in obj
              else [obj["chosen"], obj["rejected"]] if "chosen" in obj else [obj["response"]])
    if "prompt" in obj:
        messages = obj["prompt"] if isinstance(obj["prompt"], list) else None
    else:   # implicit: the prompt's messages from a message list if there is one
        messages = next((v[:-1] for v in values if isinstance(v, list)), None)
    # messages and their roles are checked: "human" -> "user"
    record.prompt_turns = ([(CHAT_ROLES[m["role"].lower()], m["content"]) for m in messages]
                           if messages is not None else turns)
    # a response given as messages: its final (assistant) message's content
    record.response_contents = [_response_text(v[-1]["content"]) if isinstance(v, list) else c
                                for v, c in zip(values, contents)]


# ---- field checks -----------------------------------------------------------------------------

def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(value, where, key) -> str:
    """A string field, checked to be real Unicode (JSON escapes can smuggle in lone surrogates)."""
    if not isinstance(value, str):
        raise DataError(where, key, f"expected a string, got {_kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(where, key, "not valid Unicode (lone surrogate)") from None
    return value


def _required(obj, key, where):
    if obj.get(key) is None:
        raise DataError(where, key, "missing")
    return obj[key]


def _optional_str(obj, key, where) -> Optional[str]:
    return None if obj.get(key) is None else _text(obj[key], where, key)


def _number(value, where, key, limit=math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(where, key, f"expected a number, got {_kind(value)}")
    try:
        value = float(value)
    except OverflowError:                           # an int beyond float's range
        raise DataError(where, key, f"must be finite, got an integer of {len(str(value))} digits") from None
    if not abs(value) < limit:                      # NaN fails too
        raise DataError(where, key, "must be finite" + ("" if limit == math.inf else " in float32 (|x| < "
                        "3.4e38)") + f", got {value}")
    return value


def _rating(obj, where) -> Optional[str]:
    rating = _optional_str(obj, "rating", where)
    if rating is None:
        return None
    norm = " ".join(rating.strip().lower().replace("_", " ").split())
    if norm not in RATINGS:
        raise DataError(where, "rating", f"must be one of {list(RATINGS)}, got {_short(rating)}")
    return norm


def _message(msg, where, key, assistant: bool = False) -> Tuple[str, str]:
    """(role, content) of a {role, content} message; with `assistant`, the role must be "assistant"."""
    if not isinstance(msg, dict):
        raise DataError(where, key, f"expected a {{role, content}} object, got {_kind(msg)}")
    if isinstance(msg, RepeatedKey):
        raise DataError(where, f"{key}.{msg.duplicate}", "appears twice in this message")
    role = msg.get("role")
    if not isinstance(role, str) or role.lower() not in ROLE_TAGS:
        raise DataError(where, f"{key}.role", f"must be one of {sorted(ROLE_TAGS)}, got {_short(role)}")
    if assistant and role.lower() != "assistant":
        raise DataError(where, f"{key}.role", f"must be 'assistant', got {_short(role.lower())}")
    rendered = next((k for k in RENDERED_KEYS if msg.get(k) not in (None, [], "")), None)
    if rendered:
        raise DataError(where, f"{key}.{rendered}", "only role and content are read, and a chat template "
                        "would show this in the turn: fold it into content or drop it")
    return role.lower(), _text(msg.get("content"), where, f"{key}.content")


def _response(value, where, key, lead: str) -> str:
    """A response given as a string, after `lead` (see _prompt), or as a one-message list
    [{"role": "assistant", ...}], after HH's space."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict):     # ["a", "b"]: several responses
            hint = ("; several responses go in 'responses'" if key == "response" else
                    "; whole conversations go without 'prompt' (the implicit form)" if len(value) > 1 else "")
            raise DataError(where, key, f"expected a string or one assistant message, got {_short(value)}"
                            + hint)
        _, text = _message(value[0], where, f"{key}[0]", assistant=True)
        lead = " "
    else:
        text = _text(value, where, key)
    return _response_text(lead + text)


def _responses(named, where, prompt: str, conversational: bool, lead: str) -> List[str]:
    """The responses [(field, value)] after `prompt`, as _prompt read it. After a string prompt a
    one-message list gets HH's space after "Assistant:" and a string does not, so there a mix would
    make two responses differ by that space alone: they must all be strings or all lists."""
    first, first_value = named[0]
    for name, value in named:
        if not conversational and isinstance(value, list) != isinstance(first_value, list):
            raise DataError(where, name, f"is {'a message list' if isinstance(value, list) else 'a string'} "
                            f"but {first} is not: give every response in one form")
    # prompt + response is the text: after an HH prompt, responses that start with it (stripped or
    # not) are full transcripts, and the dialogue would be read twice
    if not conversational and prompt.endswith(ASSISTANT_TAG) and all(
            isinstance(value, str) and _unstripped(value).startswith(prompt) for _, value in named):
        raise DataError(where, first, "every response starts with the prompt text, so the dialogue would be "
                        "read twice: give full transcripts without 'prompt' (the implicit form)")
    return [_response(value, where, name, lead) for name, value in named]


def _response_text(text: str) -> str:
    """A blank response is the empty response, in every format (see the module docstring)."""
    return text if text.strip() else ""


def _prompt(obj, where) -> Tuple[str, bool, str]:
    """(prompt text, whether it was a conversation, the text before each string response).

    A string HH prompt as people write it is the split of its full transcript: stripped
    ("Human: Hi\n\nAssistant:") it gets its leading "\n\n" back, and the space of
    "...\n\nAssistant: " goes to the responses, as split_transcript would cut prompt + response."""
    value = _required(obj, "prompt", where)
    if isinstance(value, list):
        return render_conversation(value, where, "prompt"), True, " "
    if not isinstance(value, str):
        raise DataError(where, "prompt", f"expected a string or a list of messages, got {_kind(value)}")
    text = _text(value, where, "prompt")
    body = text.rstrip(" ")
    if not body.endswith(ASSISTANT_TAG):           # not an HH transcript: verbatim
        return text, False, ""
    return _unstripped(body), False, text[len(body):]


def _unstripped(transcript: str) -> str:
    """An HH transcript stripped of its leading "\n\n" gets it back: "Human:" is then a tag
    (hh_turns), not text of a user turn, and the record is the canonical transcript's."""
    return "\n\n" + transcript if _BARE_TAG.match(transcript) else transcript


# ---- one JSON object -> one record ------------------------------------------------------------

class _Drop(Exception):
    """A well-formed record that carries no usable pair; `reason` names the count."""

    def __init__(self, reason: str):
        self.reason = reason


def _implicit(obj, where) -> Tuple[str, str, str]:
    """(prompt, chosen, rejected) from two HH transcripts or two message lists."""
    halves = []
    for key in ("chosen", "rejected"):
        value = _required(obj, key, where)
        if isinstance(value, list):
            if len(value) < 2:
                raise DataError(where, key,
                                "a conversation needs prompt messages and a final assistant message")
            _, content = _message(value[-1], where, f"{key}[{len(value) - 1}]", assistant=True)
            halves.append((render_conversation(value[:-1], where, key), _response_text(" " + content)))
        elif isinstance(value, str):
            prompt, response = split_transcript(_unstripped(_text(value, where, key)), where, key)
            if ROLE_TAGS["human"] in response:     # 2 HH-RLHF test lines: no final answer to compare
                raise _Drop("ends_with_human")
            halves.append((prompt, _response_text(response)))
        else:
            raise DataError(where, key, f"expected a transcript string or a message list, got {_kind(value)}")
    (prompt, chosen), (prompt_rejected, rejected) = halves
    if prompt != prompt_rejected:
        raise _Drop("prefix_mismatch")
    return prompt, chosen, rejected


def _ranking(obj, where, unranked: bool = False) -> PrefRecord:
    """A K-way ranking; with `unranked`, score.py's score-only forms, {"prompt", "response"} and
    {"prompt", "responses"} without a ranking: the responses and no pairs."""
    prompt, conversational, lead = _prompt(obj, where)
    if "responses" not in obj:
        response = _response(obj["response"], where, "response", lead)
        return PrefRecord(prompt, [response], [], [], [], [])
    responses = obj["responses"]
    fewest = 1 if unranked else 2
    if not isinstance(responses, list) or len(responses) < fewest:
        raise DataError(where, "responses", "expected a non-empty list of responses" if unranked
                        else "expected a list of at least 2 responses")
    responses = _responses([(f"responses[{i}]", r) for i, r in enumerate(responses)], where, prompt,
                           conversational, lead)
    if unranked:
        return PrefRecord(prompt, responses, [], [], [], [])
    K = len(responses)
    has_ranking, has_scores = obj.get("ranking") is not None, obj.get("scores") is not None
    if has_ranking == has_scores:
        raise DataError(where, "ranking", "give exactly one of 'ranking' (indices, best first) or 'scores'")
    if has_ranking:
        ranking = obj["ranking"]
        if (not isinstance(ranking, list)
                or any(isinstance(i, bool) or not isinstance(i, int) for i in ranking)
                or sorted(ranking) != list(range(K))):
            raise DataError(where, "ranking", f"must be a permutation of 0..{K - 1} (best first)")
        pairs = [(ranking[a], ranking[b]) for a in range(K) for b in range(a + 1, K)]
    else:
        scores = obj["scores"]
        if not isinstance(scores, list) or len(scores) != K:
            raise DataError(where, "scores", f"expected a list of {K} numbers, one per response")
        scores = [_number(s, where, f"scores[{i}]") for i, s in enumerate(scores)]
        pairs = [(i, j) if scores[i] > scores[j] else (j, i)
                 for i in range(K) for j in range(i + 1, K) if scores[i] != scores[j]]
    pairs = [(c, r) for c, r in pairs if responses[c] != responses[r]]
    said = {(responses[c], responses[r]) for c, r in pairs}
    if any((worse, better) in said for better, worse in said):   # a repeated text ranked apart: noise
        raise _Drop("contradictory")
    if not pairs:
        raise _Drop("no_pairs")
    weight = 1.0 / (K * (K - 1) // 2)
    return PrefRecord(prompt, responses, pairs, [weight] * len(pairs),
                      [None] * len(pairs), [None] * len(pairs))


def _foreign(obj, where, keys, owner: str, kind: str):
    stray = [k for k in keys if obj.get(k) is not None]
    if stray:
        raise DataError(where, stray[0], f"belongs to {owner}, not to {kind}")


CONSUMED = {"prompt", "chosen", "rejected", "responses", "ranking", "scores", "margin", "rating",
            "is_safety", "category", "source"}


def parse_record(obj, where: str, tag: Optional[str] = None, default_source: Optional[str] = None,
                 unranked: bool = False) -> PrefRecord:
    """One JSON value -> PrefRecord. Raises DataError (malformed) or _Drop (no usable pair).
    `unranked`: the value is one of score.py's score-only forms (see _ranking)."""
    if not isinstance(obj, dict):
        raise DataError(where, None, f"expected a JSON object, got {_kind(obj)}")
    if isinstance(obj, RepeatedKey):
        raise DataError(where, obj.duplicate, "appears twice in this object (JSON would keep the last)")
    pair, ranking = "a pair {prompt, chosen, rejected}", "a ranking {prompt, responses, ranking|scores}"
    given = [k for k in ("responses", "chosen", "rejected") if obj.get(k) is not None]
    if obj.get("response") is not None and given:       # else one would be read, the other dropped
        raise DataError(where, "response", f"beside {given[0]!r}, which alone would be read: keep one")
    if "responses" in obj or unranked:
        # a ranking's pairs come from its order, a pair's from chosen/rejected: the other's fields
        # would be dropped unread, so they are refused
        _foreign(obj, where, () if unranked else ("chosen", "rejected", "margin", "rating"), pair, ranking)
        record = _ranking(obj, where, unranked)
    else:
        if "chosen" in obj or "rejected" in obj:      # else the error is the missing pair
            _foreign(obj, where, ("ranking", "scores"), ranking, pair)
        if "prompt" in obj:
            prompt, conversational, lead = _prompt(obj, where)
            named = [(k, _required(obj, k, where)) for k in ("chosen", "rejected")]
            chosen, rejected = _responses(named, where, prompt, conversational, lead)
            hh = not conversational and prompt.endswith(ASSISTANT_TAG)    # as HH's implicit form (_implicit)
            if hh and any(isinstance(v, str) and ROLE_TAGS["human"] in v for _, v in named):
                raise _Drop("ends_with_human")
        elif "chosen" in obj or "rejected" in obj:
            prompt, chosen, rejected = _implicit(obj, where)
        elif key := wrapped_records(obj):        # {"data": [records]} on one line
            raise DataError(where, key, "a list of records, not a record: give that list")
        else:
            raise DataError(where, "chosen", "missing: expected {prompt, chosen, rejected}, "
                                             "{chosen, rejected} or {prompt, responses, ranking|scores}")
        margin = None if obj.get("margin") is None else _number(obj["margin"], where, "margin", _FLOAT32_INF)
        record = PrefRecord.pair(prompt, chosen, rejected, margin, _rating(obj, where))
        if chosen == rejected:
            raise _Drop("identical")
    is_safety = obj.get("is_safety")
    if is_safety is not None and not isinstance(is_safety, bool):
        raise DataError(where, "is_safety", f"expected true/false, got {_kind(is_safety)}")
    record.is_safety = bool(is_safety)
    record.category = _optional_str(obj, "category", where)
    record.source = _optional_str(obj, "source", where) or default_source
    if tag is not None:
        record.source, record.is_safety = tag, tag in SAFETY_TAGS
    record.fields = {k: v for k, v in obj.items() if k not in CONSUMED}
    record.origin = where
    _fill_turns(record, obj)
    return record


# ---- files ------------------------------------------------------------------------------------

@dataclass
class LoadStats:
    n_read: int = 0                 # records seen: non-blank JSONL lines or JSON-list items
    n_kept: int = 0
    dropped: Counter = field(default_factory=Counter)   # reason -> count
    n_skipped: int = 0              # malformed records skipped under skip_bad
    n_empty_responses: int = 0      # empty responses kept (they encode as EOS alone)
    errors: List[str] = field(default_factory=list)     # the first messages of skipped records

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        line = (f"read {self.n_read} records: kept {self.n_kept}, dropped {self.n_dropped} ({drops}), "
                f"skipped {self.n_skipped} malformed")
        if self.n_empty_responses:
            line += f"; {self.n_empty_responses} empty responses kept"
        return line


def _file_label(path: str) -> str:
    """"../hh-rlhf/harmless-base/test.jsonl.gz" -> "harmless-base/test": the default source."""
    if path == "-":
        return "stdin"
    name = os.path.basename(path)
    for ext in (".gz", ".jsonl", ".json"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return f"{parent}/{name}" if parent else name


def read_each(path: str, parse, stats: "LoadStats", skip_bad: bool):
    """Yields (value, parsed, problem) for every JSON value of `path`, in input order, counting
    into `stats`. parsed = parse(value, where), or None when there is a problem: "dropped:
    <reason>" (well-formed, but no usable pair) or, with skip_bad, the DataError's text (value is
    then None when the line was not even JSON). Without skip_bad a DataError is raised.

    The one read loop of the project: load_records and score.py's reader differ only in `parse`
    and in what they keep.
    """
    for where, value in iter_json_values(path):
        stats.n_read += 1
        try:
            if isinstance(value, DataError):
                raise value
            parsed = parse(value, where)
        except _Drop as drop:
            stats.dropped[drop.reason] += 1
            yield value, None, f"dropped: {drop.reason}"
        except DataError as e:
            if not skip_bad:
                raise
            stats.n_skipped += 1
            if len(stats.errors) < MAX_ERRORS:
                stats.errors.append(str(e))
            yield (None if isinstance(value, DataError) else value), None, str(e)
        else:
            stats.n_kept += 1
            yield value, parsed, None


def load_records(path_or_paths: Union[str, os.PathLike, Iterable], skip_bad: bool = False,
                 tag: Optional[str] = None) -> Tuple[List[PrefRecord], LoadStats]:
    """Reads one file, or several in order, into PrefRecords. See the module docstring."""
    paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    if not paths:
        raise ValueError("load_records: path_or_paths is empty")
    if tag is not None and (not isinstance(tag, str) or not tag):
        raise ValueError(f"load_records: tag must be a non-empty string, got {tag!r}")
    records, stats = [], LoadStats()
    for path in paths:
        path = os.fspath(path)
        if path != "-" and not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path}")
        label = tag or _file_label(path)
        for _, record, _ in read_each(path, lambda value, where: parse_record(value, where, tag, label),
                                            stats, skip_bad):
            if record is not None:
                stats.n_empty_responses += sum(r == "" for r in record.responses)
                records.append(record)
    return records, stats


def parse_data_spec(spec: str) -> Tuple[Optional[str], str]:
    """"safety=PATH" -> ("safety", PATH); "PATH" -> (None, PATH). For --data arguments.

    Only a short word before "=" counts as a tag, and never when the whole spec is a file.
    """
    head, sep, tail = spec.partition("=")
    if sep and head.isidentifier() and len(head) <= 32 and tail and not os.path.exists(spec):
        return head, tail
    return None, spec
