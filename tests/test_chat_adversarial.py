"""data/chat.py against transformers' apply_chat_template where they used to part silently.

Each case builds one tokenizer.json + tokenizer_config.json, read by rmlab (HFTokenizer.from_dir)
and by transformers (AutoTokenizer), and either compares the ids or shows that transformers' ids
cannot be reproduced here and that ChatFormat refuses with one line:
- a tokenizer.json converted from SentencePiece with Prepend("▁") in its normalizer (Llama 2,
  Mistral, Zephyr): tokenizers prepends "▁" to every stretch between special tokens, transformers 5
  reads the file as a Llama tokenizer that prepends it only at the start unless legacy: true;
- a template that writes pad_token, sep_token, cls_token or mask_token, which transformers passes
  from tokenizer_config.json and rmlab never did (it rendered "");
- a template that fails while rendering (strftime_now unguarded, a type error): a ChatTemplateError,
  not a Jinja or Python traceback.
Mistral's and ChatML's templates are copied as data; the others are minimal cases.
"""
import datetime
import json

import pytest

from data.chat import ChatFormat, ChatTemplateError
from model.tokenizer import HFTokenizer

# Mistral-7B-Instruct-v0.1's template (its tokenizer_config.json, one of its revisions).
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# ChatML, as SmolLM2 and Qwen write it.
CHATML = ("{% for message in messages %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def both(tmp_path, backend, config):
    """(rmlab's tokenizer, transformers' tokenizer) of one tokenizer.json + tokenizer_config.json."""
    from transformers import AutoTokenizer
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "tokenizer.json").write_text(backend.to_str())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return HFTokenizer.from_dir(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))


def hf_ids(hf_tok, turns, **kw):
    messages = [{"role": role, "content": content} for role, content in turns]
    return hf_tok.apply_chat_template(messages, **{"tokenize": True, "return_dict": False, **kw})


@pytest.fixture(scope="module")
def byte_level():
    """A byte-level BPE trained in memory, with ChatML's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<sep>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["Hello there, how are you?", "user assistant system", "Hi! I am fine.\n\n"] * 20
    backend.train_from_iterator(corpus, trainer)
    return backend


def test_sentencepiece_prefix_in_the_normalizer_is_refused(tmp_path, monkeypatch):
    """Mistral 7B Instruct's layout: a tokenizer.json with Prepend("▁") + Replace(" ", "▁") and
    tokenizer_class LlamaTokenizerFast. tokenizers (what rmlab encoded with) writes "▁" after <s>;
    transformers 5 does not, unless tokenizer_config.json says legacy: true. The old code took
    tokenizers' ids, different from transformers' on every conversation; now it refuses."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "[", "]", "/", "H", "i", "▁H", "▁Hi", "Hi", "x"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "H"), ("▁H", "i"), ("H", "i")]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<unk>", "<s>", "</s>")])
    config = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "chat_template": MISTRAL_TEMPLATE}
    turns = [("user", "Hi"), ("assistant", "x"), ("user", "Hi")]
    ours, theirs = both(tmp_path / "default", backend, config)
    _, legacy = both(tmp_path / "legacy", backend, {**config, "legacy": True})
    text = hf_ids(theirs, turns, tokenize=False)
    assert text == "<s>[INST] Hi [/INST]x</s>[INST] Hi [/INST]"
    stretches = backend.encode(text, add_special_tokens=False).ids         # the old code's ids
    space, after_special = backend.token_to_id("▁"), [k + 1 for k, i in enumerate(stretches) if i in (1, 2)]
    assert [stretches[k] for k in after_special] == [space, space]         # "▁[" after <s> and after </s>
    assert hf_ids(legacy, turns) == stretches                              # legacy: true agrees ...
    assert hf_ids(theirs, turns) == [i for k, i in enumerate(stretches) if k not in after_special]  # ... not
    with pytest.raises(ChatTemplateError, match="prepends '▁' to the text after every special token"):
        ChatFormat(ours)
    with monkeypatch.context() as m:          # without the refusal: tokenizers' ids, not transformers'
        m.setattr(ChatFormat, "_check_stretches_encode_alone", lambda self, where: None)
        assert ChatFormat(ours).encode(turns) == stretches != hf_ids(theirs, turns)


@pytest.mark.parametrize("name", ["pad_token", "sep_token"])
def test_template_writing_a_special_token_we_do_not_read_is_refused(byte_level, tmp_path, name):
    """transformers renders pad_token / sep_token (from tokenizer_config.json); rmlab never passed
    them, so the old code wrote nothing where transformers writes the token."""
    template = "{{ " + name + " }}" + CHATML
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<pad>",
              "sep_token": "<sep>", "chat_template": template}
    ours, theirs = both(tmp_path, byte_level, config)
    want = hf_ids(theirs, [("user", "Hi")], add_generation_prompt=True)
    token = {"pad_token": "<pad>", "sep_token": "<sep>"}[name]
    assert want[0] == byte_level.token_to_id(token)
    without = hf_ids(theirs, [("user", "Hi")], add_generation_prompt=True, chat_template=CHATML)
    assert want[1:] == without
    assert ChatFormat(ours, CHATML).encode([("user", "Hi")], add_generation_prompt=True) == want[1:]
    with pytest.raises(ChatTemplateError, match=f"reads {name}, which transformers takes"):
        ChatFormat(ours)


@pytest.mark.parametrize("template, problem", [
    ("{{ strftime_now('%Y') }}" + CHATML, "UndefinedError: 'strftime_now' is undefined"),
    ("{% for m in messages %}<|im_start|>{{ m['content'] + 1 }}<|im_end|>{% endfor %}", "TypeError: can "),
])
def test_a_template_that_fails_while_rendering_is_refused_in_one_line(byte_level, tmp_path, template,
                                                                      problem):
    """An unguarded strftime_now (transformers writes the year there; rmlab deliberately has no clock)
    and a template error transformers raises too: both a ChatTemplateError, where the old code let
    Jinja's UndefinedError and Python's TypeError through."""
    ours, theirs = both(tmp_path, byte_level, {"tokenizer_class": "PreTrainedTokenizerFast",
                                               "eos_token": "<|im_end|>", "chat_template": template})
    if "strftime_now" in template:
        year = str(datetime.datetime.now().year)
        assert theirs.decode(hf_ids(theirs, [("user", "Hi")])).startswith(year + "<|im_start|>")
    else:
        with pytest.raises(TypeError):
            hf_ids(theirs, [("user", "Hi")])
    with pytest.raises(ChatTemplateError, match=problem) as refused:
        ChatFormat(ours).encode_answers([("user", "Hi")], ["Hello"])
    assert "\n" not in str(refused.value)
