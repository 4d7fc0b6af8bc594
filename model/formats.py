"""Hugging Face and Meta Llama checkpoint directories: reading them, and exporting ours to HF.

Pure translations (names, q/k row order, configs) live in model/interop.py; this file reads
and writes the files, and every failure names the file.

Export to HF and the reward bias. HF's LlamaForSequenceClassification has `score` without a
bias; ours has one. export_hf writes a non-zero bias to `rmlab_reward_bias.json` (and logs a
warning), and the HF reader reads it back, so export followed by import is exact. HF tools
return our reward minus that constant: rankings, pairwise differences and Bradley-Terry
probabilities are unchanged.
"""
import dataclasses
import glob
import logging
import os
from typing import Optional

import torch
from safetensors.torch import save_file

from . import interop
from .files import (CheckpointError, atomic_dir, check_tensors, read_json, read_safetensors, read_tokenizer,
                    read_torch, weights_to_save, write_json)
from .llama import Llama

log = logging.getLogger("rmlab.checkpoint")

REWARD_BIAS = "rmlab_reward_bias.json"
HF_CONFIG, META_PARAMS = "config.json", "params.json"
HF_TOKENIZER, SP_TOKENIZER = "tokenizer.json", "tokenizer.model"
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                   "pytorch_model.bin", "pytorch_model.bin.index.json")
# Every file a loader of any format reads. A save into an existing directory replaces them all,
# so that none left from an earlier save (a chat_template.jinja, our rmlab.json beside an HF
# export, which load_checkpoint reads first) can win on reload; other files are kept.
CHECKPOINT_FILES = ("rmlab.json", "train_state.pt", HF_CONFIG, META_PARAMS, "consolidated.*.pth",
                    *HF_WEIGHT_FILES, "model-*-of-*.safetensors", "pytorch_model-*-of-*.bin", SP_TOKENIZER,
                    HF_TOKENIZER, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "generation_config.json", REWARD_BIAS)


# ---- Hugging Face ----------------------------------------------------------------------------------

def _read_hf_weights(d: str, device: str):
    """All tensors of an HF dir (HF names), the file that stands for them, and which shard holds each."""
    present = [f for f in HF_WEIGHT_FILES if os.path.isfile(os.path.join(d, f))]
    if not present:
        raise CheckpointError(f"{os.path.join(d, HF_CONFIG)}: found, but no weights beside it "
                              f"(looked for {', '.join(HF_WEIGHT_FILES)})")
    path = os.path.join(d, present[0])  # HF's own preference order
    read = lambda p: (read_safetensors if p.endswith(".safetensors") else read_torch)(p, device)
    if not path.endswith(".index.json"):
        return read(path), path, {}
    weight_map = read_json(path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: field 'weight_map' is missing or not an object")
    if not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: field 'weight_map' must map tensor names to shard file names")
    tensors, located = {}, {}
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{path}: shard name {shard!r} is not a file name in this directory")
        shard_path = os.path.join(d, shard)
        part = read(shard_path)
        for name in [n for n, s in weight_map.items() if s == shard]:
            if name not in part:
                raise CheckpointError(f"{shard_path}: tensor '{name}' listed in {path} is not in the file")
        for name, t in part.items():
            if name in tensors:
                raise CheckpointError(f"{shard_path}: tensor '{name}' is also in {located[name]}")
            tensors[name], located[name] = t, shard_path
    return tensors, path, located


def read_hf(d: str, device: str):
    config_path = os.path.join(d, HF_CONFIG)
    hf_config = read_json(config_path)
    try:
        cfg, head = interop.config_from_hf(hf_config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    tensors, where, located = _read_hf_weights(d, device)
    if head is None:  # no `architectures` field: the tensors say which head
        head = "reward" if "score.weight" in tensors else "lm"
    # A "tied" head stored with values of its own: transformers then keeps it untied (with a
    # warning); so do we, rather than silently compute with the embedding instead.
    emb, lm_head = tensors.get("model.embed_tokens.weight"), tensors.get("lm_head.weight")
    if (cfg.tie_embeddings and head == "lm" and lm_head is not None and emb is not None
            and not torch.equal(emb, lm_head)):
        log.warning("%s: tie_word_embeddings is true but lm_head.weight differs from the embedding; "
                    "loading the stored head untied, as transformers does", where)
        cfg = dataclasses.replace(cfg, tie_embeddings=False)
    if cfg.tie_embeddings and head == "lm" and emb is None and lm_head is not None:
        # the tied pair saved under the head's name (safetensors' save_model keeps the first name
        # in sorted order): transformers ties it to the embedding, and so do we
        tensors = {("model.embed_tokens.weight" if n == "lm_head.weight" else n): t
                   for n, t in tensors.items()}
    # Tensors HF's own loader ignores as well: RoPE frequencies (older saves) and a tied head's copy.
    tensors = {n: t for n, t in tensors.items()
               if not n.endswith("rotary_emb.inv_freq")
               and not (n == "lm_head.weight" and cfg.tie_embeddings)}
    sd, unknown = interop.rename(tensors, lambda n: interop.hf_to_ours_name(n, head))
    if head == "reward":
        sd["head.bias"] = _read_reward_bias(d, sd.get("head.weight"))
        eos, pad = hf_config.get("eos_token_id"), hf_config.get("pad_token_id")
        if pad is not None and pad in (eos if isinstance(eos, list) else [eos]):
            log.warning("%s: pad_token_id is an eos id: transformers reads this model's reward at the "
                        "last token that is not EOS, rmlab at the EOS it appends; its rewards will differ",
                        config_path)
    check_tensors(sd, unknown, cfg, head, where, lambda n: interop.ours_to_hf_name(n, head), located)
    sd = interop.permute_qk(sd, cfg, to_hf=False)
    names = [n for n in (HF_TOKENIZER, SP_TOKENIZER) if os.path.isfile(os.path.join(d, n))]
    tok = optional_tokenizer(d) if names else None
    if not names:
        log.warning("%s: no tokenizer.json or tokenizer.model beside the weights; loading without a "
                    "tokenizer", d)
    return cfg, head, sd, tok, {"source_format": "hf", "source_path": d}


def optional_tokenizer(path: str):
    """The tokenizer at `path`, or None with a warning: an unreadable tokenizer never blocks the weights."""
    try:
        return read_tokenizer(path)
    except CheckpointError as e:
        log.warning("%s Loading the weights without a tokenizer (pass one with --tokenizer).",
                    str(e).rstrip("."))
        return None


def _read_reward_bias(d: str, score_weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Our reward head's bias: 0 (HF's score has none) unless export_hf stored one beside it."""
    dtype = score_weight.dtype if score_weight is not None else torch.float32
    device = score_weight.device if score_weight is not None else "cpu"
    path = os.path.join(d, REWARD_BIAS)
    if not os.path.isfile(path):
        return torch.zeros(1, dtype=dtype, device=device)
    stored = read_json(path)
    if not isinstance(stored.get("bias"), (int, float)):
        raise CheckpointError(f"{path}: field 'bias' is missing or not a number")
    named = getattr(torch, str(stored.get("dtype", "")), None)  # a floating dtype's name, or the weight's
    dtype = named if isinstance(named, torch.dtype) and named.is_floating_point else dtype
    return torch.tensor([float(stored["bias"])], dtype=dtype, device=device)


def export_hf(model: Llama, out_dir, tokenizer=None) -> str:
    """Writes an HF LlamaForCausalLM (LM head) or LlamaForSequenceClassification (reward head) dir:
    config.json (config_to_hf), model.safetensors (HF names, rotate-half q/k rows), the tokenizer's
    files (save_tokenizer) and a non-zero reward bias (see the module docstring). Atomic like
    save_checkpoint. Returns the directory's path."""
    cfg, head = model.config, model.head_kind
    sd = weights_to_save(model)
    bias = sd.pop("head.bias", None)
    hf_tensors = {interop.ours_to_hf_name(n, head): t
                  for n, t in interop.permute_qk(sd, cfg, to_hf=True).items()}
    if tokenizer is None:   # ids unknown: say so (null), except pad, without which HF refuses batches > 1
        log.warning("export_hf without a tokenizer: bos/eos ids written as null, pad_token_id as 0")
        ids = dict(bos_id=None, eos_id=None, pad_id=0)
    else:
        eos = tokenizer.eos_ids if len(tokenizer.eos_ids) > 1 else tokenizer.eos_id
        ids = dict(bos_id=tokenizer.bos_id, eos_id=eos, pad_id=tokenizer.pad_id)
    hf_config = interop.config_to_hf(cfg, head, model.tok_embeddings.weight.dtype, **ids)
    with atomic_dir(out_dir, CHECKPOINT_FILES) as tmp:
        save_file(hf_tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        write_json(os.path.join(tmp, HF_CONFIG), hf_config)
        if tokenizer is not None:
            save_tokenizer(tmp, tokenizer, cfg.max_seq_len)
        if bias is not None and float(bias) != 0.0:
            log.warning("HF's score layer has no bias: reward bias %.6g stored in %s; HF tools will "
                        "read rewards lower by that constant (rankings unchanged)", float(bias), REWARD_BIAS)
            write_json(os.path.join(tmp, REWARD_BIAS), {
                "bias": float(bias), "dtype": str(bias.dtype).removeprefix("torch."),
                "note": "rmlab reward = LlamaForSequenceClassification score + bias"})
    return os.path.abspath(os.fspath(out_dir))


def save_tokenizer(d: str, tokenizer, max_len: Optional[int] = None):
    """tokenizer.json or tokenizer.model, a tokenizer_config.json naming the special tokens and the
    chat template, and a generation_config.json listing every eos id: what load_tokenizer(d) and
    transformers' AutoTokenizer read back."""
    add_bos = tokenizer.bos_prefix == [tokenizer.bos_id]
    if tokenizer.kind == "tokenizers":
        backend = tokenizer.tk
        adds_bos = backend.encode("a", add_special_tokens=True).ids[:1] == [tokenizer.bos_id]
        if add_bos and not adds_bos:
            # PreTrainedTokenizerFast adds BOS only through the post-processor (GGUF-built tokenizers
            # have none), so write one that does, or HF tools would score sequences without BOS.
            from tokenizers import Tokenizer as Backend, processors
            backend = Backend.from_str(backend.to_str())
            bos = backend.id_to_token(tokenizer.bos_id)
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)])
        with open(os.path.join(d, HF_TOKENIZER), "w", encoding="utf-8") as f:
            f.write(backend.to_str())
        piece, unk = tokenizer.tk.id_to_token, tokenizer.unk_id
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    else:
        with open(os.path.join(d, SP_TOKENIZER), "wb") as f:
            f.write(tokenizer.model_proto())
        piece, unk = tokenizer.sp.id_to_piece, tokenizer.sp.unk_id()
        config = {"tokenizer_class": "LlamaTokenizer", "legacy": True}
    config.update({
        "add_bos_token": add_bos,
        "add_eos_token": False,   # the reward is read at an EOS the caller appends
        "bos_token": piece(tokenizer.bos_id) if tokenizer.bos_id is not None else None,
        "eos_token": piece(tokenizer.eos_id), "pad_token": piece(tokenizer.pad_id),
        "unk_token": piece(unk) if unk is not None and unk >= 0 else None})
    if max_len:
        config["model_max_length"] = max_len
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    write_json(os.path.join(d, "tokenizer_config.json"), config)
    write_json(os.path.join(d, "generation_config.json"), {"eos_token_id": tokenizer.eos_ids})


# ---- Meta ------------------------------------------------------------------------------------------

def read_meta(d: str, device: str):
    params_path = os.path.join(d, META_PARAMS)
    params = read_json(params_path)
    shard_paths = sorted(glob.glob(os.path.join(d, "consolidated.*.pth")))
    expected = [os.path.join(d, f"consolidated.{i:02d}.pth") for i in range(len(shard_paths))]
    if not shard_paths:
        raise CheckpointError(f"{params_path}: found, but no consolidated.*.pth beside it")
    if shard_paths != expected:
        raise CheckpointError(f"{d}: model-parallel shards must be consolidated.00.pth .. "
                              f"consolidated.{len(shard_paths) - 1:02d}.pth, found "
                              f"{[os.path.basename(p) for p in shard_paths]}")
    # Meta's download keeps tokenizer.model one level above the model directories. Llama 3's is a
    # tiktoken file, which we do not read: a warning, and the weights load without it.
    tok_paths = [p for p in (os.path.join(d, SP_TOKENIZER),
                             os.path.join(os.path.dirname(os.path.abspath(d)), SP_TOKENIZER))
                 if os.path.isfile(p)]
    tok = optional_tokenizer(tok_paths[0]) if tok_paths else None
    shards = [read_torch(p, device) for p in shard_paths]
    try:
        merged = interop.merge_meta_shards(shards, [os.path.basename(p) for p in shard_paths],
                                           params.get("dim"))
    except ValueError as e:
        raise CheckpointError(f"{d}: {e}") from None
    merged.pop("rope.freqs", None)  # Meta's precomputed RoPE frequencies; we derive them from rope_theta
    emb = merged.get("tok_embeddings.weight")
    try:
        cfg = interop.config_from_meta(params, tok.vocab_size if tok else None,
                                       emb.shape[0] if emb is not None else -1)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{params_path}: {e}") from None
    sd, unknown = interop.rename(merged, interop.meta_to_ours_name)
    where = shard_paths[0] if len(shard_paths) == 1 else os.path.join(d, "consolidated.*.pth")
    check_tensors(sd, unknown, cfg, "lm", where, interop.ours_to_meta_name)
    return cfg, "lm", sd, tok, {"source_format": "meta", "source_path": d}
