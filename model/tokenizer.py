"""Tokenizers behind one interface (INTERFACES.md lists it): SentencePiece (ours, Llama 2) and
Hugging Face `tokenizers` (tokenizer.json).

Text is encoded literally: special tokens are added by code (bos=, eos=, bos_prefix), never parsed
out of user text, so a response that contains "<|im_end|>" or "</s>" cannot end itself early.
(Hugging Face's tokenizers parse special tokens out of text by default; we switch that off.)

Padding must never be EOS: the reward is read at the EOS, and HF reads it at the last non-pad
token. Where a checkpoint has no pad or pads with EOS (SmolLM2, Llama 3), we pad with unk or, if
there is none, a reserved special token, and log the choice.

SentencePiece training follows llama2.c: BPE, byte fallback (no unknown characters ever), digits
split one per piece (arithmetic stays regular), identity normalization (text round-trips exactly,
newlines included, except "▁" U+2581, SentencePiece's own space, which decodes as a space).
Special ids: unk=0, bos=1, eos=2 as in Llama 2, and our own pad=3. Llama 2's `tokenizer.model`
has no pad piece (pad_id = -1); there we pad with unk (0).
"""
import json
import logging
import os
from typing import Iterable, List, Optional, Sequence

import sentencepiece as spm

log = logging.getLogger("rmlab.tokenizer")


class Tokenizer:
    """SentencePiece. BOS starts a sequence (Llama 2 and our own models) unless set_specials says not."""

    kind = "sentencepiece"
    chat_template = None

    def __init__(self, model_path: str, proto: Optional[bytes] = None):
        """`proto`: the model's bytes, when they come from elsewhere (a GGUF vocabulary)."""
        if proto is None:
            if not os.path.isfile(model_path):
                raise FileNotFoundError(f"tokenizer file not found: {model_path}")
            with open(model_path, "rb") as f:
                proto = f.read()
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise ValueError(
                f"{model_path}: not a SentencePiece model ({type(e).__name__}). "
                "Llama 3's tokenizer.model is a tiktoken file: pass the tokenizer.json of its HF release."
            ) from None
        self._proto = proto
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if min(self.bos_id, self.eos_id) < 0:          # sentencepiece says -1: they would be emitted as ids
            raise ValueError(f"{model_path}: this SentencePiece model has no "
                             f"{'BOS' if self.bos_id < 0 else 'EOS'} piece; rmlab's sequences need both")
        self.eos_ids = [self.eos_id]
        self.bos_prefix = [self.bos_id]
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 and pad != self.eos_id else max(self.sp.unk_id(), 0)
        if self.pad_id == self.eos_id:
            raise ValueError(f"{model_path}: pad id equals eos id {self.eos_id}")

    @classmethod
    def from_proto(cls, proto: bytes, where: str = "<bytes>") -> "Tokenizer":
        return cls(where, proto)

    @classmethod
    def train(cls, texts: Iterable[str], model_prefix: str, vocab_size: int) -> "Tokenizer":
        """Trains a BPE model on `texts` and writes `{model_prefix}.model`."""
        os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
        texts = list(texts)
        # character_coverage 1.0 keeps every character of the texts as a piece: more of them than
        # vocab_size is a bad flag, said in one line (SentencePiece itself raises a RuntimeError)
        n_chars = len(set("".join(texts)) - {" "}) + 1 + 4 + 256    # + "▁", the specials, the bytes
        if vocab_size < n_chars:
            raise ValueError(f"--vocab-size {vocab_size} is smaller than the {n_chars} pieces the training "
                             f"texts need (every character, 256 bytes and 4 specials); "
                             f"pass {n_chars} or more")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=model_prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 16,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            hard_vocab_limit=False,   # tiny corpora may not support the full vocab
            num_threads=max(1, os.cpu_count() or 1),
            minloglevel=2,
        )
        tok = cls(model_prefix + ".model")
        if tok.vocab_size < vocab_size:
            log.warning(f"tokenizer: the training texts support {tok.vocab_size} pieces, fewer than the "
                        f"{vocab_size} asked for; the model uses {tok.vocab_size}")
        return tok

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        drop = {self.bos_id, self.pad_id, *self.eos_ids}
        return self.sp.decode([int(i) for i in ids if int(i) not in drop])

    def token_id(self, name: str) -> Optional[int]:
        i = self.sp.piece_to_id(name)
        return i if self.sp.id_to_piece(i) == name else None

    def set_specials(self, add_bos: bool = True, chat_template: Optional[str] = None, eos_ids=None):
        """What a checkpoint says beyond the model file: whether BOS starts a sequence, its chat
        template, and every id that ends a turn (the model's eos first)."""
        self.bos_prefix = [self.bos_id] if add_bos else []
        self.chat_template = chat_template
        self.eos_ids = list(dict.fromkeys([self.eos_id, *(eos_ids or [])]))
        pieces = [self.sp.id_to_piece(i) for i in self.eos_ids]
        parsed = [p for p, i in zip(pieces, self.eos_ids) if self.sp.encode(p) == [i]]
        if parsed:            # a user-defined piece (or a plain one): text can produce it
            log.warning("end-of-turn piece(s) %s: SentencePiece encodes their text as themselves, so a "
                        "response that spells one ends there", parsed)

    def specials(self) -> dict:
        return {"add_bos": self.bos_prefix == [self.bos_id], "chat_template": self.chat_template,
                "eos_ids": self.eos_ids}

    def model_proto(self) -> bytes:
        return self._proto


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (tokenizer.json) with the checkpoint's special ids.

    bos_id / eos_ids / pad_id / add_bos come from the checkpoint's own files (see from_dir), or
    from GGUF metadata (model/gguf.py); never from guesses about token names.
    """

    kind = "tokenizers"

    def __init__(self, backend, bos_id: Optional[int], eos_ids: Sequence[int], pad_id: Optional[int] = None,
                 unk_id: Optional[int] = None, add_bos: bool = False, chat_template: Optional[str] = None,
                 where: str = "<tokenizer>"):
        self.tk = backend
        self.tk.encode_special_tokens = True       # literal text: "<|im_end|>" in a response is just text
        self.model_path = where
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        eos_ids = [int(i) for i in eos_ids]
        if not eos_ids:
            raise ValueError(f"{where}: no eos token id in the checkpoint")
        for name, i in [("bos", bos_id), ("pad", pad_id), ("unk", unk_id)] + [("eos", i) for i in eos_ids]:
            if i is not None and not 0 <= i < self.vocab_size:
                raise ValueError(f"{where}: {name} id {i} is outside the vocabulary of {self.vocab_size}")
        if add_bos and bos_id is None:
            raise ValueError(f"{where}: says to add BOS but has no bos token id")
        self.bos_id, self.eos_ids, self.unk_id = bos_id, eos_ids, unk_id
        self.eos_id = eos_ids[0]   # the end-of-turn token we append; the reward is read there
        # An end-of-turn token added as non-special (a GGUF user-defined token, special=False in a
        # tokenizer.json) is still parsed out of text: mark it special (same id), so it is not.
        from tokenizers import AddedToken
        loose = [t for i, t in backend.get_added_tokens_decoder().items() if i in eos_ids and not t.special]
        backend.add_special_tokens([AddedToken(t.content, special=True, normalized=False) for t in loose])
        self.bos_prefix = [bos_id] if add_bos else []
        self.chat_template = chat_template
        self.pad_id = self._choose_pad(pad_id, where)

    def _choose_pad(self, pad_id: Optional[int], where: str) -> int:
        if pad_id is not None and pad_id not in self.eos_ids:
            return pad_id
        specials = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        reserved = sorted(i for name, i in specials.items() if "reserved" in name or "pad" in name)
        # unk first, then a reserved or pad token, then any other special token: it is only ever masked.
        candidates = ([self.unk_id] if self.unk_id is not None else []) + reserved + sorted(specials.values())
        candidates = [i for i in candidates if i not in self.eos_ids and i != self.bos_id]
        said = "eos" if pad_id is not None else "missing"
        if not candidates:
            raise ValueError(f"{where}: pad is {said} and no special token other than bos and eos is left to "
                             "pad with; padding with EOS would misplace rewards")
        log.info("%s: pad token is %s; padding with id %d (%r) instead, so that pad != eos", where, said,
                 candidates[0], self.tk.id_to_token(candidates[0]))
        return candidates[0]

    # ---- construction -----------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str, **specials) -> "HFTokenizer":
        """A tokenizer.json, with its special ids given as keyword arguments (a manifest's) or read
        from the files beside it (from_dir)."""
        backend = _read_backend(path)
        if not specials:
            return cls.from_dir(os.path.dirname(os.path.abspath(path)), backend=backend, where=path)
        return cls(backend, where=path, **specials)

    @classmethod
    def from_dir(cls, d: str, backend=None, where: Optional[str] = None) -> "HFTokenizer":
        """tokenizer.json plus the special ids from tokenizer_config.json, config.json,
        generation_config.json.

        eos: tokenizer_config's eos_token first (the end-of-turn token of chat models), then every
        eos id of config.json and generation_config.json (Llama 3.1 Instruct lists three).
        bos is added when tokenizer_config's add_bos_token says so or, without that key, when the
        tokenizer.json's post-processor adds it (Llama 3's TemplateProcessing does; SmolLM2's does not),
        which also names the BOS when no file does.
        """
        path = os.path.join(d, "tokenizer.json")
        where = where or path
        backend = backend or _read_backend(path)
        tc_path = os.path.join(d, "tokenizer_config.json")
        tc = _read_optional_json(tc_path)
        config = _read_optional_json(os.path.join(d, "config.json"))
        generation = _read_optional_json(os.path.join(d, "generation_config.json"))

        def token(field):  # tokenizer_config writes a token as its text or as {"content": text}
            value = tc.get(field)
            value = value.get("content") if isinstance(value, dict) else value
            if field == "unk_token" and value is None:
                value = getattr(backend.model, "unk_token", None)    # BPE / WordPiece models name one
            if value is None:
                return None
            if not isinstance(value, str):
                raise ValueError(f"{tc_path}: {field} is {value!r}, not a token")
            i = backend.token_to_id(value)
            if i is None:
                raise ValueError(f"{tc_path}: {field} {value!r} is not in the vocabulary")
            return i

        def ids(field):
            out = []
            for name, source in (("config.json", config), ("generation_config.json", generation)):
                value = source.get(field)
                value = value if isinstance(value, list) else [] if value is None else [value]
                if any(isinstance(i, bool) or not isinstance(i, int) for i in value):
                    raise ValueError(f"{os.path.join(d, name)}: {field} is {source[field]!r}, not token ids")
                out += value
            return out

        end_of_turn = token("eos_token")
        eos_ids = list(dict.fromkeys(([end_of_turn] if end_of_turn is not None else [])
                                     + ids("eos_token_id")))
        bos_id = token("bos_token")
        bos_id = bos_id if bos_id is not None else next(iter(ids("bos_token_id")), None)
        pad_id = token("pad_token")
        pad_id = pad_id if pad_id is not None else next(iter(ids("pad_token_id")), None)
        first = backend.encode("a", add_special_tokens=True).ids[:1]
        if bos_id is None and first != backend.encode("a", add_special_tokens=False).ids[:1]:
            bos_id = first[0]      # no file names a BOS, but the post-processor adds one (transformers too)
        adds_bos = bos_id is not None and first == [bos_id]
        add_bos = bool(tc["add_bos_token"]) if "add_bos_token" in tc else adds_bos
        if add_bos != adds_bos:
            log.warning("%s: add_bos_token is %s but the post-processor of %s %s BOS; rmlab follows "
                        "add_bos_token (as transformers 4's LlamaTokenizerFast did), transformers 5 the "
                        "post-processor", tc_path, tc["add_bos_token"], path,
                        "adds" if adds_bos else "adds no")
        if tc.get("tokenizer_class") in LLAMA_CLASSES and '"ByteLevel"' not in backend.to_str():
            _check_prefix_space(tc, tc_path, backend, where)
        template = tc.get("chat_template")
        template_path = os.path.join(d, "chat_template.jinja")   # transformers 5 writes it as its own file
        if os.path.isfile(template_path):
            with open(template_path, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list) and all(isinstance(t, dict) and {"name", "template"} <= set(t)
                                              for t in template):
            template = next((t["template"] for t in template if t["name"] == "default"), None)
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{tc_path}: chat_template is not text")
        return cls(backend, bos_id, eos_ids, pad_id, token("unk_token"), add_bos, template, where)

    # ---- the interface ------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        drop = {self.bos_id, self.pad_id, *self.eos_ids}
        return self.tk.decode([int(i) for i in ids if int(i) not in drop], skip_special_tokens=False)

    def token_id(self, name: str) -> Optional[int]:
        return self.tk.token_to_id(name)

    def to_json(self) -> str:
        return self.tk.to_str()

    def specials(self) -> dict:
        """What a checkpoint stores beside tokenizer.json to rebuild this object exactly."""
        return {"bos_id": self.bos_id, "eos_ids": self.eos_ids, "pad_id": self.pad_id, "unk_id": self.unk_id,
                "add_bos": bool(self.bos_prefix), "chat_template": self.chat_template}


LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def _check_prefix_space(tc: dict, tc_path: str, tokenizer, where: str):
    """transformers' LlamaTokenizer (4.x and 5.x; not for a byte-level tokenizer.json) splits text
    by tokenizer_config's add_prefix_space when that is set, whatever the tokenizer file does: where
    the two disagree on putting SentencePiece's '▁' before a text, every text would tokenize
    differently, so it is refused."""
    want = tc.get("add_prefix_space")
    if not isinstance(want, bool):
        return
    if isinstance(tokenizer, Tokenizer):
        prefixed = "".join(tokenizer.sp.encode("a", out_type=str))
    else:
        prefixed = tokenizer.normalizer.normalize_str("a") if tokenizer.normalizer is not None else "a"
        if tokenizer.pre_tokenizer is not None:
            prefixed = "".join(p for p, _ in tokenizer.pre_tokenizer.pre_tokenize_str(prefixed))
    has = prefixed.startswith("▁")
    if want != has:
        raise ValueError(f"{tc_path}: add_prefix_space is {want} but {where} {'puts' if has else 'puts no'} "
                         "'▁' before a text; transformers' LlamaTokenizer follows add_prefix_space")


def _read_backend(path: str):
    from tokenizers import Tokenizer as Backend
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        backend = Backend.from_file(path)
    except Exception as e:  # tokenizers raises its own Exception with serde's text
        raise ValueError(f"{path}: not a Hugging Face tokenizer.json "
                         f"({str(e).splitlines()[0][:200]})") from None
    # A saved truncation or padding would cut or pad every encode(); transformers applies them only
    # when asked (truncation=, padding=), and rmlab's data code truncates and pads itself.
    backend.no_truncation()
    backend.no_padding()
    return backend


def _read_optional_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


def load_tokenizer(path: str):
    """A SentencePiece `.model`, a `tokenizer.json`, or a directory holding one of them with the
    files that give its special ids (tokenizer_config.json; config.json, generation_config.json)."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return HFTokenizer.from_dir(path)
        if not os.path.isfile(os.path.join(path, "tokenizer.model")):
            raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
        tok = Tokenizer(os.path.join(path, "tokenizer.model"))
        tc = _read_optional_json(os.path.join(path, "tokenizer_config.json"))   # what the .model cannot say
        for key, have in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):   # what it says: must agree
            want = tc.get(key)
            want = want.get("content") if isinstance(want, dict) else want
            if isinstance(want, str) and tok.token_id(want) != have:
                raise ValueError(f"{path}: tokenizer_config.json's {key} is {want!r} but tokenizer.model's "
                                 f"is {tok.sp.id_to_piece(have)!r}; rmlab reads a .model's own specials: "
                                 "give the tokenizer.json of this checkpoint")
        if tc.get("tokenizer_class", LLAMA_CLASSES[0]) in LLAMA_CLASSES:
            _check_prefix_space(tc, os.path.join(path, "tokenizer_config.json"), tok, tok.model_path)
        template = tc.get("chat_template")
        eos = _read_optional_json(os.path.join(path, "generation_config.json")).get("eos_token_id")
        tok.set_specials(bool(tc.get("add_bos_token", True)), template if isinstance(template, str) else None,
                         [i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)])
        return tok
    if path.endswith(".json"):
        return HFTokenizer.from_file(path)
    return Tokenizer(path)
