"""PPO's pieces against hand-computed values, and a short run that raises the reward."""
import json
import math
import os

import pytest
import torch

from train import KLController, Rollouts, gae, masked_whiten, ppo_losses, rollout_logprobs, rollout_values


def test_gae_by_hand():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 999.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 999.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])   # row 2 ends after 2 tokens
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # Row 1: δ2 = 2 − 0.1 = 1.9; δ1 = 0 + 0.9·0.1 − 0.2 = −0.11; δ0 = 1 + 0.9·0.2 − 0.5 = 0.68
    #        A2 = 1.9; A1 = −0.11 + 0.72·1.9 = 1.258; A0 = 0.68 + 0.72·1.258 = 1.58576
    # Row 2: δ1 = 1 − 0.4 = 0.6; δ0 = 0.5 + 0.9·0.4 − 0.3 = 0.56; A0 = 0.56 + 0.72·0.6 = 0.992
    expected = torch.tensor([[1.58576, 1.258, 1.9], [0.992, 0.6, 0.0]])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(ret[mask], (expected + values)[mask], rtol=0, atol=1e-5)


def test_policy_ratio_and_value_clipping_by_hand():
    clip = 0.2
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]]))           # ratios 1.5, 0.5, 1.1, 0.5
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    # per token: max(−A·ρ, −A·clip(ρ)): max(−1.5, −1.2) = −1.2; max(0.5, 0.8) = 0.8;
    #            max(−1.1, −1.1) = −1.1; max(−0.5, −0.8) = −0.5
    values = torch.tensor([[1.0, 0.1, 0.0, 0.0]])
    old_values = torch.zeros(1, 4)
    returns = torch.tensor([[0.5, 1.0, 0.0, 0.0]])
    # value: ½·max((v − G)², (v_clip − G)²): v=1, clip→0.2: max(0.25, 0.09) = 0.25 -> 0.125;
    #        v=0.1 (inside the clip): 0.81 -> 0.405; the rest 0
    pg, vf, frac = ppo_losses(logp, old, adv, values, old_values, returns, mask, clip, 0.2)
    assert float(pg) == pytest.approx((-1.2 + 0.8 - 1.1 - 0.5) / 4, abs=1e-6)
    assert float(vf) == pytest.approx((0.125 + 0.405) / 4, abs=1e-6)
    assert float(frac) == pytest.approx(3 / 4)                       # 1.5, 0.5, 0.5 are outside [0.8, 1.2]


def test_adaptive_kl_controller_by_hand():
    ctl = KLController(0.1, target=1.0, horizon=100)
    ctl.update(kl=5.0, n_samples=10)                  # error clipped to +0.2: β·(1 + 0.2·10/100)
    assert ctl.beta == pytest.approx(0.1 * 1.02)
    ctl.update(kl=0.9, n_samples=10)                  # error −0.1
    assert ctl.beta == pytest.approx(0.1 * 1.02 * 0.99)
    fixed = KLController(0.1)
    fixed.update(kl=100.0, n_samples=10)
    assert fixed.beta == 0.1


def test_masked_whiten_uses_real_tokens_only():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([[-1.0, 1.0, 0.0]]), rtol=0, atol=1e-6)


def test_rollout_positions_match_a_plain_forward():
    from model import Llama, get_preset
    torch.manual_seed(0)
    policy = Llama(get_preset("tiny"), head="lm").eval()
    value = Llama(get_preset("tiny"), head="reward").eval()
    prompts, responses = [[1, 5, 6], [1, 9]], [[7, 8, 2], [10, 11, 12, 13]]
    roll = Rollouts(prompts, responses, 3, "cpu")
    with torch.no_grad():
        logp, v = rollout_logprobs(policy, roll), rollout_values(value, roll)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = torch.tensor([p + r])
        full = torch.log_softmax(policy(seq).double(), -1)[0]
        want = torch.stack([full[len(p) - 1 + t, tok] for t, tok in enumerate(r)])
        torch.testing.assert_close(logp[i, :len(r)].double(), want, rtol=0, atol=1e-5)
        # V(p, a_<t) is the scalar head on the prefix that ends just before token t.
        for t in range(len(r)):
            prefix = torch.tensor([(p + r)[:len(p) + t]])
            torch.testing.assert_close(v[i, t], value(prefix)[0], rtol=0, atol=1e-5)
        assert (logp[i, len(r):] == 0).all() and (v[i, len(r):] == 0).all()


def test_short_ppo_run_raises_the_mean_reward_and_starts_at_zero_kl(tmp_path):
    from tests.test_train import TINY, train
    out = str(tmp_path / "ppo")
    train(*TINY, "--stages", "tokenizer,lm,rm,reward,ppo", "--out", out, "--ppo-iters", "12",
          "--ppo-batch", "16", "--ppo-minibatch", "8", "--ppo-lr", "3e-3", "--value-lr", "3e-3",
          "--ppo-eval-every", "12", "--ppo-eval-prompts", "8", timeout=400)
    rows = [json.loads(line) for line in open(os.path.join(out, "ppo", "metrics.jsonl"))]
    assert rows[0]["kl"] == 0.0                          # π_θ = π₀ at the first rollout, same code path
    first, last = rows[:4], rows[-4:]
    mean = lambda rs: sum(r["score"] for r in rs) / len(rs)
    assert mean(last) > mean(first) + 0.1, [r["score"] for r in rows]
    assert all(math.isfinite(r["value_loss"]) for r in rows)
