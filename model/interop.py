"""Translations between our checkpoint layout and Hugging Face's and Meta's.

Pure functions on config and tensor dicts: a bad field raises ValueError naming the field, and
the caller (model/formats.py, which reads the files) prefixes the file.

RoPE layout. Within one head of size hd, Meta (and we) rotate the pairs of dims (2i, 2i+1) by
the angle pos * theta^(-2i/hd); Hugging Face rotates the dims (i, i + hd/2) by the same angle
("rotate_half"). Attention scores are dot products q . k, which do not change when q and k
have their dims reordered the same way, so the two layouts are the same model once the rows
of wq and wk are permuted within each head:

    HF row i        = Meta row 2i          (i < hd/2)
    HF row i + hd/2 = Meta row 2i + 1

wv and wo are untouched. wk is permuted per *kv* head (n_kv_heads of them under GQA). The
permutation only moves rows, so export followed by import is bit-exact.
"""
import logging
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .config import ROPE_SCALINGS, LlamaConfig, check_rope_scaling

log = logging.getLogger("rmlab.checkpoint")

# ---- names ---------------------------------------------------------------------------------

# Our names (Meta's, with `head` for `output`) -> Hugging Face's (LlamaForCausalLM and
# LlamaForSequenceClassification), for the tensors of one block: layers.{i}.* -> model.layers.{i}.*
_HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
# head.weight is lm_head.weight (V, D), absent when tie_word_embeddings, or score.weight (1, D),
# which has no bias: our head.bias (1,) has no HF name (formats.export_hf says where it goes).
_HF_HEAD_NAMES = {"lm": "lm_head.weight", "reward": "score.weight"}
_OURS_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def inverse(names: Dict[str, str]) -> Dict[str, str]:
    return {v: k for k, v in names.items()}


def translate_name(name: str, top: Dict[str, str], layer_pattern, layer_names: Dict[str, str],
                   layer_format: str) -> Optional[str]:
    """`name` looked up among whole names (`top`), then as block `i`'s tensor (`layer_pattern`
    matches i and the suffix); None when it is neither."""
    if name in top:
        return top[name]
    m = layer_pattern.fullmatch(name)
    if m and m.group(2) in layer_names:
        return layer_format.format(m.group(1), layer_names[m.group(2)])
    return None


def ours_to_hf_name(name: str, head_kind: str) -> str:
    top = {**_HF_TOP_NAMES, "head.weight": _HF_HEAD_NAMES[head_kind]}
    # No HF counterpart (head.bias): the name stays ours, and callers say so.
    return translate_name(name, top, _OURS_LAYER, _HF_LAYER_NAMES, "model.layers.{}.{}") or name


def hf_to_ours_name(name: str, head_kind: str) -> Optional[str]:
    """Our name for an HF tensor name, or None if it is not part of a Llama with this head."""
    top = {**inverse(_HF_TOP_NAMES), _HF_HEAD_NAMES[head_kind]: "head.weight"}
    return translate_name(name, top, _HF_LAYER, inverse(_HF_LAYER_NAMES), "layers.{}.{}")


def ours_to_meta_name(name: str) -> str:
    return "output.weight" if name == "head.weight" else name


def meta_to_ours_name(name: str) -> Optional[str]:
    if name == "output.weight":
        return "head.weight"
    if name == "head.weight":
        return None  # not a Meta name; refusing it keeps the mapping one-to-one
    return name       # the rest of Meta's names are ours; the caller checks them against the config


def rename(tensors: Dict[str, torch.Tensor], to_ours: Callable[[str], Optional[str]]):
    """Renames a file's tensors to ours. Returns (renamed, names in the file that have no mapping)."""
    ours = {name: to_ours(name) for name in tensors}
    renamed = {ours[name]: t for name, t in tensors.items() if ours[name] is not None}
    return renamed, [name for name in tensors if ours[name] is None]


# ---- RoPE row permutation ---------------------------------------------------------------------

def permute_qk(sd: Dict[str, torch.Tensor], cfg: LlamaConfig, to_hf: bool) -> Dict[str, torch.Tensor]:
    """Our names: our (Meta) rope layout -> HF's (`to_hf`), or back. Shapes must already be checked."""
    def permute(w, n_heads):  # (n_heads*hd, D), per head
        D = w.shape[-1]
        if to_hf:  # pairs (2i, 2i+1) -> halves (i, i+hd/2)
            return w.reshape(n_heads, -1, 2, D).transpose(1, 2).reshape(-1, D)
        return w.reshape(n_heads, 2, -1, D).transpose(1, 2).reshape(-1, D)

    out = dict(sd)
    for i in range(cfg.n_layers):
        wq, wk = f"layers.{i}.attention.wq.weight", f"layers.{i}.attention.wk.weight"
        out[wq], out[wk] = permute(sd[wq], cfg.n_heads), permute(sd[wk], cfg.n_kv_heads)
    return out


# ---- Hugging Face config.json ------------------------------------------------------------------

HF_ARCHITECTURES = {"LlamaForCausalLM": "lm", "LlamaForSequenceClassification": "reward"}


def _require(d: dict, key: str):
    if key not in d:
        raise ValueError(f"missing field '{key}'")
    return d[key]


def _int(d: dict, key: str, default=None) -> int:
    """A positive int field (a float or a string here would crash later, far from the file)."""
    value = d.get(key, default) if default is not None else _require(d, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"field '{key}' is {value!r}, not a positive int")
    return value


def _float(d: dict, key: str, default: float) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"field '{key}' is {value!r}, not a positive number")
    return float(value)


def _bool(d: dict, key: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"field '{key}' is {value!r}, not true or false")
    return value


# Keys of a Llama config.json that change the math, and how each is handled:
#   read:    hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
#            num_key_value_heads, head_dim, vocab_size, rms_norm_eps, tie_word_embeddings,
#            max_position_embeddings, rope_theta / rope_scaling (4.x), rope_parameters (5.x)
#   checked: model_type == "llama" (required), hidden_act "silu" (or "swish"), attention_bias and mlp_bias
#            false, pretraining_tp a positive int (Meta's tensor-parallel split of the same matmuls;
#            transformers 4.x computed the slices and summed them, 5.x ignores it: same math)
#   refused: any other RoPE type, per-layer RoPE, and the keys below when they are set.
_HF_REFUSED_WHEN_SET = ("sliding_window", "use_sliding_window", "layer_types", "num_experts",
                        "num_local_experts", "qk_norm", "use_qk_norm", "logits_scaling",
                        "embedding_multiplier", "residual_multiplier", "attention_multiplier")
_HF_ROPE_TYPES_REFUSED = ("dynamic", "yarn", "longrope", "proportional", "mrope")


def _rope_fields(where: str, params: dict, max_positions: int,
                 top_original: Optional[int] = None) -> Tuple[Optional[float], Optional[dict]]:
    """One RoPE dict (4.x rope_scaling or 5.x rope_parameters) -> (theta or None, our scaling or None).
    top_original: a top-level original_max_position_embeddings (Phi-3 style), which wins."""
    if not isinstance(params, dict):
        raise ValueError(f"field '{where}' is {params!r}, not an object")
    if "rope_type" in params and "type" in params and params["rope_type"] != params["type"]:
        raise ValueError(f"field '{where}' has type {params['type']!r} and rope_type {params['rope_type']!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta")
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0):
        raise ValueError(f"field '{where}.rope_theta' is {theta!r}, not a positive number")
    rest = {k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta")}
    if rest.get("partial_rotary_factor", 1.0) == 1.0:
        rest.pop("partial_rotary_factor", None)
    if kind == "default":
        rest.pop("partial_rotary_factor", None)   # transformers' Llama ignores it here (and may write it)
        if rest:
            raise ValueError(f"field '{where}' has {sorted(rest)}, which default RoPE does not take")
        return theta, None
    if kind in _HF_ROPE_TYPES_REFUSED:
        raise ValueError(f"field '{where}' has rope_type {kind!r}; rmlab implements "
                         f"{['default', *sorted(ROPE_SCALINGS)]} and refuses the rest")
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"field '{where}' has an unknown rope_type {kind!r}")
    if kind == "llama3":  # as transformers 5: the top-level value, the nested one, max_position_embeddings
        if top_original is not None:
            rest["original_max_position_embeddings"] = top_original
        rest.setdefault("original_max_position_embeddings", max_positions)
    scaling = {"rope_type": kind, **rest}
    try:
        check_rope_scaling(scaling)
    except ValueError as e:
        raise ValueError(f"field '{where}': {e}") from None
    return theta, scaling


def rope_from_hf(d: dict, max_positions: int) -> Tuple[float, Optional[dict]]:
    """(theta, scaling) from either spelling: 5.x `rope_parameters`, 4.x `rope_theta` + `rope_scaling`.

    transformers 5 reads `rope_scaling` when it is set (null or {} is not) and `rope_parameters`
    otherwise, with rope_theta from that dict, else the top level, else 10000. Files written by
    export_hf carry both; a value given in two places must agree.
    """
    theta, scaling = None, None
    top_original = d.get("original_max_position_embeddings")     # llama3 only; checked by check_rope_scaling
    params, legacy = d.get("rope_parameters"), d.get("rope_scaling")
    if params:
        if isinstance(params, dict) and all(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"field 'rope_parameters' is per layer type ({sorted(params)}); not supported")
        theta, scaling = _rope_fields("rope_parameters", params, max_positions, top_original)
    if "rope_theta" in d:
        top = _float(d, "rope_theta", None)
        if theta is not None and top != float(theta):
            raise ValueError(f"field 'rope_theta' is {top} but 'rope_parameters' says {theta}")
        theta = top
    if legacy:
        nested_theta, top_scaling = _rope_fields("rope_scaling", legacy, max_positions, top_original)
        if nested_theta is not None:
            raise ValueError("field 'rope_scaling' holds a rope_theta; 4.x configs keep it at the top level")
        if params and top_scaling != scaling:
            raise ValueError(f"field 'rope_scaling' is {legacy} but 'rope_parameters' says {params}")
        if params and "rope_theta" not in d and theta not in (None, 10000.0):
            raise ValueError(f"field 'rope_parameters' has rope_theta {theta}, which transformers ignores "
                             "beside 'rope_scaling' (it reads the top-level rope_theta, here absent: 10000)")
        scaling = top_scaling
    # transformers 5 copies a top-level partial_rotary_factor into the RoPE dict it reads (unless
    # that holds one), where linear/llama3 scaling applies it and default RoPE ignores it: refused
    # under scaling, as a nested one is in _rope_fields
    top_partial = d.get("partial_rotary_factor")
    if scaling and top_partial not in (None, 1, 1.0) and "partial_rotary_factor" not in (legacy or params):
        raise ValueError(f"field 'partial_rotary_factor' is {d['partial_rotary_factor']} with "
                         f"{scaling['rope_type']} RoPE scaling; rmlab rotates whole heads")
    return float(theta if theta is not None else 10000.0), scaling   # 10000: HF's default_theta


def config_from_hf(d: dict) -> Tuple[LlamaConfig, Optional[str]]:
    """HF LlamaConfig dict (4.x or 5.x) -> (our config, head kind or None when `architectures`
    does not say)."""
    if "model_type" not in d:
        raise ValueError("field 'model_type' is missing; rmlab reads 'llama' configs only")
    if d["model_type"] != "llama":
        raise ValueError(f"field 'model_type' is {d['model_type']!r}; only 'llama' is supported")
    if d.get("hidden_act", "silu") not in ("silu", "swish"):     # transformers' ACT2FN: both are SiLU
        raise ValueError(f"field 'hidden_act' is {d['hidden_act']!r}; Llama uses 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            raise ValueError(f"field '{flag}' is true; Llama's projections have no bias")
    _int(d, "pretraining_tp", 1)   # checked only: the same math (see above)
    for key in _HF_REFUSED_WHEN_SET:
        if d.get(key) not in (None, False, 0, [], {}):
            raise ValueError(f"field '{key}' is {d[key]!r}; a Llama with it is not supported")
    n_heads = _int(d, "num_attention_heads")
    archs = d.get("architectures") or []
    kinds = {HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES}
    if archs and not kinds:
        raise ValueError(f"field 'architectures' is {archs}; supported: {sorted(HF_ARCHITECTURES)}")
    head = kinds.pop() if len(kinds) == 1 else None
    if head == "reward":
        # HF writes id2label; a bare num_labels also works; PretrainedConfig's default is 2.
        n_labels = len(d["id2label"]) if "id2label" in d else d.get("num_labels", 2)
        if n_labels != 1:
            raise ValueError(f"LlamaForSequenceClassification with {n_labels} labels; a reward model has "
                             f"num_labels=1")
    max_positions = _int(d, "max_position_embeddings", 2048)
    theta, scaling = rope_from_hf(d, max_positions)
    cfg = LlamaConfig(
        dim=_int(d, "hidden_size"),
        n_layers=_int(d, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=(_int(d, "num_key_value_heads", n_heads) if d.get("num_key_value_heads") is not None
                    else n_heads),
        vocab_size=_int(d, "vocab_size"),
        hidden_dim=_int(d, "intermediate_size"),
        norm_eps=_float(d, "rms_norm_eps", 1e-6),          # HF's LlamaConfig default
        rope_theta=theta,
        rope_scaling=scaling,
        head_dim=_int(d, "head_dim", 1) if d.get("head_dim") is not None else None,   # None: hidden / heads
        max_seq_len=max_positions,
        tie_embeddings=_bool(d, "tie_word_embeddings", False),
    )
    return cfg, head


def config_to_hf(cfg: LlamaConfig, head_kind: str, dtype: torch.dtype,
                 bos_id: int, eos_id, pad_id: int) -> dict:
    """Our config -> the config.json of an HF LlamaForCausalLM or (reward) LlamaForSequenceClassification.

    RoPE is written in both spellings, 5.x `rope_parameters` and 4.x `rope_theta` + `rope_scaling`,
    so that neither reader falls back to a default. `pad_token_id` is always set: transformers
    refuses batches of more than one sequence without it.
    """
    if cfg.dim % cfg.n_heads:         # transformers 5 validates this even with head_dim given
        raise ValueError(f"transformers cannot load a Llama whose dim {cfg.dim} is not a multiple of its "
                         f"{cfg.n_heads} heads (its head_dim is explicit, {cfg.head_dim}); not exported")
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    d = {
        "architectures": [inverse(HF_ARCHITECTURES)[head_kind]],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if head_kind == "reward":
        d.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})  # num_labels = 1
    return d


# ---- Meta params.json and consolidated.*.pth shards ------------------------------------------------

_META_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
              "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "rope_high_freq_factor",
              "max_seq_len", "max_batch_size"}


def config_from_meta(params: dict, tokenizer_vocab: Optional[int], embedding_rows: int) -> LlamaConfig:
    """Meta's params.json -> our config. `vocab_size: -1` (Llama 2) means "ask the tokenizer"."""
    unknown = sorted(k for k in set(params) - _META_KEYS if params[k] not in (None, False, 0))
    if unknown:   # e.g. use_qk_norm, moe_args (Llama 4): a different model
        raise ValueError(f"field '{unknown[0]}' is {params[unknown[0]]!r}; rmlab reads Llama 2 and 3 "
                         f"params.json only")
    scaling = None
    if params.get("use_scaled_rope"):
        # Meta's reference code fixes low_freq_factor 1 and the original context 8192 (Llama 3's);
        # factor and high_freq_factor are read when params.json has them (8 and 4 are Llama 3.1's).
        factor = params.get("rope_scaling_factor") or 8.0
        high = params.get("rope_high_freq_factor") or 4.0
        if "rope_scaling_factor" not in params:
            log.warning("params.json: use_scaled_rope with no rope_scaling_factor: using Llama 3.1's "
                        "factor 8 (Llama 3.2 1B/3B use 32; their HF config.json says so)")
        scaling = {"rope_type": "llama3", "factor": float(factor), "low_freq_factor": 1.0,
                   "high_freq_factor": float(high), "original_max_position_embeddings": 8192}
    vocab = params.get("vocab_size", -1)
    if vocab == -1:
        # No tokenizer beside the weights: the embedding is the only other record of V.
        vocab = tokenizer_vocab if tokenizer_vocab is not None else embedding_rows
    return LlamaConfig(
        dim=_require(params, "dim"),
        n_layers=_require(params, "n_layers"),
        n_heads=_require(params, "n_heads"),
        n_kv_heads=params.get("n_kv_heads"),
        vocab_size=vocab,
        multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),   # hidden_dim follows from these two
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        # Not in Meta's params.json: Llama 3's context (a 128k vocab) is 8192, Llama 2's 4096.
        max_seq_len=params.get("max_seq_len", 8192 if vocab >= 100_000 else 4096),
        tie_embeddings=False,
    )


def meta_concat_dim(name: str, model_dim: Optional[int], shard_shape: Tuple[int, ...]) -> Optional[int]:
    """How Meta's model-parallel code split a tensor across consolidated.*.pth shards.

    ColumnParallelLinear splits its output rows (0); RowParallelLinear splits its input columns
    (1); norms are replicated (None). The embedding differs by generation: Llama 2's
    ParallelEmbedding splits the model dim (1), Llama 3's VocabParallelEmbedding the vocab (0).
    The shard's shape tells which: a shard that holds whole rows of width `model_dim` was split on 0.
    """
    if name == "tok_embeddings.weight":
        return 0 if shard_shape[1] == model_dim else 1
    if name == "output.weight" or name.endswith(("attention.wq.weight", "attention.wk.weight",
                                                 "attention.wv.weight", "feed_forward.w1.weight",
                                                 "feed_forward.w3.weight")):
        return 0
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    return None


def merge_meta_shards(shards: List[Dict[str, torch.Tensor]], shard_names: List[str],
                      model_dim: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """One state dict from the model-parallel shards (in rank order); `model_dim` is params.json's dim."""
    if len(shards) == 1:
        return dict(shards[0])
    for shard, shard_name in zip(shards[1:], shard_names[1:]):
        if set(shard) != set(shards[0]):
            diff = sorted(set(shard) ^ set(shards[0]))[:5]
            raise ValueError(f"{shard_name} holds other tensors than {shard_names[0]} (e.g. {diff})")
    merged = {}
    for name, first in shards[0].items():
        dim = meta_concat_dim(name, model_dim, tuple(first.shape))
        if dim is None:
            merged[name] = first
            continue
        parts = [s[name] for s in shards]
        try:
            merged[name] = torch.cat(parts, dim=dim)
        except RuntimeError:
            shapes = [tuple(p.shape) for p in parts]
            raise ValueError(f"tensor '{name}' cannot be joined on dim {dim}: "
                             f"shard shapes {shapes}") from None
    return merged
