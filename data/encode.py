"""Tokenization and the length policy: PrefRecord -> EncodedPrompt.

A sequence is BOS + prompt + response + EOS (BOS only where the tokenizer says to add it), and
the reward is read at the EOS. The prompt and each response are tokenized *separately* and the
ids concatenated, in every layout, so that all responses to a prompt share exactly the same
prompt tokens (tokenizing the joined text could merge pieces across the boundary differently
for each response).

Keep the end. When BOS + prompt + response + EOS is longer than `max_len`:
  1. a response that does not fit even with an empty prompt (BOS + len + EOS > max_len) is
     dropped, with the pairs it is in (a pair, or that response of a ranking);
  2. the prompt loses tokens from its *start*, once per prompt, sized for its longest
     remaining response, so that every response keeps its end and its EOS and all
     responses still share one prompt;
  3. a response left in no pair is dropped, and a prompt left with no pair is dropped.
For scoring (score.py), `long_responses="keep_end"` replaces step 1: a response that does not
fit alone keeps its last max_len − BOS tokens (its EOS included) after an empty prompt, and is
counted, so that every response gets a score and the cut ones are flagged.
Remaining pairs keep their weights (a ranking that loses a response keeps 1/C(K,2) per
remaining pair). Everything cut is counted in EncodeStats.

With `chat` (a data.chat.ChatFormat), records are encoded from their turns in the checkpoint's
chat format instead of HH text (ChatFormat.encode_answers): each response ends with the template's
end-of-turn token, where the reward is read, and BOS is only what the template writes. The same
policy applies.
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from .records import MARGIN_MODES, DataError, PrefRecord, margins_for, record_turns


@dataclass
class EncodedPrompt:
    prompt_ids: List[int]            # BOS + prompt tokens (after keep-the-end truncation)
    response_ids: List[List[int]]    # each: response tokens + EOS
    pairs: List[Tuple[int, int]]     # (chosen, rejected) into response_ids
    pair_weight: List[float]
    margin: List[float]              # resolved by margin_mode
    rating: List[Optional[str]]
    is_safety: bool = False
    category: Optional[str] = None
    source: Optional[str] = None
    index: int = 0                   # position of the record in encode_records' input
    response_index: List[int] = field(default_factory=list)  # each kept response's index in the record
    n_prompt_tokens_cut: int = 0     # tokens removed from the start of the prompt
    response_tokens_cut: List[int] = field(default_factory=list)  # per kept response ("keep_end")

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    @property
    def padded_tokens(self) -> int:
        """Tokens of this prompt's rows in the padded layout, before padding."""
        return sum(len(self.prompt_ids) + len(r) for r in self.response_ids)

    @property
    def packed_tokens(self) -> int:
        """Tokens of this prompt in the packed layout if it fits one row: prompt once + responses."""
        return len(self.prompt_ids) + sum(len(r) for r in self.response_ids)


@dataclass
class EncodeStats:
    n_prompts: int = 0
    n_prompts_kept: int = 0
    n_pairs: int = 0
    n_pairs_kept: int = 0
    n_responses_too_long: int = 0    # responses that alone exceed max_len (dropped)
    n_responses_cut: int = 0         # ... or, with long_responses="keep_end", cut at their start
    n_prompts_truncated: int = 0
    n_prompt_tokens_cut: int = 0
    max_len: int = 0

    def summary(self) -> str:
        cut = f", {self.n_responses_cut} responses cut at their start" if self.n_responses_cut else ""
        return (f"encoded {self.n_prompts_kept}/{self.n_prompts} prompts, {self.n_pairs_kept}/{self.n_pairs} "
                f"pairs at max_len {self.max_len}: {self.n_responses_too_long} responses too long (dropped "
                f"with {self.n_pairs - self.n_pairs_kept} pairs, "
                f"{self.n_prompts - self.n_prompts_kept} prompts left empty), "
                f"{self.n_prompts_truncated} prompts cut at the start "
                f"({self.n_prompt_tokens_cut} tokens){cut}")


def record_ids(record: PrefRecord, tokenizer, chat=None) -> Tuple[List[int], List[int], List[List[int]]]:
    """(lead, prompt, responses) ids of a record, each response through its EOS (in a chat format,
    the template's end-of-turn token). The lead is split_lead's BOS, which truncation never cuts."""
    if chat is None:
        return list(tokenizer.bos_prefix), tokenizer.encode(record.prompt), [
            tokenizer.encode(r) + [tokenizer.eos_id] for r in record.responses]
    prompt, responses = chat.encode_record(record)
    return (*split_lead(prompt, tokenizer), responses)


def split_lead(ids: List[int], tokenizer) -> Tuple[List[int], List[int]]:
    """(lead, rest) of a chat-rendered prompt: the lead is BOS where the checkpoint starts sequences
    with it and the template wrote it, which keep-the-end truncation never cuts."""
    bos = list(tokenizer.bos_prefix)
    lead = bos if bos and ids[:len(bos)] == bos else []
    return lead, ids[len(lead):]


def sampling_prompt(record: PrefRecord, tokenizer, budget: int, chat=None) -> List[int]:
    """The ids a policy continues to answer `record`, as the reward models read its prompt: in a
    chat format the template's prompt with its generation prompt, else BOS + the HH text. Keeps
    BOS and the prompt's last tokens within `budget` (the rest of max_len is the answer's)."""
    if chat is None:
        lead, rest = list(tokenizer.bos_prefix), tokenizer.encode(record.prompt)
    else:
        lead, rest = split_lead(chat.encode(record_turns(record)[0], add_generation_prompt=True), tokenizer)
    keep = max(0, budget - len(lead))
    ids = lead + (rest[-keep:] if keep else [])
    if not ids:
        raise DataError(record.origin or "a record", "prompt", "empty, and the tokenizer adds no BOS: "
                        "a policy has nothing to continue")
    return ids


def encode_records(records: Sequence[PrefRecord], tokenizer, max_len: int, margin_mode: str = "auto",
                   long_responses: str = "drop", chat=None) -> Tuple[List[EncodedPrompt], EncodeStats]:
    """Tokenizes records under the length policy above. `tokenizer` needs encode/bos_prefix/eos_id;
    `chat`, a data.chat.ChatFormat of that tokenizer, encodes records in its chat format."""
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 3:
        raise ValueError(f"max_len must be an int >= 3 (BOS, a token, EOS), got {max_len!r}")
    if margin_mode not in MARGIN_MODES:
        raise ValueError(f"margin_mode must be one of {MARGIN_MODES}, got {margin_mode!r}")
    if long_responses not in ("drop", "keep_end"):
        raise ValueError(f"long_responses must be 'drop' or 'keep_end', got {long_responses!r}")
    stats = EncodeStats(max_len=max_len)
    encoded = []
    for index, record in enumerate(records):
        stats.n_prompts += 1
        stats.n_pairs += len(record.pairs)
        bos, prompt, responses = record_ids(record, tokenizer, chat)     # bos: [BOS] or []
        room = max_len - len(bos)                     # the most a response can keep, EOS included
        cut = [max(0, len(r) - room) for r in responses]
        if long_responses == "keep_end":
            responses = [r[c:] for r, c in zip(responses, cut)]
            stats.n_responses_cut += sum(c > 0 for c in cut)
        fits = [len(r) <= room for r in responses]
        stats.n_responses_too_long += fits.count(False)
        keep_pairs = [p for p, (c, r) in enumerate(record.pairs) if fits[c] and fits[r]]
        if not keep_pairs:
            continue
        # Renumber the responses that are still in some pair.
        used = sorted({i for p in keep_pairs for i in record.pairs[p]})
        new_id = {old: new for new, old in enumerate(used)}
        responses = [responses[i] for i in used]
        budget = max_len - len(bos) - max(len(r) for r in responses)   # room for the prompt after BOS
        n_cut = max(0, len(prompt) - budget)
        if n_cut:
            prompt = prompt[n_cut:]
            stats.n_prompts_truncated += 1
            stats.n_prompt_tokens_cut += n_cut
        margins = margins_for(record, margin_mode)
        encoded.append(EncodedPrompt(
            prompt_ids=bos + prompt,
            response_ids=responses,
            pairs=[(new_id[record.pairs[p][0]], new_id[record.pairs[p][1]]) for p in keep_pairs],
            pair_weight=[float(record.pair_weight[p]) for p in keep_pairs],
            margin=[margins[p] for p in keep_pairs],
            rating=[record.rating[p] for p in keep_pairs],
            is_safety=record.is_safety, category=record.category, source=record.source,
            index=index, response_index=used, n_prompt_tokens_cut=n_cut,
            response_tokens_cut=[cut[i] if long_responses == "keep_end" else 0 for i in used]))
        stats.n_prompts_kept += 1
        stats.n_pairs_kept += len(keep_pairs)
    return encoded, stats


# -----------------------------------------------------------------------------------------
# Lengths that fit the data. A sequence is BOS + prompt + response + EOS; a pair is lost to
# the length policy only when one of its responses does not fit alone (a long prompt just
# loses its start), so the two numbers that matter are the length that keeps most sequences
# whole and the share of pairs a given length drops.

@dataclass
class LengthCheck:
    max_len: int             # the length checked
    keep_len: int            # the smallest multiple of 8 keeping `keep` of the sequences whole
    keep: float              # e.g. 0.98
    keep_len_whole: float    # the share keep_len keeps whole: below `keep` where `cap` bounds keep_len
    n_sequences: int         # (prompt, response) sequences
    n_whole: int             # sequences that fit max_len without a cut
    n_pairs: int
    n_pairs_dropped: int     # pairs with a response that does not fit max_len alone

    @property
    def drop_fraction(self) -> float:
        return self.n_pairs_dropped / max(self.n_pairs, 1)

    def summary(self) -> str:
        return (f"max_len {self.max_len} keeps {self.n_whole}/{self.n_sequences} sequences whole and drops "
                f"{self.n_pairs_dropped}/{self.n_pairs} pairs ({100 * self.drop_fraction:.1f}%) "
                f"whose response alone is longer; --max-len {self.keep_len} keeps "
                f"{100 * self.keep_len_whole:.0f}% whole")


def check_lengths(records: Sequence[PrefRecord], tokenizer, max_len: int = 0, keep: float = 0.98,
                  cap: int = 0, chat=None, floor: int = 0) -> LengthCheck:
    """The length profile of `records` under `tokenizer` (and `chat`, as encode_records); `max_len`
    0 checks `keep_len` itself, raised to `floor`. `cap` (0: none) bounds keep_len, e.g. by the
    model's position limit."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    seq_lens, pairs = [], []        # pairs: (longest response of the pair + BOS + EOS) per pair
    for record in records:
        lead, prompt, responses = record_ids(record, tokenizer, chat)
        alone = [len(lead) + len(r) for r in responses]
        seq_lens += [a + len(prompt) for a in alone]
        pairs += [max(alone[c], alone[r]) for c, r in record.pairs]
    if not seq_lens:
        raise ValueError("check_lengths: no sequences (no records)")
    seq_lens.sort()
    need = seq_lens[max(0, math.ceil(keep * len(seq_lens)) - 1)]     # the keep-quantile
    keep_len = -(-need // 8) * 8
    if cap:
        keep_len = min(keep_len, cap)
    max_len = max_len or max(keep_len, floor)
    whole_at_keep = sum(n <= keep_len for n in seq_lens) / len(seq_lens)
    return LengthCheck(max_len=max_len, keep_len=keep_len, keep=keep, keep_len_whole=whole_at_keep,
                       n_sequences=len(seq_lens),
                       n_whole=sum(n <= max_len for n in seq_lens), n_pairs=len(pairs),
                       n_pairs_dropped=sum(n > max_len for n in pairs))


# Dropping data must be loud: above DROP_WARN of the pairs a run warns at its top, above
# DROP_STOP it stops before training unless the user accepts the loss (train.py --accept-drops).
DROP_WARN, DROP_STOP = 0.05, 0.20


def length_verdict(check: LengthCheck, accept_drops: bool = False) -> Tuple[str, str]:
    """("ok" | "warn" | "stop", one line saying why) for a LengthCheck."""
    if check.drop_fraction <= DROP_WARN:
        return "ok", check.summary()
    line = (f"--max-len {check.max_len} drops {check.n_pairs_dropped} of {check.n_pairs} pairs "
            f"({100 * check.drop_fraction:.1f}%) whose response alone is longer; --max-len {check.keep_len} "
            f"keeps {100 * check.keep_len_whole:.0f}% of the sequences whole")
    if check.drop_fraction > DROP_STOP and not accept_drops:
        return "stop", f"{line}: pass it, or --accept-drops to train on what is left"
    return "warn", line


def fit_max_len(records: Sequence[PrefRecord], tokenizer, max_len: int = 0, accept_drops: bool = False,
                cap: int = 1024, floor: int = 8, keep: float = 0.98, chat=None) -> dict:
    """train.py's lengths. `max_len` 0 becomes check_lengths' keep_len (at most `cap`, at least
    `floor`); then length_verdict on the pairs it drops: a stop raises DataError (one line), a
    warning is returned. The dict is what report.json records."""
    check = check_lengths(records, tokenizer, max_len, keep, cap=cap, chat=chat, floor=floor)
    verdict, line = length_verdict(check, accept_drops)
    if verdict == "stop":
        raise DataError("--data", None, line)
    return {"max_len": check.max_len,
            "chosen": "given" if max_len else "from the data",
            "keep_len": check.keep_len, "n_pairs": check.n_pairs, "n_pairs_dropped": check.n_pairs_dropped,
            "summary": check.summary(), "warning": line if verdict == "warn" else None}
