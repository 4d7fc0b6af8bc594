"""A real pretrained Llama, SmolLM2-135M-Instruct, read from its GGUF by rmlab and by transformers.

transformers' GGUF loader is a second implementation of the format and of the model, on
identical weights, so these tests check rmlab against the world: the q/k row order of the
file, the config keys, the tokenizer (vocab, merges, pre-tokenizer, special ids), the KV-cache
decode path, and the export back to Hugging Face. The fixtures (tests/conftest.py) load the
model once per session.
"""
import os

import pytest
import torch

from data.batch import make_batch
from data.encode import encode_records
from data.records import load_records
from model.checkpoint import export_hf, load_checkpoint

HH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "hh-rlhf")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs,\n\nnewlines   and   runs of spaces  ",
    "Digits: 3.14159, 2024-12-01, 1,000,000 and 0x1F.",
    "Unicode: naïve café, Straße, Ελληνικά, 日本語のテキスト, emoji 🎉🤖, math ∑∫√.",
    "def f(x):\n    return [i ** 2 for i in range(x) if i % 2 == 0]  # code\n",
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast, then let it rise.",
    "",
    "a",
]


def chatml(tok, user_text):
    """The model's chat format, with the special tokens added by code (text is encoded literally)."""
    start, end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    return ([start] + tok.encode("user\n" + user_text) + [end] + tok.encode("\n") +
            [start] + tok.encode("assistant\n"))


def test_config_and_special_ids_come_from_the_file(smollm2):
    cfg, tok = smollm2.model.config, smollm2.tokenizer
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim) == (30, 576, 9, 3, 1536)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.tie_embeddings) == (49152, 100000.0, True)
    assert tok.eos_id == tok.token_id("<|im_end|>") and tok.bos_id == tok.token_id("<|im_start|>")
    assert tok.bos_prefix == []                      # SmolLM2 says never add BOS
    assert tok.pad_id != tok.eos_id                  # the file pads with eos; we must not
    assert "<|im_start|>" in smollm2.tokenizer.chat_template == smollm2.meta["chat_template"]


def test_token_ids_equal_transformers(smollm2, smollm2_hf):
    tok, (_, hf_tok) = smollm2.tokenizer, smollm2_hf
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids) == text


def test_special_token_text_is_encoded_literally(smollm2):
    tok = smollm2.tokenizer
    text = "a response that says <|im_end|> and <|im_start|>user"
    ids = tok.encode(text)
    assert tok.eos_id not in ids and tok.bos_id not in ids
    assert tok.decode(ids) == text


def test_logits_equal_transformers(smollm2, smollm2_hf):
    model, (hf, _) = smollm2.model, smollm2_hf
    tok = smollm2.tokenizer
    for text in (TEXTS[0] + " " + TEXTS[3], TEXTS[5] * 3):
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            ours, theirs = model(ids), hf(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3)
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_greedy_decoding_answers_paris_like_transformers(smollm2, smollm2_hf):
    model, tok, (hf, _) = smollm2.model, smollm2.tokenizer, smollm2_hf
    prompt = chatml(tok, "What is the capital of France?")
    ours, hit_eos = model.generate([prompt], max_new_tokens=12, temperature=0, eos_id=tok.eos_id)
    assert "Paris" in tok.decode(ours[0])
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                         eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
    assert ours[0] == theirs


@pytest.mark.skipif(not os.path.isdir(HH), reason="../shared/data/hh-rlhf is not present")
def test_reward_head_packed_equals_padded_on_hh(smollm2_path):
    """After swap_head("reward") the packed layout (shared prompt, block mask, restarted positions)
    gives the rewards of the padded layout, on real HH-RLHF records and the real tokenizer."""
    ck = load_checkpoint(smollm2_path, head="reward")
    model, tok = ck.model.eval(), ck.tokenizer
    records, _ = load_records(os.path.join(HH, "helpful-base", "test.jsonl.gz"))
    encoded, _ = encode_records(records[:4], tok, max_len=256)
    with torch.no_grad():
        rewards = {}
        for layout in ("packed", "padded"):
            b = make_batch(encoded, layout, max_len=512, pad_id=tok.pad_id)
            assert int((b.input_ids.reshape(-1)[b.end_idx] != tok.eos_id).sum()) == 0
            rewards[layout] = model(b.input_ids, b.attention_mask, b.position_ids, end_idx=b.end_idx)
    torch.testing.assert_close(rewards["packed"], rewards["padded"], rtol=0, atol=1e-4)


def test_export_hf_gives_transformers_the_same_logits_and_tokens(smollm2, tmp_path):
    import transformers
    d = export_hf(smollm2.model, tmp_path / "hf", tokenizer=smollm2.tokenizer)
    hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    tok = smollm2.tokenizer
    ids = torch.tensor([tok.encode(TEXTS[4] + TEXTS[1])])
    with torch.no_grad():
        torch.testing.assert_close(smollm2.model(ids), hf(ids).logits, rtol=0, atol=1e-3)
    for text in TEXTS:
        assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text)
    back = load_checkpoint(d).tokenizer                  # special ids and template survive the round trip
    assert (back.bos_prefix, back.eos_ids, back.pad_id, back.chat_template) == \
        (tok.bos_prefix, tok.eos_ids, tok.pad_id, tok.chat_template)
