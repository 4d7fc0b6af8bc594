"""A minimal Llama with a swappable head.

    tokens ─> tok_embeddings ─> n_layers × [RMSNorm ─> GQA attention (RoPE) ─> + ─> RMSNorm ─> SwiGLU ─> +]
           ─> (final) norm ─> head

The head is either
  "lm":     Linear(D, V), no bias           -> next-token logits        (B, T, V)
  "reward": Linear(D, 1) with a bias        -> one scalar per sequence  (B,) or (R,)
The scalar head is read only where it is used: at the last attended token of a row (the EOS
that data/ appends), or at the flat positions `end_idx` of a packed row. It is never applied
to all T positions on the reward path (PPO's value model calls `values()` for that).

Layouts: padding masks, left or right padding, and packed rows with a block mask all go
through the same code, because positions and masks are passed in. In a padded batch only
attention sees the padding; every other op runs on the real tokens alone (Unpadded).

RoPE layout: Meta's, with dims (2i, 2i+1) of a head rotated together. Hugging Face
checkpoints use rotate-half (i, i + hd/2); model/checkpoint.py permutes wq/wk on import and
export.

Parameter names follow Meta's `llama/model.py`, except that the output layer is `head`
(the swappable part) instead of `output`.
"""
import logging
import math
import warnings
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LlamaConfig

log = logging.getLogger("rmlab.model")

HEADS = ("lm", "reward")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # In fp32 whatever the input dtype: the mean of squares underflows in bf16.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # Under autocast the next op is a bf16 matmul: cast once here, not once per projection
        # (q, k, v, w1, w3 would each cast the fp32 residual; 6% of a bf16 forward on CPU).
        return (x32 * self.weight.float()).to(matmul_dtype(x))


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls that read x run in: autocast's when it is on (bf16), else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[dict] = None) -> torch.Tensor:
    """The (hd/2,) float64 angular speeds theta^(-2i/hd) of RoPE, rescaled when `scaling` says so.

    linear (position interpolation, Chen et al. 2023): every speed divided by `factor`, so
    position p turns like position p / factor did.
    llama3 (Llama 3.1 / 3.2): a speed whose wavelength 2*pi/f is longer than original_max /
    low_freq_factor (it never completed a turn in the original context) is divided by `factor`;
    one shorter than original_max / high_freq_factor (many turns) is kept; between the two, a
    linear blend in original_max / wavelength. See model/config.py ROPE_SCALINGS for the fields.
    """
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return freqs
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return freqs / factor
    old_len = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelength = 2 * math.pi / freqs
    blend = ((old_len / wavelength - low) / (high - low)).clamp(0.0, 1.0)   # 0 = divide, 1 = keep
    return (1 - blend) * freqs / factor + blend * freqs


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float, scaling: Optional[dict] = None):
    """The rotations e^(i * pos * f_i) for the speeds of rope_frequencies, as complex64.
    positions (...) -> (..., hd/2)."""
    freqs = rope_frequencies(head_dim, theta, scaling).to(positions.device)
    angles = positions.to(torch.float64)[..., None] * freqs
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x, rotations):
    """Rotates interleaved pairs (x[2i], x[2i+1]) by the angle of their position, in fp32 (as Meta's
    reference does) whatever x's dtype. A pair is one complex number, so the rotation is one
    complex multiply: 5x faster on CPU than cos/sin products and a stack (measured at SmolLM2's shape).

    x (..., H, hd); rotations (..., hd/2) complex, one per position -> (..., H, hd)
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))              # (..., H, hd/2)
    return torch.view_as_real(pairs * rotations[..., None, :]).flatten(-2).type_as(x)


class Unpadded(NamedTuple):
    """The real tokens of a padded (B, T) batch: their flat positions `index` (n_real,) into B*T.

    Norms, projections and the MLP (most of a step's FLOPs) run on the n_real real tokens only;
    attention alone needs the (B, T) layout back. A third of an HH batch at 256 tokens is padding,
    over half at 512: an RM step at SmolLM2's shape ran 1.4x faster (README, bench/bench_vs_hf.py).
    """
    index: torch.Tensor
    B: int
    T: int

    def unpad(self, x):
        """(B, T, ...) -> (n_real, ...)"""
        return x.flatten(0, 1)[self.index]

    def pad(self, x):
        """(n_real, ...) -> (B, T, ...), with zeros in the padding slots."""
        padded = x.new_zeros(self.B * self.T, *x.shape[1:]).index_copy(0, self.index, x)
        return padded.unflatten(0, (self.B, self.T))


def repeat_kv(x, n_rep: int):
    """(B, n_kv, T, hd) -> (B, n_kv * n_rep, T, hd): each kv head serves n_rep query heads."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


class KVCache(nn.Module):
    """Keys and values of the tokens decoded so far, for one layer. Allocated by generate()."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k, v):
        """Writes k, v (B, n_kv, t, hd) at [start, start+t) and returns the filled prefix."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.cache: Optional[KVCache] = None

    def forward(self, x, rotations, mask, cache_start: Optional[int] = None,
                unpadded: Optional[Unpadded] = None):
        """x (B, T, D) and rotations (B, T, hd/2); or, with `unpadded`, both hold the real tokens
        only, (n_real, D) and (n_real, hd/2), and q, k, v return to (B, T) for attention, with zeros
        in the padding slots, which no real query sees (causality hides right padding, `mask` the
        rest). mask: None (causal) or additive (B, 1, T, S)."""
        q = self.wq(x).unflatten(-1, (self.n_heads, self.head_dim))     # (B, T, H, hd) or (n_real, H, hd)
        k = self.wk(x).unflatten(-1, (self.n_kv_heads, self.head_dim))  # (B, T, Hkv, hd) or (n_real, Hkv, hd)
        v = self.wv(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        q, k = apply_rope(q, rotations), apply_rope(k, rotations)
        if unpadded is not None:
            q, k, v = (unpadded.pad(t) for t in (q, k, v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)           # (B, H|Hkv, T, hd)
        if cache_start is not None:
            k, v = self.cache.update(cache_start, k, v)                              # (B, Hkv, S, hd)
        if x.device.type == "cpu":  # the CPU kernel reads each kv head in place for its query heads
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        else:                       # CUDA's kernel that takes a mask (memory-efficient) does not
            n_rep = self.n_heads // self.n_kv_heads
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)                           # (B, H, S, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        y = y.transpose(1, 2).flatten(2)                                             # (B, T, H*hd)
        return self.wo(y if unpadded is None else unpadded.unpad(y))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, rotations, mask, cache_start=None, unpadded=None):
        x = x + self.attention(self.attention_norm(x), rotations, mask, cache_start, unpadded)
        return x + self.feed_forward(self.ffn_norm(x))


def check_mask(attention_mask, position_ids, B: int, T: int):
    """Refuses a mask or positions of another shape (a (1, T) mask was broadcast over B rows and
    read the wrong tokens), a float (B, T) mask that is not 0/1 and a (B, T, T) mask that is not
    bool (an additive 0/-inf mask, read as 0 = padding)."""
    if attention_mask is not None:
        if tuple(attention_mask.shape) not in ((B, T), (B, T, T)):
            raise ValueError(f"attention_mask must be (B, T) = ({B}, {T}) or (B, T, T), "
                             f"got {tuple(attention_mask.shape)}")
        if attention_mask.dim() == 3 and attention_mask.dtype != torch.bool:
            raise ValueError(f"a (B, T, T) attention_mask is bool (True = may attend), "
                             f"got {attention_mask.dtype}")
        # float masks only (an additive mask is float): the checks here cost no host sync for the
        # bool and long masks of data/batch.py
        if attention_mask.dim() == 2 and attention_mask.is_floating_point() and not bool(
                ((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("a (B, T) attention_mask holds 1 for a real token and 0 for padding "
                             "(not an additive 0/-inf mask)")
    if position_ids is not None and tuple(position_ids.shape) != (B, T):
        raise ValueError(f"position_ids must be (B, T) = ({B}, {T}), got {tuple(position_ids.shape)}")


def attention_bias(attention_mask: Optional[torch.Tensor], T: int) -> Optional[torch.Tensor]:
    """The boolean (B, 1, T, T) mask SDPA takes (True = may attend), or None for plain causal.

    attention_mask (B, T) 0/1: causal AND key is real; None when every row is right-padded (or
    not padded): then causality alone keeps every padding key from every real query, and SDPA's
    causal kernel skips the upper triangle instead of reading a (B, T, T) mask. Real positions
    get the same numbers, bit for bit (tests/test_model.py); padding queries, whose outputs
    nothing reads, then see earlier padding too.
    attention_mask (B, T, T) bool: used as given (a packed row's block mask).
    Every query may always see itself, so a padding query never has an empty row (NaN);
    real queries see themselves anyway under any causal mask.
    """
    if attention_mask is None:
        return None
    device = attention_mask.device
    if attention_mask.dim() == 3:
        allowed = attention_mask.bool()
    elif bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        return None                                                                  # right padding
    else:
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        allowed = causal[None] & attention_mask.bool()[:, None, :]                 # (B, T, T)
    return (allowed | torch.eye(T, dtype=torch.bool, device=device))[:, None]       # (B, 1, T, T)


def default_positions(attention_mask: Optional[torch.Tensor], B: int, T: int, device) -> torch.Tensor:
    """Position ids (B, T): count of real tokens before each one, so left padding is harmless."""
    if attention_mask is not None and attention_mask.dim() == 2:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if attention_mask is not None:
        raise ValueError("a (B, T, T) attention mask needs explicit position_ids (packed rows restart them)")
    return torch.arange(T, device=device).expand(B, T)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig, head: str = "lm"):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self._set_head(head)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # GPT-2's scaled init of the residual projections keeps the residual stream's scale fixed in depth.
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))
        self._tie()

    # ---- heads -----------------------------------------------------------------------------

    def _set_head(self, kind: str):
        """A freshly initialised, untied head of `kind`, on the embedding's device and dtype."""
        if kind not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {kind!r}")
        D, V = self.config.dim, self.config.vocab_size
        head = nn.Linear(D, V, bias=False) if kind == "lm" else nn.Linear(D, 1, bias=True)
        nn.init.normal_(head.weight, mean=0.0, std=0.02)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
        self.head_kind = kind
        self.head = head.to(self.tok_embeddings.weight.device, self.tok_embeddings.weight.dtype)

    def _tie(self):
        if self.head_kind == "lm" and self.config.tie_embeddings:
            self.head.weight = self.tok_embeddings.weight

    def swap_head(self, kind: str) -> List[str]:
        """Replaces the head with a freshly initialised one of `kind`; the trunk is untouched.

        Returns (and logs) the names of the newly initialised parameters, like HF's warning.
        """
        self._set_head(kind)
        self._tie()
        # a tied head *is* the trained embedding
        new = [f"head.{n}" for n, p in self.head.named_parameters() if p is not self.tok_embeddings.weight]
        if new:
            log.warning("Some weights were newly initialized: %s", new)
        return new

    # ---- the trunk -------------------------------------------------------------------------

    def rope(self, position_ids):
        """RoPE's rotations (B, T, hd/2) complex for position ids (B, T): training, packed rows, decode."""
        cfg = self.config
        return rope_tables(cfg.head_dim, position_ids, cfg.rope_theta, cfg.rope_scaling)

    def trunk(self, input_ids, attention_mask=None, position_ids=None, final_norm: bool = True):
        """Hidden states (B, T, D) of every position; after the final RMSNorm unless final_norm=False."""
        h = self.blocks(self.tok_embeddings(input_ids), attention_mask, position_ids)
        return self.norm(h) if final_norm else h

    def blocks(self, h, attention_mask=None, position_ids=None, first: int = 0, last: Optional[int] = None):
        """Runs blocks first..last-1 on h (B, T, D), the input of block `first` (the embeddings for
        0), and returns their output (B, T, D), before the final norm (zeros at the padding of a
        (B, T) attention_mask, which the blocks skip). trunk() is blocks 0..n-1 on the embeddings;
        data/features.py runs the frozen lower blocks once and the top ones per step."""
        B, T, _ = h.shape
        check_mask(attention_mask, position_ids, B, T)
        if position_ids is None:
            position_ids = default_positions(attention_mask, B, T, h.device)
        rotations = self.rope(position_ids)
        mask = attention_bias(attention_mask, T)
        if mask is not None:
            # SDPA turns a boolean mask into an additive one in every layer: do it once here
            # (5% of a bf16 forward at SmolLM2's shape on CPU). 0 = may attend, -inf = may not.
            additive = torch.zeros(mask.shape, dtype=matmul_dtype(h), device=h.device)
            mask = additive.masked_fill_(~mask, float("-inf"))                       # (B, 1, T, T)
        unpadded = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            unpadded = Unpadded(attention_mask.flatten().nonzero().squeeze(1), B, T)
            h, rotations = unpadded.unpad(h), unpadded.unpad(rotations)    # (n_real, D), (n_real, hd/2)
        for layer in self.layers[first:last]:
            h = layer(h, rotations, mask, unpadded=unpadded)
        return h if unpadded is None else unpadded.pad(h)                            # (B, T, D)

    def compile_blocks(self) -> "Llama":
        """torch.compile every transformer block, in place (parameter names do not change).

        Inductor fuses what eager runs op by op around the matmuls: the norms, SwiGLU's gate, the
        residual adds and their backward. The blocks are one module class, so they share one
        compiled graph, built for any batch shape (dynamic=True): the first forward pays the
        compile once (under a minute at SmolLM2's shape on CPU). Measured: bench/bench_vs_hf.py.
        """
        # One code object serves every block, compiled once per variant it meets: padded (x is
        # (n_real, D)) or not, a mask or none, grad on or off, a batch of 1 or more (dynamo
        # specialises 1). Past dynamo's default limit of 8 the rest would run eagerly, silently.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        for layer in self.layers:
            layer.compile(dynamic=True)
        return self

    @staticmethod
    def last_token_idx(attention_mask, B: int = None, T: int = None) -> torch.Tensor:
        """Flat positions (B,) into (B*T) of each row's last attended token."""
        if attention_mask is None:
            return torch.arange(B) * T + (T - 1)
        if attention_mask.dim() != 2:
            raise ValueError("rows with a (B, T, T) mask hold several responses: pass end_idx")
        B, T = attention_mask.shape
        last = T - 1 - attention_mask.long().flip(-1).argmax(-1)                    # (B,)
        return torch.arange(B, device=attention_mask.device) * T + last

    def score_hidden(self, h_prenorm, end_idx):
        """The scalar head on the gathered rows only: (B, T, D) pre-norm, (R,) -> (R,) fp32."""
        return self.values(h_prenorm.reshape(-1, h_prenorm.shape[-1])[end_idx])      # the (R, D) rows

    def values(self, h_prenorm):
        """Final norm and scalar head at every position (PPO's value model): (..., D) -> (...) fp32.
        In fp32 even under bf16 autocast: a reward is one dot product per row (cheap), and bf16's
        8 mantissa bits would round rewards near 8 to steps of 1/32."""
        with torch.autocast(h_prenorm.device.type, enabled=False):
            x = self.norm(h_prenorm.float())
            return F.linear(x, self.head.weight.float(), self.head.bias.float()).squeeze(-1)

    def forward(self, input_ids, attention_mask=None, position_ids=None, end_idx=None, eos_id=None):
        """LM head: logits (B, T, V). Reward head: rewards (B,) or, with end_idx, (R,).

        With `eos_id`, a reward read at a token that is not EOS (a sample cut at the length
        limit) triggers a warning that says how many.
        """
        if self.head_kind == "lm":
            return self.head(self.trunk(input_ids, attention_mask, position_ids))
        B, T = input_ids.shape
        h = self.trunk(input_ids, attention_mask, position_ids, final_norm=False)   # (B, T, D)
        if end_idx is None:
            end_idx = self.last_token_idx(attention_mask, B, T).to(input_ids.device)
        if eos_id is not None:
            n_missing = int((input_ids.reshape(-1)[end_idx] != eos_id).sum())
            if n_missing:
                warnings.warn(f"{n_missing} of {len(end_idx)} rewards read at a token that is not EOS "
                              "(sequence cut at the length limit)")
        return self.score_hidden(h, end_idx)

    # ---- generation --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: List[List[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, eos_id: Optional[int] = None, pad_id: int = 0,
                 generator: Optional[torch.Generator] = None) -> Tuple[List[List[int]], List[bool]]:
        """Samples continuations of `prompts` with a KV cache.

        Prompts are left-padded into one batch. Returns the new tokens per prompt (EOS
        included when hit) and whether each stopped at EOS. temperature=0 is greedy.
        """
        if self.head_kind != "lm":
            raise ValueError("generate() needs the LM head")
        # An empty prompt has nothing to predict from; a negative temperature inverts the distribution.
        if not prompts or not all(prompts) or max_new_tokens < 0:
            raise ValueError(f"generate() needs non-empty prompts (a BOS at least) and max_new_tokens >= 0, "
                             f"got {len(prompts)} prompts, lengths {sorted({len(p) for p in prompts})[:3]}, "
                             f"max_new_tokens {max_new_tokens}")
        if not (temperature >= 0 and 0 < top_p <= 1):
            raise ValueError(f"generate() needs temperature >= 0 and top_p in (0, 1], "
                             f"got {temperature}, {top_p}")
        device = self.tok_embeddings.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        S = P + max_new_tokens
        ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
        key_real = torch.zeros(B, S, dtype=torch.bool, device=device)               # real cache slots
        for b, p in enumerate(prompts):
            ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
            key_real[b, P - len(p):P] = True
        for layer in self.layers:
            layer.attention.cache = KVCache(B, self.config.n_kv_heads, S, self.config.head_dim,
                                            self.tok_embeddings.weight.dtype, device)
        try:
            # Prefill: the whole prompt at once.
            pos = (key_real[:, :P].long().cumsum(-1) - 1).clamp(min=0)               # (B, P)
            mask = attention_bias(key_real[:, :P].long(), P)
            logits = self._step(ids, pos, mask, cache_start=0)[:, -1]               # (B, V)
            next_pos = pos[:, -1] + 1                                               # (B,)
            out = [[] for _ in range(B)]
            done = torch.zeros(B, dtype=torch.bool, device=device)
            for t in range(max_new_tokens):
                token = sample_token(logits, temperature, top_p, generator)         # (B,)
                for b in range(B):
                    if not done[b]:
                        out[b].append(int(token[b]))
                if eos_id is not None:
                    done |= token == eos_id
                if bool(done.all()) or t == max_new_tokens - 1:
                    break
                key_real[:, P + t] = True
                mask = key_real[:, None, None, :P + t + 1]                           # (B, 1, 1, S_t)
                logits = self._step(token[:, None], next_pos[:, None], mask, cache_start=P + t)[:, -1]
                next_pos = next_pos + 1
        finally:
            for layer in self.layers:
                layer.attention.cache = None
        return out, [eos_id is not None and len(o) > 0 and o[-1] == eos_id for o in out]

    def _step(self, ids, pos, mask, cache_start):
        rotations = self.rope(pos)
        h = self.tok_embeddings(ids)
        for layer in self.layers:
            h = layer(h, rotations, mask, cache_start)
        return self.head(self.norm(h[:, -1:])).float()                              # only the last position


def sample_token(logits, temperature: float, top_p: float, generator=None):
    """One token per row from (B, V) logits: greedy at temperature 0, else top-p (nucleus) sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p             # the mass before it
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
