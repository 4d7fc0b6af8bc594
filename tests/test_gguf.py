"""GGUF files written here with gguf.GGUFWriter (llama.cpp's own writer), read by rmlab and by transformers.

A tiny random Llama with a byte-level BPE vocabulary: the q/k rows are stored in the order
llama.cpp's converter stores them (Meta's interleaved pairs), and transformers un-permutes them
on load, so equal logits prove both readers agree on the layout. The real SmolLM2 file, written
by llama.cpp's converter itself, is tested in tests/test_real_model.py.
"""
import numpy as np
import pytest
import torch
import transformers
from gguf import GGUFWriter

from model import Llama, LlamaConfig
from model.checkpoint import CheckpointError, load_checkpoint

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "o n", "e r"]


def byte_alphabet():
    """GPT-2's byte -> printable character map (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tokens_and_types():
    merged = ["".join(m.split(" ")) for m in MERGES]
    tokens = SPECIALS + byte_alphabet() + merged
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))


def tiny_model(vocab, seed=0, tied=False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=48,
                      rope_theta=1e4, max_seq_len=64, norm_eps=1e-5, tie_embeddings=tied)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def write_gguf(path, model, **overrides):
    """Our weights (Meta q/k order, like llama.cpp's converter) under llama.cpp's names and keys."""
    cfg = model.config
    tokens, types = tokens_and_types()
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for key, value in overrides.items():
        w.add_float32(key, value) if isinstance(value, float) else w.add_string(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")     # what transformers' GGUF reader applies whatever the key says
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)          # pad = eos, as SmolLM2's file says: rmlab must pad with something else
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    names = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
             "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
             "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
    sd = model.state_dict()
    w.add_tensor("token_embd.weight", sd["tok_embeddings.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["norm.weight"].numpy())
    if not cfg.tie_embeddings:
        w.add_tensor("output.weight", sd["head.weight"].numpy())
    for i in range(cfg.n_layers):
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{theirs}.weight", sd[f"layers.{i}.{ours}.weight"].numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_matches_transformers(tmp_path, tied):
    vocab = len(tokens_and_types()[0])
    model = tiny_model(vocab, seed=1, tied=tied)
    path = write_gguf(tmp_path / "tiny.gguf", model)
    ck = load_checkpoint(path)
    assert ck.model.config.tie_embeddings == tied and ck.meta["source_format"] == "gguf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf",
                                                           dtype=torch.float32).eval()
    ids = torch.randint(3, vocab, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs, original = ck.model(ids), hf(ids).logits, model(ids)
    torch.testing.assert_close(ours, original, rtol=0, atol=0)      # the file holds our weights exactly
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * max(1.0, float(theirs.abs().max())))


def test_tiny_gguf_tokenizer_matches_transformers(tmp_path):
    vocab = len(tokens_and_types()[0])
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(vocab))
    tok = load_checkpoint(path).tokenizer
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    for text in ["the theory in the attic", "  two  spaces\nand a newline", "naïve 日本 🎉", ""]:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False).input_ids and tok.decode(ids) == text
    assert tok.encode(" the") == [vocab - len(MERGES) + 2]            # "Ġ t" then "Ġt he": one token
    assert (tok.bos_prefix, tok.eos_ids) == ([], [2]) and tok.pad_id == 0   # pad moved off eos, to unk
    assert tok.chat_template.startswith("{% for m in messages %}")


def test_gguf_dtype_argument_casts_the_weights(tmp_path):
    vocab = len(tokens_and_types()[0])
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(vocab))
    assert load_checkpoint(path).model.tok_embeddings.weight.dtype == torch.float32
    assert load_checkpoint(path, dtype=torch.bfloat16).model.tok_embeddings.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("key,value,message", [
    ("llama.rope.scaling.type", "yarn", "rope.scaling.type' is 'yarn'"),
    ("llama.expert_count", 8.0, "mixture-of-experts"),
])
def test_gguf_keys_we_do_not_implement_are_refused(tmp_path, key, value, message):
    vocab = len(tokens_and_types()[0])
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(vocab), **{key: value})
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(path)
    assert str(e.value).startswith(path)


def test_a_file_that_is_not_gguf_names_itself(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match=f"{path}: not a readable GGUF file"):
        load_checkpoint(path)


@pytest.mark.parametrize("eos_piece", ["</s>", "<pad>"])
def test_sentencepiece_vocabulary_in_gguf_tokenizes_like_sentencepiece(tmp_path, eos_piece):
    """A "llama" (SPM) vocabulary: pieces, scores and types of a SentencePiece BPE model we train
    here, written the way llama.cpp's converter writes them, must tokenize like that model. The
    special ids are the file's, by id: a ChatML fine-tune's eos is not the piece named </s>."""
    from model import Tokenizer
    texts = [f"the {w} number {n} sat on the mat, naïve café {n * 7}\n" for n in range(60) for w in ("cat", "dog")]
    sp = Tokenizer.train(texts, str(tmp_path / "sp"), vocab_size=400)
    model = tiny_model(sp.vocab_size, seed=3)
    path = write_gguf(tmp_path / "spm.gguf", model)
    # Rewrite the tokenizer keys: same weights, a SentencePiece vocabulary.
    from gguf import GGUFReader
    reader = GGUFReader(path)
    w = GGUFWriter(str(tmp_path / "spm2.gguf"), "llama")
    for name, field in reader.fields.items():
        if name.startswith(("GGUF.", "general.architecture")) or name.startswith("tokenizer."):
            continue
        value = field.contents()
        w.add_uint32(name, value) if isinstance(value, int) else w.add_float32(name, value)
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.sp.id_to_piece(i) for i in range(sp.vocab_size)])
    w.add_token_scores([sp.sp.get_score(i) for i in range(sp.vocab_size)])
    types = [2 if sp.sp.is_unknown(i) else 3 if sp.sp.is_control(i) else 6 if sp.sp.is_byte(i) else 1
             for i in range(sp.vocab_size)]
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id)
    w.add_eos_token_id(sp.sp.piece_to_id(eos_piece))
    w.add_unk_token_id(sp.sp.unk_id())
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = load_checkpoint(tmp_path / "spm2.gguf")
    tok = ck.tokenizer
    for text in texts[:5] + ["unseen words: zebra 12345 ✓\n\n  spaces", ""]:
        assert tok.encode(text) == sp.encode(text) and tok.decode(tok.encode(text)) == text
    eos = sp.sp.piece_to_id(eos_piece)
    assert (tok.bos_prefix, tok.eos_id, tok.eos_ids) == ([sp.bos_id], eos, [eos])
    assert tok.pad_id not in (eos, sp.bos_id)
    ids = torch.tensor([sp.encode(texts[0])])
    torch.testing.assert_close(ck.model(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("keys,factor", [
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, 4.0),
    ({"llama.rope.scaling.factor": 4.0}, 4.0),                 # llama.cpp: the type defaults to linear
    ({"llama.rope.scale_linear": 2.0}, 2.0),                   # the older key
    ({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}, None),
    ({"llama.rope.scaling.factor": 1.0}, None),
])
def test_gguf_rope_scaling_follows_llama_cpp(tmp_path, keys, factor):
    vocab = len(tokens_and_types()[0])
    cfg = load_checkpoint(write_gguf(tmp_path / "tiny.gguf", tiny_model(vocab), **keys)).model.config
    assert cfg.rope_scaling == (None if factor is None else {"rope_type": "linear", "factor": factor})


def test_llama3_pre_tokenizer_takes_whole_words_before_merges(tmp_path):
    """llama.cpp (and Llama 3's tokenizer.json, ignore_merges) take a word that is in the vocab
    whole; merging pair by pair would give "ab" + "c" here, since there is no merge "ab c"."""
    from model.gguf import _tokenizer
    alphabet = byte_alphabet()
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": SPECIALS + alphabet + ["ab", "abc"],
            "tokenizer.ggml.token_type": [3] * 3 + [1] * 258, "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    abc = len(SPECIALS) + 257
    for pre, want, bos in (("llama-bpe", [abc], [1]), ("gpt2", [abc - 1, len(SPECIALS) + ord("c")], [])):
        tok = _tokenizer({**meta, "tokenizer.ggml.pre": pre}, "test.gguf")
        assert tok.encode("abc") == want and tok.bos_prefix == bos    # llama.cpp adds BOS for llama3 vocabularies


@pytest.mark.parametrize("text, gpt2, default", [
    # llama.cpp's "default" splits punctuation runs ($ included) off first, then groups digits by three
    ("It costs $100, ok?", ["It", " costs", " $", "100", ",", " ok", "?"],
     ["It", " costs", " ", "$", "100", ",", " ok", "?"]),
    ("12345 dogs!!", ["12345", " dogs", "!!"], ["123", "45", " dogs", "!!"]),
])
def test_gguf_pre_tokenizers_split_as_llama_cpp(text, gpt2, default):
    """Hand-computed from llama.cpp's regex lists (llama-vocab.cpp): "gpt2" is GPT-2's one regex;
    "default", its fallback, applies four in turn (punctuation runs, GPT-2's, digit runs, three
    digits), each splitting the pieces of the one before."""
    from model.gguf import _pre_tokenizer
    for pre, want in (("gpt2", gpt2), ("default", default)):
        got = [piece for piece, _ in _pre_tokenizer(pre).pre_tokenize_str(text)]
        assert got == [w.replace(" ", "Ġ") for w in want], pre       # byte-level: a space is "Ġ"


def test_a_bpe_vocabulary_without_merges_is_refused():
    from model.gguf import _tokenizer
    with pytest.raises(ValueError, match="without tokenizer.ggml.merges"):
        _tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}, "x.gguf")
