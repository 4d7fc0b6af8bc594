"""tokenizer.json through `tokenizers`: special ids from the checkpoint's own files, saving and loading.

The Llama 3 layout is built here as Meta's HF release writes it: a byte-level BPE tokenizer.json
whose post-processor adds <|begin_of_text|>, no pad token, a config.json with three eos ids
(Llama 3.1 Instruct), and a tokenizer_config.json whose eos_token is the end-of-turn token.
"""
import json
import logging
import os

import pytest
import torch
from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers, processors

from model import Llama, LlamaConfig, Tokenizer
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.tokenizer import HFTokenizer, load_tokenizer

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|eot_id|>"]


def llama3_style_dir(d, add_bos_key=None, chat_template=None):
    """A tokenizer.json (bytes + a few merges + specials) and Llama 3.1 Instruct's special-id files."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    for merge in ("h e", "l l", "he ll"):
        vocab["".join(merge.split())] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=[tuple(m.split()) for m in ("h e", "l l", "he ll")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    bos = backend.token_to_id(SPECIAL[0])
    backend.post_processor = processors.TemplateProcessing(single=f"{SPECIAL[0]} $A", special_tokens=[(SPECIAL[0], bos)])
    os.makedirs(d, exist_ok=True)
    backend.save(os.path.join(d, "tokenizer.json"))
    ids = {t: backend.token_to_id(t) for t in SPECIAL}
    tc = {"bos_token": SPECIAL[0], "eos_token": "<|eot_id|>"}
    if add_bos_key is not None:
        tc["add_bos_token"] = add_bos_key
    if chat_template is not None:
        tc["chat_template"] = chat_template
    for name, content in [("tokenizer_config.json", tc),
                          ("config.json", {"bos_token_id": ids[SPECIAL[0]],
                                           "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}),
                          ("generation_config.json", {"eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]})]:
        with open(os.path.join(d, name), "w") as f:
            json.dump(content, f)
    return d, ids


def test_special_ids_come_from_the_checkpoint_files(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rmlab.tokenizer")
    d, ids = llama3_style_dir(str(tmp_path / "tok"))
    tok = load_tokenizer(d)
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == ids["<|eot_id|>"]                                   # end of turn: the reward is read here
    assert tok.eos_ids == [ids["<|eot_id|>"], ids["<|end_of_text|>"]]         # generation stops at either
    assert tok.bos_prefix == [ids[SPECIAL[0]]]                               # the post-processor adds BOS
    assert tok.pad_id == ids["<|reserved_special_token_0|>"]                 # no pad, no unk: a reserved token
    assert "instead, so that pad != eos" in caplog.text
    assert tok.token_id("<|eot_id|>") == ids["<|eot_id|>"] and tok.token_id("no such token") is None


def test_add_bos_token_key_overrides_the_post_processor(tmp_path):
    d, _ = llama3_style_dir(str(tmp_path / "tok"), add_bos_key=False)
    assert load_tokenizer(d).bos_prefix == []


def test_text_is_encoded_literally(tmp_path):
    d, ids = llama3_style_dir(str(tmp_path / "tok"))
    tok = load_tokenizer(d)
    text = "hello <|eot_id|> world"
    encoded = tok.encode(text)
    assert ids["<|eot_id|>"] not in encoded and tok.decode(encoded) == text
    assert tok.encode("hello", bos=True, eos=True) == [tok.bos_id] + tok.encode("hello") + [tok.eos_id]


def test_chat_template_file_of_transformers_5_is_kept(tmp_path):
    d, _ = llama3_style_dir(str(tmp_path / "tok"), chat_template="old")
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write("{{ messages }}")
    assert load_tokenizer(d).chat_template == "{{ messages }}"


def test_garbage_tokenizer_json_is_one_line(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path}: not a Hugging Face tokenizer.json") as e:
        load_tokenizer(str(path))
    assert "\n" not in str(e.value)


def tiny_model(vocab):
    torch.manual_seed(0)
    return Llama(LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=48))


def test_save_checkpoint_stores_tokenizer_json_and_its_specials(tmp_path):
    d, _ = llama3_style_dir(str(tmp_path / "tok"), chat_template="{{ x }}")
    tok = load_tokenizer(d)
    path = save_checkpoint(tmp_path / "ck", tiny_model(tok.vocab_size), tokenizer=tok)
    with open(os.path.join(path, "rmlab.json")) as f:
        manifest = json.load(f)
    assert manifest["version"] == 2 and "tokenizer.json" in manifest["files"]
    back = load_checkpoint(path).tokenizer
    assert (back.bos_prefix, back.eos_ids, back.pad_id, back.chat_template) == \
        (tok.bos_prefix, tok.eos_ids, tok.pad_id, "{{ x }}")
    assert back.encode("hello hell") == tok.encode("hello hell")


def test_an_end_of_turn_token_added_as_non_special_is_still_literal_text(tmp_path):
    """A GGUF user-defined token or a tokenizer.json entry with special=False is parsed out of text
    by `tokenizers` even with encode_special_tokens: the eos must be marked special so that a
    response spelling "<|im_end|>" cannot end itself. The literal encoding is the same text's
    without that added token."""
    def backend(with_eos):
        b = Backend(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                               merges=[]))
        b.pre_tokenizer, b.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        b.add_special_tokens([AddedToken("<s>", special=True), AddedToken("<pad>", special=True)])
        if with_eos:
            b.add_tokens([AddedToken("<|im_end|>", special=False, normalized=False)])
        return b
    tok = HFTokenizer(backend(True), bos_id=256, eos_ids=[258], pad_id=257)
    text = "answer <|im_end|> more"
    assert tok.encode(text) == backend(False).encode(text).ids and 258 not in tok.encode(text)
    assert tok.encode("x", eos=True)[-1] == 258 and tok.decode(tok.encode(text)) == text


def test_sentencepiece_without_bos_or_eos_is_refused_and_decode_drops_every_eos(tmp_path):
    import sentencepiece as spm
    texts = [f"word{i} and more words {i}" for i in range(50)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "t5"),
                                   vocab_size=60, bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2)
    with pytest.raises(ValueError, match="no BOS piece"):
        Tokenizer(str(tmp_path / "t5.model"))     # it encoded BOS and EOS as id -1
    sp = Tokenizer.train(texts, str(tmp_path / "sp"), vocab_size=300)
    end_of_turn = sp.encode("word")[-1]
    sp.set_specials(eos_ids=[end_of_turn])
    assert sp.decode(sp.encode("and") + [end_of_turn, sp.eos_id]) == sp.decode(sp.encode("and"))


def test_a_vocabulary_the_texts_cannot_fill_is_said(tmp_path, caplog):
    texts = [f"word{i} and more words {i}" for i in range(50)]
    with caplog.at_level(logging.WARNING, logger="rmlab.tokenizer"):
        sp = Tokenizer.train(texts, str(tmp_path / "sp"), vocab_size=5000)
    assert sp.vocab_size < 5000 and f"support {sp.vocab_size} pieces, fewer than the 5000 asked for" in caplog.text


def test_version_1_manifests_still_load(tmp_path):
    """Written before rope_scaling, head_dim and the tokenizer field existed."""
    sp = Tokenizer.train([f"word{i} and more words {i}" for i in range(200)], str(tmp_path / "sp"), vocab_size=300)
    model = tiny_model(sp.vocab_size)
    path = save_checkpoint(tmp_path / "ck", model, tokenizer=sp)
    with open(os.path.join(path, "rmlab.json")) as f:
        manifest = json.load(f)
    manifest["version"] = 1
    manifest.pop("tokenizer")
    for key in ("rope_scaling", "head_dim"):
        manifest["config"].pop(key)
    with open(os.path.join(path, "rmlab.json"), "w") as f:
        json.dump(manifest, f)
    ck = load_checkpoint(path)
    assert ck.model.config.head_dim == 8 and ck.model.config.rope_scaling is None
    assert ck.tokenizer.model_proto() == sp.model_proto() and ck.tokenizer.bos_prefix == [sp.bos_id]
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(ck.model(ids), model(ids), rtol=0, atol=0)


def test_a_manifest_tokenizer_field_that_does_not_fit_is_refused(tmp_path):
    d, _ = llama3_style_dir(str(tmp_path / "tok"))
    tok = load_tokenizer(d)
    path = save_checkpoint(tmp_path / "ck", tiny_model(tok.vocab_size), tokenizer=tok)
    with open(os.path.join(path, "rmlab.json")) as f:
        manifest = json.load(f)
    manifest["tokenizer"]["eos_ids"] = [10 ** 6]
    with open(os.path.join(path, "rmlab.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(CheckpointError, match="field 'tokenizer' does not describe"):
        load_checkpoint(path)


@pytest.mark.parametrize("field,value", [("eos_token", 2), ("eos_token", ["</s>"]), ("chat_template", ["x"])])
def test_tokenizer_files_of_the_wrong_type_warn_and_never_block_the_weights(tmp_path, caplog, field, value):
    d, _ = llama3_style_dir(str(tmp_path / "ck"))
    with open(os.path.join(d, "tokenizer_config.json")) as f:
        tc = json.load(f)
    tc[field] = value
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f)
    model = tiny_model(load_tokenizer(llama3_style_dir(str(tmp_path / "ok"))[0]).vocab_size)
    from model.checkpoint import export_hf
    export_hf(model, tmp_path / "hf")                             # weights and config.json only
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.replace(os.path.join(d, name), tmp_path / "hf" / name)
    ck = load_checkpoint(tmp_path / "hf")
    assert ck.tokenizer is None and "tokenizer_config.json" in caplog.text
    assert ck.model.config.vocab_size == model.config.vocab_size


def test_export_hf_makes_transformers_add_bos_where_the_checkpoint_does(tmp_path):
    """A tokenizer whose BOS comes from the checkpoint's metadata (GGUF, add_bos_token), not from
    its post-processor, is exported with one, so transformers' tokenizer adds BOS too."""
    import transformers
    from model.checkpoint import export_hf
    d, ids = llama3_style_dir(str(tmp_path / "tok"))
    tok = load_tokenizer(d)
    tok.tk.post_processor = None                                   # as built from a GGUF file
    assert tok.bos_prefix == [ids[SPECIAL[0]]]
    export_hf(tiny_model(tok.vocab_size), tmp_path / "hf", tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok("hello").input_ids == tok.bos_prefix + tok.encode("hello")


def test_sentencepiece_in_an_hf_dir_takes_bos_and_template_from_tokenizer_config(tmp_path):
    from model.checkpoint import export_hf
    sp = Tokenizer.train([f"word{i} and more words {i}" for i in range(200)], str(tmp_path / "sp"), vocab_size=300)
    sp.set_specials(add_bos=False, chat_template="{{ messages }}")
    export_hf(tiny_model(sp.vocab_size), tmp_path / "hf", tokenizer=sp)
    back = load_checkpoint(tmp_path / "hf").tokenizer
    assert (back.bos_prefix, back.chat_template) == ([], "{{ messages }}")


@pytest.mark.parametrize("key, value, ok", [("eos_token", "</s>", True), ("bos_token", {"content": "<s>"}, True),
                                            ("eos_token", "<|end|>", False), ("bos_token", "<|end|>", False)])
def test_sentencepiece_specials_named_in_tokenizer_config_must_be_the_models(tmp_path, key, value, ok):
    """transformers takes bos/eos from tokenizer_config.json; rmlab takes a .model's own. They
    must agree, or the reward is read at another token than the checkpoint's EOS: refused."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter([f"the cat {n} sat" for n in range(100)]),
                                   model_prefix=str(tmp_path / "tokenizer"), vocab_size=80, model_type="bpe",
                                   user_defined_symbols=["<|end|>"], minloglevel=2)
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({key: value}, f)
    if ok:
        assert load_tokenizer(str(tmp_path)).eos_id == 2
    else:
        with pytest.raises(ValueError, match=f"tokenizer_config.json's {key} is '<|end|>' but tokenizer.model's"):
            load_tokenizer(str(tmp_path))


def test_a_missing_tokenizer_is_one_error(tmp_path):
    from model.files import read_tokenizer
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        read_tokenizer(str(tmp_path / "tokenizer.model"))
    with pytest.raises(CheckpointError, match="no tokenizer.json or tokenizer.model in this directory"):
        read_tokenizer(str(tmp_path))
