"""LlamaConfig: the shapes of a Llama, with Meta's field names, and named presets."""
import numbers
import sys
from dataclasses import asdict, dataclass, fields
from typing import Optional

# RoPE scalings the model implements (the math: model/llama.py, rope_frequencies), and the fields
# each one needs (all of them, nothing else).
ROPE_SCALINGS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Meta's rule for the SwiGLU width: 2/3 of 4*dim, optionally scaled, rounded up.

    Llama-2-7B: 4*4096 = 16384 -> 10922 -> rounded up to a multiple of 256 = 11008.
    """
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class LlamaConfig:
    dim: int = 128                      # model width D
    n_layers: int = 4                   # transformer blocks
    n_heads: int = 4                    # query heads
    n_kv_heads: Optional[int] = None    # key/value heads for GQA (None = n_heads, plain MHA)
    vocab_size: int = 1024              # tokenizer pieces V
    hidden_dim: Optional[int] = None    # SwiGLU width (None = from multiple_of, ffn_dim_multiplier)
    multiple_of: int = 32               # SwiGLU width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None  # optional scale of the SwiGLU width (Llama 2 70B, Llama 3)
    norm_eps: float = 1e-5              # RMSNorm epsilon
    rope_theta: float = 10000.0         # RoPE base frequency
    rope_scaling: Optional[dict] = None # {"rope_type": "linear" | "llama3", ...ROPE_SCALINGS fields} or None
    head_dim: Optional[int] = None      # per-head width (None = dim // n_heads; some checkpoints differ)
    max_seq_len: int = 128              # the context it was made for (RoPE has no table limit)
    tie_embeddings: bool = False        # LM head shares the token embedding matrix

    def __post_init__(self):
        # Checked here once for every file format: a zero, a negative or a string from a corrupt
        # file would otherwise fail deep inside the model (or give NaN) instead of naming its field.
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of",
                     "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                      or not 0 < value < 2 ** 63):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("ffn_dim_multiplier", "norm_eps", "rope_theta"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not 0 < value <= sys.float_info.max):     # NaN, inf fail too
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields: {unknown}")
        return cls(**d)


def check_rope_scaling(scaling: dict):
    """Raises ValueError unless `scaling` is exactly one of ROPE_SCALINGS with numeric fields."""
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {scaling!r}")
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope_type {kind!r} is not supported; supported: {sorted(ROPE_SCALINGS)} (or none)")
    need = {"rope_type", *ROPE_SCALINGS[kind]}
    if set(scaling) != need:
        raise ValueError(f"{kind} RoPE scaling takes exactly the fields {sorted(need)}, got "
                         f"{sorted(scaling)}")
    for key in ROPE_SCALINGS[kind]:
        value = scaling[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{kind} RoPE scaling field {key!r} must be a positive number, got {value!r}")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(f"llama3 RoPE scaling needs high_freq_factor > low_freq_factor, got {scaling}")


PRESETS = {
    # Tests: runs in milliseconds.
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=160,
                 max_seq_len=128),
    # `python train.py`: about 1M parameters, trains on 2 CPU cores in minutes.
    "default": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1024, hidden_dim=352,
                    max_seq_len=128),
    # Real-data runs on CPU (HH-RLHF): wider, longer context.
    "small": dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=4096, hidden_dim=704,
                  max_seq_len=512),
    # Llama-2-7B's real shapes (Touvron et al. 2023, Table 1 / params.json): 6,738,415,616 parameters.
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000,
                      multiple_of=256, norm_eps=1e-5, max_seq_len=4096),
}


def get_preset(name: str, **overrides) -> LlamaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})
