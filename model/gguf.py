"""GGUF (llama.cpp's single-file format) for the llama architecture, read through the `gguf` package.

llama.* metadata gives the LlamaConfig; tokenizer.* an HFTokenizer from a byte-level BPE vocab
and merges ("gpt2" model), or a SentencePiece model from pieces and scores ("llama" model). A
missing output tensor means a head tied to the embedding; quantized types are dequantized to
float32 by gguf's own numpy code.

q/k row order. llama.cpp's converter permutes Hugging Face's rotate-half q/k rows back to
Meta's interleaved pairs (2i, 2i+1), which is our layout too, so no permutation is applied here.
tests/test_real_model.py proves it: logits equal transformers' own GGUF loader on SmolLM2.

What a file may say that we do not implement is refused with one line (README's "Real
checkpoints" table lists it). A tokenizer we cannot rebuild exactly (an unknown pre-tokenizer,
or another tokenizer model) gives a warning and no tokenizer; it never blocks the weights.
"""
import logging
import os
import re

import torch

from .config import LlamaConfig
from .files import CheckpointError, check_tensors
from .interop import inverse, translate_name
from .tokenizer import HFTokenizer, Tokenizer

log = logging.getLogger("rmlab.checkpoint")

_LAYER_NAMES = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
                "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
                "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
              "output.weight": "head.weight"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_OURS_BLOCK = re.compile(r"layers\.(\d+)\.(.+)\.weight")

# The text splits llama.cpp applies before byte-level BPE, by `tokenizer.ggml.pre`.
LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp's fallback when a converter did not know the model's split ("default", or no key):
# punctuation runs, then GPT-2's split, digit runs, and groups of three digits, each regex
# splitting the pieces of the one before.
_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+",
                   r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                   r"\p{N}+", r"[0-9][0-9][0-9]")


def _pre_tokenizer(pre: str):
    """tokenizers' pre-tokenizer for llama.cpp's pre-tokenizer name, or None if we do not know it."""
    from tokenizers import Regex, pre_tokenizers as pt
    if pre in ("gpt-2", "gpt2"):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "default":
        return pt.Sequence([pt.Split(Regex(r), behavior="isolated") for r in _DEFAULT_SPLITS]
                           + [pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "smollm":    # SmolLM's tokenizer.json: digits one by one, then GPT-2's split
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in LLAMA3_PRE:
        return pt.Sequence([pt.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    return None


def _special(meta: dict, name: str):
    value = meta.get(f"tokenizer.ggml.{name}_token_id")
    return None if value is None else int(value)


def _sentencepiece(meta: dict, where: str) -> Tokenizer:
    """A SentencePiece model rebuilt from a "llama" (SPM) vocabulary: pieces, scores and types.

    GGUF's token types use SentencePiece's own numbering (1 normal, 2 unknown, 3 control,
    4 user-defined, 5 unused, 6 byte), and llama.cpp's SPM tokenizer merges by score like
    SentencePiece's BPE, so the model proto below is the one the file was converted from,
    up to the training-only fields.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2   # needs protobuf
    proto = sp_pb2.ModelProto()
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    scores = meta.get("tokenizer.ggml.scores")
    for i, piece in enumerate(tokens):
        proto.pieces.add(piece=piece, score=float(scores[i]) if scores else 0.0,
                         type=int(types[i]) if types else 1)
    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(proto.pieces)
    trainer.byte_fallback = 6 in types
    # SentencePiece finds its special tokens by piece name (unk_piece, ...), not by id: name them.
    wanted = {field: _special(meta, name) for field, name in
              (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    for field, i in wanted.items():
        if i is not None:
            setattr(trainer, f"{field}_piece", tokens[i])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    tok = Tokenizer.from_proto(proto.SerializeToString(), where)
    got = {"unk": tok.sp.unk_id(), "bos": tok.bos_id, "eos": tok.eos_id}
    wrong = {k: (wanted[k], got[k]) for k in got if wanted[k] is not None and wanted[k] != got[k]}
    if wrong:
        raise ValueError(f"SentencePiece does not resolve the file's special ids (file, rebuilt): {wrong}")
    eot = _special(meta, "eot")
    tok.set_specials(add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),   # llama.cpp's default
                     chat_template=meta.get("tokenizer.chat_template"),
                     eos_ids=[eot] if eot is not None else [])
    return tok


def _tokenizer(meta: dict, where: str):
    """The tokenizer that tokenizer.* describes, or None (with a warning) when we cannot rebuild it."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind == "llama":
        return _sentencepiece(meta, where)
    pre_tokenizer = _pre_tokenizer(pre) if kind == "gpt2" else None
    if kind == "gpt2" and pre == "default":
        log.warning("%s: GGUF tokenizer.ggml.pre is 'default' (or missing): its converter did not know the "
                    "model's text split, so llama.cpp's fallback split is used, as llama.cpp does; pass the "
                    "model's tokenizer.json with --tokenizer for its own", where)
    if pre_tokenizer is None:
        what = f"pre-tokenizer {pre!r}" if kind == "gpt2" else f"tokenizer model {kind!r}"
        log.warning("%s: GGUF %s is not supported; loading the weights without a tokenizer "
                    "(pass the model's tokenizer.json with --tokenizer)", where, what)
        return None
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    if "tokenizer.ggml.merges" not in meta:
        raise ValueError("a BPE vocabulary without tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    llama3 = pre in LLAMA3_PRE
    # Llama 3's tokenizer takes a whole word that is in the vocab before trying merges (llama.cpp
    # and its tokenizer.json both say ignore_merges), which can differ from merging pair by pair.
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                 ignore_merges=llama3))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    # Token types (llama.cpp): 3 = control (special, e.g. <|im_end|>), 4 = user-defined (matched whole).
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == 3])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == 4])

    eos_ids = [i for i in (_special(meta, "eos"), _special(meta, "eot")) if i is not None]
    return HFTokenizer(backend, _special(meta, "bos"), list(dict.fromkeys(eos_ids)),
                       _special(meta, "padding"), _special(meta, "unknown"),
                       add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", llama3)),   # llama.cpp's default
                       chat_template=meta.get("tokenizer.chat_template"), where=where)


def _config(meta: dict, n_vocab: int, tied: bool) -> LlamaConfig:
    """LlamaConfig from llama.* metadata; ValueError names the key of anything we would compute wrongly."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"key 'general.architecture' is {arch!r}; only 'llama' is supported")

    def key(name, default=None):
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise ValueError(f"key 'llama.{name}' is missing")
        return value

    if key("expert_count", 0):
        raise ValueError(f"key 'llama.expert_count' is {key('expert_count')}; mixture-of-experts is not "
                         f"supported")
    dim, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
    if n_heads <= 0 or int(key("attention.head_count_kv", n_heads)) <= 0:
        raise ValueError("key 'llama.attention.head_count' or 'head_count_kv' is not positive")
    head_dim = int(key("attention.key_length", dim // n_heads))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise ValueError("keys 'llama.attention.key_length' and 'value_length' differ; not supported")
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"key 'llama.rope.dimension_count' is {key('rope.dimension_count')}, not the head "
                         f"dim {head_dim}; partial rotary embeddings are not supported")
    # llama.cpp's rules: the type defaults to linear; the factor is rope.scaling.factor or the
    # older rope.scale_linear; a factor of 0 or 1 (or none) means no scaling.
    scaling_type = key("rope.scaling.type", "linear")
    factor = float(key("rope.scaling.factor", key("rope.scale_linear", 0.0)))
    if float(key("rope.scaling.attn_factor", 1.0)) != 1.0:
        raise ValueError(f"key 'llama.rope.scaling.attn_factor' is {key('rope.scaling.attn_factor')}; not "
                         f"supported")
    if scaling_type not in ("none", "linear"):
        raise ValueError(f"key 'llama.rope.scaling.type' is {scaling_type!r}; supported: 'none', 'linear'")
    scaling = ({"rope_type": "linear", "factor": factor}
               if scaling_type == "linear" and factor not in (0.0, 1.0) else None)
    return LlamaConfig(
        dim=dim,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        vocab_size=int(key("vocab_size", n_vocab)),
        hidden_dim=int(key("feed_forward_length")),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        head_dim=head_dim if head_dim != dim // n_heads else None,
        max_seq_len=int(key("context_length")),
        tie_embeddings=tied,
    )


def read_gguf(path: str, device: str):
    """(config, "lm", state dict with our names, tokenizer or None, meta) from a .gguf file."""
    import gguf
    from gguf.quants import dequantize
    try:
        reader = gguf.GGUFReader(path)
        meta = {name: field.contents() for name, field in reader.fields.items()
                if not name.startswith("GGUF.")}
    except Exception as e:  # gguf raises ValueError / struct errors on a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    sd, unknown = {}, []
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise CheckpointError(f"{path}: tensor 'rope_freqs.weight' (llama3 RoPE factors precomputed by "
                                  "llama.cpp) is not supported; load the HF checkpoint instead")
        ours = translate_name(t.name, _TOP_NAMES, _BLOCK, _LAYER_NAMES, "layers.{}.{}.weight")
        if ours is None:
            unknown.append(t.name)
            continue
        try:
            values = dequantize(t.data, t.tensor_type)           # numpy (rows, cols), float32
        except NotImplementedError as e:
            raise CheckpointError(f"{path}: tensor '{t.name}' has type {t.tensor_type.name}, which gguf "
                                  f"cannot dequantize ({e})") from None
        sd[ours] = torch.from_numpy(values.copy()).to(device)
    tied = "head.weight" not in sd
    try:
        cfg = _config(meta, len(meta.get("tokenizer.ggml.tokens", [])), tied)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    top, layers = inverse(_TOP_NAMES), inverse(_LAYER_NAMES)
    check_tensors(sd, unknown, cfg, "lm", path,
                  lambda n: translate_name(n, top, _OURS_BLOCK, layers, "blk.{}.{}.weight") or n)
    try:
        tok = _tokenizer(meta, path)
    except Exception as e:  # tokenizers raises bare Exceptions on a bad merge; never block the weights
        log.warning("%s: GGUF tokenizer cannot be rebuilt (%s); loading the weights without it", path, e)
        tok = None
    info = {"source_format": "gguf", "source_path": os.path.abspath(path),
            "chat_template": meta.get("tokenizer.chat_template"), "gguf_name": meta.get("general.name")}
    return cfg, "lm", sd, tok, info
