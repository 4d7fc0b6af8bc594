"""The Llama trunk and its heads, checked against independent layouts and constructions."""
import copy
import logging

import pytest
import torch

from model import Llama, LlamaConfig, Tokenizer, get_preset

torch.manual_seed(0)


def tiny(**overrides):
    return get_preset("tiny", **overrides)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(1)
    return Llama(tiny(), head="lm").eval()


@pytest.fixture(scope="module")
def rm():
    torch.manual_seed(2)
    return Llama(tiny(), head="reward").eval()


def test_llama2_7b_parameter_count():
    # Published: Llama-2-7B has 6,738,415,616 parameters (untied LM head).
    with torch.device("meta"):
        model = Llama(get_preset("llama2-7b"))
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    assert model.config.hidden_dim == 11008


def test_causality(lm):
    x = torch.randint(0, 512, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, 512, (2, 5))
    hx, hy = lm.trunk(x), lm.trunk(y)
    torch.testing.assert_close(hx[:, :7], hy[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(hx[:, 7:], hy[:, 7:])


def _pad(seqs, side, pad_id=3):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


def test_padding_sides_and_single_sequences_agree(lm, rm):
    seqs = [torch.randint(4, 512, (n,)).tolist() for n in (5, 11, 8)]
    alone_logits = [lm(torch.tensor([s]))[0] for s in seqs]
    alone_rewards = torch.stack([rm(torch.tensor([s]))[0] for s in seqs])
    for side in ("left", "right"):
        ids, mask = _pad(seqs, side)
        logits, rewards = lm(ids, attention_mask=mask), rm(ids, attention_mask=mask)
        torch.testing.assert_close(rewards, alone_rewards, rtol=0, atol=1e-5)
        for i, s in enumerate(seqs):
            real = mask[i].bool()
            torch.testing.assert_close(logits[i][real], alone_logits[i], rtol=0, atol=1e-5)


def _spelled_out(mask):
    """A (B, T) padding mask as the dense (B, T, T) key mask (causal, real keys) the blocks run
    without skipping anything, and the position ids the (B, T) mask implies."""
    T = mask.shape[1]
    block = torch.ones(T, T, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]      # (B, T, T)
    return block, (mask.cumsum(-1) - 1).clamp(min=0)


def test_padded_batch_skips_padding_with_the_same_numbers():
    """A right-padded batch runs its matmuls on the real tokens only and SDPA's causal kernel
    without a mask (attention_bias returns None); the same batch with its padding mask spelled out
    as a (B, T, T) block mask runs every position densely through the masked kernel. Rewards, LM
    logits at real positions and every gradient must agree up to fp32 summation order."""
    from model.llama import attention_bias
    torch.manual_seed(4)
    seqs = [torch.randint(4, 512, (n,)).tolist() for n in (9, 17, 4)]
    ids, mask = _pad(seqs, "right")
    T = ids.shape[1]
    assert attention_bias(mask, T) is None and attention_bias(_pad(seqs, "left")[1], T) is not None
    block, positions = _spelled_out(mask)
    for head in ("reward", "lm"):
        model = Llama(tiny(), head=head)
        outs, grads = [], []
        for kwargs in (dict(attention_mask=mask),
                       dict(attention_mask=block, position_ids=positions,
                            end_idx=None if head == "lm" else Llama.last_token_idx(mask))):
            model.zero_grad()
            out = model(ids, **kwargs)
            out = out if head == "reward" else out[mask.bool()]
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
            outs.append(out.detach())
            grads.append([p.grad.clone() for p in model.parameters()])
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
        for g0, g1 in zip(*grads):
            torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


def test_padding_anywhere_is_skipped_with_the_same_numbers():
    """Left padding, a hole mid-row and a row of padding only: a (B, T) mask's zeros are tokens that
    are not there. The blocks skip them (their hidden states are exactly 0) and real positions and
    every gradient equal the dense run with the same mask spelled out as (B, T, T) keys."""
    torch.manual_seed(5)
    ids = torch.randint(4, 512, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[0, :3] = 0                 # left padding
    mask[1, 4:6] = 0                # a hole
    mask[2, 7:] = 0                 # right padding
    mask[3] = 0                     # nothing real
    block, positions = _spelled_out(mask)
    real = mask.bool()
    model = Llama(tiny(), head="reward")
    outs, grads = [], []
    for kwargs in (dict(attention_mask=mask), dict(attention_mask=block, position_ids=positions)):
        model.zero_grad()
        h = model.trunk(ids, final_norm=False, **kwargs)                                      # (B, T, D)
        if kwargs["attention_mask"] is mask:
            assert torch.all(h[~real] == 0)
        (h[real] * torch.randn(h[real].shape, generator=torch.Generator().manual_seed(0))).sum().backward()
        outs.append(h[real].detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    assert len(grads[0]) == len(grads[1]) > 0
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


def test_reward_at_end_idx_equals_row_reward(rm):
    # Two responses packed in one row behind a shared prompt, with a block mask and restarted
    # positions, must score like the two padded rows.
    prompt, r1, r2 = [1, 50, 51, 52], [60, 61, 2], [70, 71, 72, 73, 2]
    row = prompt + r1 + r2
    T = len(row)
    allowed = torch.zeros(T, T, dtype=torch.bool)
    p, a = len(prompt), len(r1)
    allowed[:p, :p] = torch.ones(p, p).tril().bool()
    allowed[p:p + a, :p] = True
    allowed[p:p + a, p:p + a] = torch.ones(a, a).tril().bool()
    allowed[p + a:, :p] = True
    allowed[p + a:, p + a:] = torch.ones(len(r2), len(r2)).tril().bool()
    pos = torch.tensor(list(range(p)) + list(range(p, p + a)) + list(range(p, p + len(r2))))
    packed = rm(torch.tensor([row]), attention_mask=allowed[None], position_ids=pos[None],
                end_idx=torch.tensor([p + a - 1, T - 1]))
    ids, mask = _pad([prompt + r1, prompt + r2], "right")
    torch.testing.assert_close(packed, rm(ids, attention_mask=mask), rtol=0, atol=1e-5)


def test_kv_cache_decoding_equals_full_forward(lm):
    prompts = [[1, 17, 33, 90], [1, 5, 6, 7, 8, 9, 10]]          # different lengths: left-padded inside
    tokens, hit = lm.generate(prompts, max_new_tokens=6, temperature=0.0)
    assert hit == [False, False]
    for p, new in zip(prompts, tokens):
        seq = list(p)
        for tok in new:                                            # greedy next token from a full pass
            full = lm(torch.tensor([seq]))[0, -1]
            assert int(full.argmax()) == tok
            seq.append(tok)


def test_kv_cache_logits_match_full_forward(lm):
    # Compare logits, not just argmax: decode a fixed continuation through the cache.
    seq = torch.randint(4, 512, (1, 10))
    full = lm(seq)[0]
    B, P = 1, 4
    from model.llama import KVCache, attention_bias
    for layer in lm.layers:
        layer.attention.cache = KVCache(B, lm.config.n_kv_heads, 10, lm.config.head_dim, torch.float32, "cpu")
    try:
        out = [lm._step(seq[:, :P], torch.arange(P)[None], None, 0)[0, -1]]
        for t in range(P, 10):
            mask = torch.ones(1, 1, 1, t + 1, dtype=torch.bool)
            out.append(lm._step(seq[:, t:t + 1], torch.tensor([[t]]), mask, t)[0, -1])
    finally:
        for layer in lm.layers:
            layer.attention.cache = None
    torch.testing.assert_close(torch.stack(out), full[P - 1:], rtol=0, atol=1e-5)


def test_generate_stops_at_eos():
    torch.manual_seed(3)
    model = Llama(tiny(), head="lm").eval()
    # A hook on the head makes EOS (2) the greedy choice from the third new token on.
    calls = []

    def push_eos(module, inputs, logits):
        calls.append(1)
        return logits + (100.0 if len(calls) >= 3 else 0.0) * torch.nn.functional.one_hot(
            torch.tensor(2), logits.shape[-1])

    model.head.register_forward_hook(push_eos)
    tokens, hit = model.generate([[1, 9], [1]], max_new_tokens=8, temperature=0.0, eos_id=2)
    assert hit == [True, True]
    assert [len(t) for t in tokens] == [3, 3] and all(t[-1] == 2 and 2 not in t[:-1] for t in tokens)


def test_gqa_equals_mha_with_repeated_kv_weights():
    torch.manual_seed(4)
    gqa = Llama(tiny(n_heads=4, n_kv_heads=2), head="lm").eval()
    mha = Llama(tiny(n_heads=4, n_kv_heads=4), head="lm").eval()
    state = copy.deepcopy(gqa.state_dict())
    hd = gqa.config.head_dim
    for key in list(state):
        if key.endswith(("attention.wk.weight", "attention.wv.weight")):
            w = state[key].view(2, hd, -1)                   # (n_kv, hd, D)
            state[key] = w.repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    x = torch.randint(0, 512, (2, 9))
    torch.testing.assert_close(mha(x), gqa(x), rtol=0, atol=1e-5)


def test_swap_head_keeps_trunk_and_reports_new_params(caplog):
    torch.manual_seed(5)
    model = Llama(tiny(), head="lm")
    trunk_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    with caplog.at_level(logging.WARNING, logger="rmlab.model"):
        new = model.swap_head("reward")
    assert new == ["head.weight", "head.bias"]
    assert "Some weights were newly initialized: ['head.weight', 'head.bias']" in caplog.text
    after = model.state_dict()
    for k, v in trunk_before.items():
        assert torch.equal(after[k], v), k
    assert model.head.weight.shape == (1, 64) and model(torch.randint(0, 512, (3, 5))).shape == (3,)
    assert model.swap_head("lm") == ["head.weight"]


def test_tied_embeddings_share_storage():
    model = Llama(tiny(tie_embeddings=True), head="lm")
    assert model.head.weight is model.tok_embeddings.weight
    n_untied = sum(p.numel() for p in Llama(tiny(), head="lm").parameters())
    assert sum(p.numel() for p in model.parameters()) == n_untied - 512 * 64


def test_rmsnorm_is_fp32_in_bf16():
    from model.llama import RMSNorm
    norm = RMSNorm(8, 1e-5)
    x = torch.randn(3, 8, dtype=torch.float64) * 1e-3
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x.bfloat16()).double(), expected, rtol=1e-2, atol=1e-2)


def test_rope_rotates_interleaved_pairs():
    # Each pair (x[2i], x[2i+1]) turns by pos * theta^(-2i/hd), written out with cos and sin in
    # float64 (the code multiplies complex numbers instead).
    from model.llama import apply_rope, rope_tables
    hd, T = 8, 5
    x = torch.randn(1, T, 2, hd)                                      # (B, T, H, hd)
    pos = torch.tensor([[0, 3, 1, 7, 2]])
    angle = pos[0, :, None].double() * 10000.0 ** (-torch.arange(0, hd, 2).double() / hd)   # (T, hd/2)
    even, odd = x.double()[..., 0::2], x.double()[..., 1::2]
    expected = torch.empty(1, T, 2, hd, dtype=torch.float64)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]                                  # (T, 1, hd/2)
    expected[..., 0::2] = even * cos - odd * sin
    expected[..., 1::2] = even * sin + odd * cos
    torch.testing.assert_close(apply_rope(x, rope_tables(hd, pos, 10000.0)).double(), expected, rtol=0, atol=1e-5)


def test_top_p_keeps_the_nucleus_only():
    from model.llama import sample_token
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_token(logits, 1.0, 0.7, g) for _ in range(400)])
    assert set(draws.unique().tolist()) == {0, 1}                 # 0.5 + 0.3 >= 0.7; 2 and 3 are outside
    assert set(torch.stack([sample_token(logits, 1.0, 1.0, g) for _ in range(400)]).unique().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("probs, top_p", [([0.5, 0.25, 0.25], 0.5), ([0.5, 0.25, 0.125, 0.125], 0.75),
                                           ([0.4, 0.3, 0.2, 0.1], 0.65)])
def test_top_p_keeps_what_transformers_keeps_at_the_boundary(probs, top_p):
    """A prefix whose mass equals top_p exactly is the nucleus: the token after it is out (as in
    transformers' TopPLogitsWarper, the independent reference)."""
    import transformers        # in requirements.txt, for the tests: never skipped
    from model.llama import sample_token
    logits = torch.log(torch.tensor([probs], dtype=torch.float64)).float()
    warped = transformers.TopPLogitsWarper(top_p)(None, logits.clone())
    kept = set(torch.isfinite(warped[0]).nonzero().flatten().tolist())
    g = torch.Generator().manual_seed(0)
    assert set(torch.stack([sample_token(logits, 1.0, top_p, g) for _ in range(400)]).unique().tolist()) == kept


def test_bad_masks_positions_and_prompts_are_refused(rm, lm):
    """A (1, T) mask over B rows was broadcast and read other rows' tokens; an additive 0/-inf
    mask was read as 'padding where 0'. Both gave numbers without an error."""
    ids = torch.randint(3, 100, (2, 6))
    for bad in (torch.ones(1, 6), torch.ones(2, 5), torch.ones(2, 7), torch.ones(2, 6, 5)):
        with pytest.raises(ValueError, match="attention_mask must be"):
            rm(ids, attention_mask=bad)
    additive = torch.zeros(2, 6).masked_fill(torch.tensor([[False] * 4 + [True] * 2] * 2), float("-inf"))
    with pytest.raises(ValueError, match="0 for padding"):
        rm(ids, attention_mask=additive)
    causal = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 6, 6)
    with pytest.raises(ValueError, match="is bool"):                 # additive (B, T, T): 0 would read as False
        rm(ids, attention_mask=torch.zeros(2, 6, 6).masked_fill(~causal, float("-inf")),
           position_ids=torch.arange(6).expand(2, 6))
    with pytest.raises(ValueError, match="position_ids"):
        rm(ids, position_ids=torch.arange(6)[None])
    for prompts, n in (([[5, 6], []], 3), ([[]], 3), ([[5]], -1)):
        with pytest.raises(ValueError, match="non-empty prompts"):
            lm.generate(prompts, n)
    for kwargs in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match="temperature >= 0"):
            lm.generate([[5, 6]], 3, **kwargs)


def test_config_validation_and_hidden_dim_rule():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")
    # Meta's rule with ffn_dim_multiplier (Llama 2 70B: dim 8192, 1.3, 4096 -> 28672).
    assert LlamaConfig(dim=8192, n_heads=64, n_kv_heads=8, multiple_of=4096,
                       ffn_dim_multiplier=1.3).hidden_dim == 28672


def test_tokenizer_roundtrip_and_special_ids(tmp_path):
    texts = [f"Human: what is {a} plus {b}?\n\nAssistant: {a + b}." for a in range(40) for b in range(10)]
    tok = Tokenizer.train(texts, str(tmp_path / "tok"), vocab_size=300)
    s = "Human: what is 123 plus 9?\n\nAssistant: 132. ünïcødé ✓"
    ids = tok.encode(s, bos=True, eos=True)
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2
    assert tok.pad_id == 3 and tok.pad_id != tok.eos_id
    assert tok.decode(ids) == s                                    # identity normalization + byte fallback
    digits = [tok.sp.id_to_piece(i) for i in tok.encode("12345")]
    assert "".join(digits).replace("\u2581", "") == "12345" and len(digits) >= 5   # split_digits
    reloaded = Tokenizer(str(tmp_path / "tok.model"))
    assert reloaded.encode(s) == tok.encode(s)
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_proto(b"tiktoken-like garbage", "tokenizer.model")


def test_compiled_blocks_equal_eager_outputs_and_gradients():
    """compile_blocks (torch.compile, dynamic shapes) against the same model in eager mode, fp32: the
    rewards and every gradient, on a left-padded batch and then on a packed row of another shape
    (the compiled graph must serve both without changing the maths)."""
    from data import EncodedPrompt, make_batch
    torch.manual_seed(3)
    eager = Llama(tiny(n_layers=2), head="reward")
    compiled = copy.deepcopy(eager).compile_blocks()
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    ids = torch.randint(3, 500, (3, 13))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, :4] = mask[2, :9] = 0                                     # left padding
    prompts = [EncodedPrompt(prompt_ids=[1, 5, 6, 7], response_ids=[[8, 9, 2], [10, 2]], pairs=[(0, 1)],
                             pair_weight=[1.0], margin=[0.0], rating=[None], index=0),
               EncodedPrompt(prompt_ids=[1, 11], response_ids=[[12, 13, 14, 2], [15, 2]], pairs=[(1, 0)],
                             pair_weight=[1.0], margin=[0.0], rating=[None], index=1)]
    packed = make_batch(prompts, "packed", max_len=32, pad_id=0)
    for inputs in (dict(input_ids=ids, attention_mask=mask),
                   dict(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                        position_ids=packed.position_ids, end_idx=packed.end_idx)):
        rewards = [model(**inputs) for model in (eager, compiled)]
        torch.testing.assert_close(rewards[1], rewards[0], rtol=1e-5, atol=1e-5)
        for model, r in zip((eager, compiled), rewards):
            model.zero_grad()
            (r * torch.arange(1.0, len(r) + 1)).sum().backward()
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    from torch._dynamo.utils import counters
    assert counters["stats"]["unique_graphs"] >= 1           # compiled for real, not run eagerly


def test_compiled_blocks_stay_compiled_across_layouts_and_grad_modes():
    """Padded (left, right), full, packed; batches of 1 and 3; with and without grad: every
    variant compiles instead of falling back to eager once dynamo's recompile limit is hit."""
    import torch._dynamo
    torch.manual_seed(6)
    model = Llama(tiny(n_layers=1), head="reward").compile_blocks()
    variants = []
    for B, T in ((1, 7), (3, 9)):
        ids, mask = torch.randint(4, 500, (B, T)), torch.ones(B, T, dtype=torch.long)
        right, left = mask.clone(), mask.clone()
        right[0, T // 2:] = 0
        left[0, :T // 2] = 0
        block = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(B, T, T)
        variants += [dict(input_ids=ids, attention_mask=m) for m in (right, left, mask)]
        variants.append(dict(input_ids=ids, attention_mask=block, position_ids=torch.arange(T).expand(B, T),
                             end_idx=torch.arange(B) * T + T - 1))
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for grad in (True, False):
            for inputs in variants:
                with torch.set_grad_enabled(grad):
                    rewards = model(**inputs)
                    if grad:
                        rewards.sum().backward()
