"""A thin SentencePiece wrapper: train one, or load any `.model` file (Llama 2's included).

Training follows llama2.c: BPE, byte fallback (no unknown characters ever), digits split
one per piece (arithmetic stays regular), identity normalization (text round-trips exactly,
newlines included).

Special ids: unk=0, bos=1, eos=2 as in Llama 2. Padding must never be EOS (the reward is
read at the EOS, and HF reads it at the last non-pad token), so our tokenizers reserve
pad=3. Llama 2's own `tokenizer.model` has no pad piece (pad_id = -1); there we pad with
unk (0), which the attention mask hides anyway.
"""
import os
from typing import Iterable, List

import sentencepiece as spm


class Tokenizer:
    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer file not found: {model_path}")
        with open(model_path, "rb") as f:
            proto = f.read()
        self.model_path = model_path
        self._init_from_proto(proto, model_path)

    def _init_from_proto(self, proto: bytes, where: str):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise ValueError(
                f"{where}: not a SentencePiece model ({type(e).__name__}). "
                "Llama 3's tokenizer.model is a tiktoken file, which rmlab does not read."
            ) from None
        self._proto = proto
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 and pad != self.eos_id else max(self.sp.unk_id(), 0)
        if self.pad_id == self.eos_id:
            raise ValueError(f"{where}: pad id equals eos id {self.eos_id}")

    @classmethod
    def from_proto(cls, proto: bytes, where: str = "<bytes>") -> "Tokenizer":
        tok = cls.__new__(cls)
        tok.model_path = None
        tok._init_from_proto(proto, where)
        return tok

    @classmethod
    def train(cls, texts: Iterable[str], model_prefix: str, vocab_size: int) -> "Tokenizer":
        """Trains a BPE model on `texts` and writes `{model_prefix}.model`."""
        os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
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
        return cls(model_prefix + ".model")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) not in (self.bos_id, self.eos_id, self.pad_id)]
        return self.sp.decode(ids)

    def model_proto(self) -> bytes:
        return self._proto
