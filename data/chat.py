"""A checkpoint's own chat format: conversation turns -> token ids, through its Jinja chat template.

A pretrained chat model read its conversations in its own format, so a reward model started from
it reads pairs in that format too. For SmolLM2 (ChatML, with a default system prompt):

    encode_answers([("user", "Hi")], ["Hello"])
        shared prompt   <|im_start|>system\nYou are ...<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n
                        <|im_start|>assistant\n
        answers         [Hello<|im_end|>]

Rendering follows transformers' apply_chat_template: Jinja's ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks and loop controls; `raise_exception`; a `tojson` that does not escape
HTML; the variables messages, add_generation_prompt, bos_token, eos_token, unk_token (those the
tokenizer has), and tools = documents = None. A template that reads another named special token
(pad_token, sep_token, cls_token, mask_token, ...: transformers passes those tokenizer_config.json
names, which we do not read) is refused, and so is one that fails while rendering (an undefined
name, a type error): one line, not a traceback. Deliberately absent: `strftime_now` (a template
that finds it writes today's date, so the same data would encode differently from day to day;
Llama 3.2's falls back to a fixed date), and the `{% generation %}` tag (a template using it does
not compile here).

Special tokens come from the template, content is text (the rule of model/tokenizer.py): a user
who types "<|im_start|>" gets those characters, not the token. Each message content is rendered
as a sentinel first, so the rendered text is the template's own text with the contents at known
places. Special tokens (the tokenizer's added tokens) are recognised in the template's text only;
every stretch between two special tokens, template text and content together, is encoded as one
piece, literally, exactly as the tokenizer splits a whole text at its added tokens. The ids equal
transformers' `apply_chat_template(conversation, tokenize=True)`. Content holding special-token
text is encoded as the content alone would be; transformers' `sanitize_control_tokens=True` gives
the same special tokens and text, but also cuts the text at each forged token.

Content transforms. A template may write a message verbatim or trimmed (Llama 3's
`message['content'] | trim`; lstrip or rstrip alone too): the whitespace placed around each
sentinel shows which sides it stripped. Anything else that depends on the content (`| upper`,
`tojson`, cutting at "</think>", skipping an empty message, writing a message twice or never) is
refused with one line: every rendering is checked against the template's rendering of the real
content.

Prompt and answers. The prompt is the conversation before the answer with the generation prompt
(add_generation_prompt=True). An answer is what the template writes after that for the assistant
message, up to and including the first end-of-turn token (`tokenizer.eos_ids`) after the content.
The reward is read at the end-of-turn token: it is the token a policy emits to end its turn, so
it is the last token of a scored sequence, and what the template writes after it (ChatML's "\n")
is not part of the answer. The template must write the prompt as the start of the prompt + answer
conversation (ChatML and Llama 3 do); one that rewrites earlier turns once an answer follows
cannot share a prompt between answers, and is refused. Where the tokenizer would merge the shared
prompt with an answer, see encode_answers.

BOS comes only from the template (`bos_token`), as in transformers; data/encode.py keeps it at the
front under keep-the-end truncation where the checkpoint starts sequences with BOS.

Tokenizers: Hugging Face `tokenizers` (tokenizer.json, and GGUF BPE vocabularies) that encode the
text after a special token as they encode text on its own; one that does not (a prefix space
added only at the start, as Metaspace's prepend_scheme "first" does) is refused, and so is a
SentencePiece tokenizer: where implementations add its dummy-prefix space around special tokens
differs between them, and nothing here checks it against one. The same holds for a tokenizer.json
whose normalizer prepends that space (Prepend("▁"): Llama 2's, Mistral's and Zephyr's
conversions): tokenizers prepends it to every stretch between special tokens, transformers 5 reads
the same file as a Llama tokenizer that prepends it at the start of the text only (unless
tokenizer_config.json says legacy: true), so it is refused.
"""
import functools
import json
import re
from typing import List, Optional, Sequence, Tuple

import jinja2
import jinja2.meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .records import PrefRecord, record_turns

Turns = Sequence[Tuple[str, str]]      # (role, content), roles as the template expects them

# A content is rendered as _PAD_LEFT + "\ue000{i}\ue001" + _PAD_RIGHT first: private-use characters
# that no template writes, padded with whitespace so that a template that trims shows it.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PAD_LEFT, _PAD_RIGHT = " \n", "\n "


@functools.lru_cache(maxsize=4)
def chat_format_of(tokenizer) -> "ChatFormat":
    """ChatFormat(tokenizer), built once per tokenizer: building compiles and checks the template
    (4 ms for SmolLM2's), and train.py encodes every sampled prompt through it."""
    return ChatFormat(tokenizer)


class ChatTemplateError(ValueError):
    """A chat template we cannot follow, or one that refused a conversation (raise_exception)."""


def _raise_exception(message):
    raise ChatTemplateError(f"the chat template refuses this conversation: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, > and & for HTML; chat templates mean plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    """A chat template compiled the way transformers compiles it (module docstring)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile (template line {e.lineno}: "
                                f"{e.message})") from None


class ChatFormat:
    """Turns -> ids in a checkpoint's chat format. `tokenizer` is the checkpoint's HFTokenizer;
    `template` defaults to the chat template it carries."""

    def __init__(self, tokenizer, template: Optional[str] = None):
        where = getattr(tokenizer, "model_path", None) or "tokenizer"
        template = tokenizer.chat_template if template is None else template
        if not template:
            raise ChatTemplateError(f"{where}: has no chat template")
        if getattr(tokenizer, "kind", None) != "tokenizers":
            raise ChatTemplateError(f"{where}: chat templates are supported with Hugging Face tokenizers "
                                    "(tokenizer.json or a GGUF BPE vocabulary), not SentencePiece")
        self.tokenizer, self.template = tokenizer, template
        self._template = compile_template(template)
        added = tokenizer.tk.get_added_tokens_decoder()          # id -> AddedToken
        self._special_id = {t.content: i for i, t in added.items()}
        # lstrip/rstrip/single_word change what text a token takes with it; we match tokens exactly.
        self._unsupported = {t.content for t in added.values() if t.lstrip or t.rstrip or t.single_word}
        # Longest first, so that a token wins over a shorter one it contains; "(?!)" never matches.
        names = sorted(self._special_id, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, names)) or "(?!)")
        self.end_of_turn = set(tokenizer.eos_ids)
        # The special tokens the tokenizer has, under the names templates use; one it lacks stays
        # undefined (renders as ""), as in transformers. pad is left out: ours is never HF's (see
        # model/tokenizer.py), and templates do not write it.
        named = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id,
                 "unk_token": getattr(tokenizer, "unk_id", None)}
        self._variables = {name: tokenizer.tk.id_to_token(i) for name, i in named.items() if i is not None}
        self._variables.update(tools=None, documents=None)
        read = jinja2.meta.find_undeclared_variables(self._template.environment.parse(template))
        unread = sorted(name for name in read if name.endswith("_token") and name not in named)
        if unread:
            raise ChatTemplateError(f"the chat template reads {', '.join(unread)}, which transformers takes "
                                    "from tokenizer_config.json and rmlab does not read; not supported")
        self._check_stretches_encode_alone(where)

    def _check_stretches_encode_alone(self, where: str):
        """_encode encodes each stretch between special tokens on its own: refuses a tokenizer that
        encodes text after a special token differently from that text alone (module docstring), or
        whose normalizer prepends SentencePiece's dummy prefix to every stretch."""
        normalizer = self.tokenizer.tk.normalizer
        prefixed = normalizer.normalize_str("Hi") if normalizer is not None else "Hi"
        if prefixed != "Hi" and prefixed.endswith("Hi"):
            raise ChatTemplateError(f"{where}: its normalizer prepends {prefixed[:-2]!r} to the text after "
                                    "every special token, transformers 5 only at the start of the text (a "
                                    "Llama tokenizer, unless legacy: true): the ids differ between them; its "
                                    "chat format is not supported")
        probes = [(name, i) for name, i in self._special_id.items() if name not in self._unsupported]
        if not probes:
            return
        tk, (name, i) = self.tokenizer.tk, probes[0]
        literal, tk.encode_special_tokens = tk.encode_special_tokens, False   # the tokenizer's own splitting
        try:
            for text in ("Hello world", " Hi", "\nHi"):
                if tk.encode(name + text, add_special_tokens=False).ids != [i] + self.tokenizer.encode(text):
                    raise ChatTemplateError(f"{where}: encodes text after a special token differently from "
                                            "the same text alone (a prefix space at the start?); its chat "
                                            "format is not supported")
        finally:
            tk.encode_special_tokens = literal

    # ---- rendering ------------------------------------------------------------------------------

    def _render_text(self, turns: Turns, contents: Sequence[str], add_generation_prompt: bool) -> str:
        messages = [{"role": role, "content": content} for (role, _), content in zip(turns, contents)]
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._variables)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template fails on this conversation ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''})") from None

    def _render(self, turns: Turns, add_generation_prompt: bool) -> Tuple[str, List[Tuple[int, int]]]:
        """(rendered text, (start, end) of each message's content in it, in message order)."""
        marks = [f"{_OPEN}{i}{_CLOSE}" for i in range(len(turns))]
        marked = self._render_text(turns, [_PAD_LEFT + m + _PAD_RIGHT for m in marks], add_generation_prompt)
        found = []
        for i, mark in enumerate(marks):
            start = marked.find(mark)
            if start < 0 or marked.find(mark, start + 1) >= 0:
                how = "never writes" if start < 0 else "writes more than once"
                raise ChatTemplateError(
                    f"the chat template {how} the content of message {i} ({turns[i][0]}); "
                    "only templates that write each message once are supported")
            found.append((start, i))
        # Put each real content where its mark is, stripped on the sides where the template
        # dropped the padding.
        text, spans, pos = "", [None] * len(turns), 0
        for start, i in sorted(found):
            end = start + len(marks[i])
            left = start - len(_PAD_LEFT) >= pos and marked[start - len(_PAD_LEFT):start] == _PAD_LEFT
            right = marked[end:end + len(_PAD_RIGHT)] == _PAD_RIGHT
            content = turns[i][1]
            content = content if left else content.lstrip()
            content = content if right else content.rstrip()
            text += marked[pos:start - len(_PAD_LEFT) if left else start]
            spans[i] = (len(text), len(text) + len(content))
            text += content
            pos = end + len(_PAD_RIGHT) if right else end
        text += marked[pos:]
        if text != self._render_text(turns, [content for _, content in turns], add_generation_prompt):
            raise ChatTemplateError(
                "the chat template changes message content beyond trimming whitespace, or branches on it; "
                "its own text cannot be told from the content, which must stay literal")
        return text, spans

    def _specials(self, text: str, spans: Sequence[Tuple[int, int]]):
        """The special tokens the template wrote: matches in `text` outside the content spans."""
        pos = 0
        for start, end in sorted(spans) + [(len(text), len(text))]:
            for m in self._special_re.finditer(text, pos, start):
                if m.group() in self._unsupported:
                    raise ChatTemplateError(
                        f"special token {m.group()!r} takes whitespace or word boundaries "
                        "with it (lstrip/rstrip/single_word), which is not supported")
                yield m
            pos = end

    def _encode(self, text: str, spans: Sequence[Tuple[int, int]]) -> List[int]:
        """Ids of a rendered text: the template's special tokens, and each stretch between two of
        them (template text and content together) encoded literally."""
        ids, stretch_start = [], 0
        for m in self._specials(text, spans):
            if m.start() > stretch_start:
                ids += self.tokenizer.encode(text[stretch_start:m.start()])
            ids.append(self._special_id[m.group()])
            stretch_start = m.end()
        if len(text) > stretch_start:
            ids += self.tokenizer.encode(text[stretch_start:])
        return ids

    def _answer(self, prompt: str, turns: Turns, content: str) -> Tuple[str, List[Tuple[int, int]]]:
        """What the template writes after `prompt` for the assistant message `content`, through
        the end-of-turn token, and the content's span in it."""
        text, spans = self._render(list(turns) + [("assistant", content)], add_generation_prompt=False)
        cut = len(prompt)
        if not text.startswith(prompt) or spans[-1][0] < cut or any(end > cut for _, end in spans[:-1]):
            raise ChatTemplateError(
                "the chat template does not write the prompt and its generation prompt as the start "
                "of the conversation with the answer, so answers cannot share a prompt")
        start, end = spans[-1]
        eot = next((m for m in self._specials(text, spans) if m.start() >= end
                    and self._special_id[m.group()] in self.end_of_turn), None)
        if eot is None:
            names = [self.tokenizer.tk.id_to_token(i) for i in sorted(self.end_of_turn)]
            raise ChatTemplateError(
                f"the chat template writes no end-of-turn token {names} after an assistant "
                "message; the reward is read there")
        return text[cut:eot.end()], [(start - cut, end - cut)]

    # ---- the interface --------------------------------------------------------------------------

    def encode(self, turns: Turns, add_generation_prompt: bool = False) -> List[int]:
        """Ids of the whole conversation, as apply_chat_template(..., tokenize=True) gives them,
        every message content encoded literally."""
        return self._encode(*self._render(turns, add_generation_prompt))

    def encode_answers(self, turns: Turns, contents: Sequence[str]) -> Tuple[List[int], List[List[int]]]:
        """(shared prompt ids, ids of each answer through its end-of-turn token).

        shared prompt + answer is exactly the whole conversation's ids (apply_chat_template up to
        the end-of-turn token). data/encode.py shares one prompt between all answers; it is
        encode(turns, add_generation_prompt=True), unless the tokenizer would merge the generation
        prompt's last text with an answer (GPT-2's split of "\n\n" + "It" is "\n", "\n", "It"):
        then it stops at its last special token, where tokenizers always cut, and the text after
        that token starts every answer.
        """
        prompt, spans = self._render(turns, add_generation_prompt=True)
        answers = [self._answer(prompt, turns, content) for content in contents]
        tail = max((m.end() for m in self._specials(prompt, spans)), default=0)
        head = self._encode(prompt[:tail], [(a, b) for a, b in spans if b <= tail])
        tail_text, tail_spans = prompt[tail:], [(a - tail, b - tail) for a, b in spans if a >= tail]
        tail_ids = self._encode(tail_text, tail_spans)
        shift = len(tail_text)
        joined = [self._encode(tail_text + text,
                               tail_spans + [(a + shift, b + shift) for a, b in answer_spans])
                  for text, answer_spans in answers]
        if all(ids[:len(tail_ids)] == tail_ids for ids in joined):
            return head + tail_ids, [ids[len(tail_ids):] for ids in joined]
        return head, joined

    def encode_record(self, record: PrefRecord) -> Tuple[List[int], List[List[int]]]:
        """encode_answers of a record's turns and responses (records.record_turns)."""
        try:
            return self.encode_answers(*record_turns(record))
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{record.origin or 'record'}: {e}") from None
