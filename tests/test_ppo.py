"""PPO's pieces against hand-computed values, and a short run that raises the reward."""
import json
import math
import os

import pytest
import torch

from data.builtin import oracle, prompt_text
from data.batch import Rollouts
from data.evaluate import win_rate, win_rate_terms
from model.ppo import (gae, group_baseline, masked_whiten, ppo_losses, rollout_logprobs, rollout_values,
                       value_model_init)


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


def test_win_rate_compares_every_pair_by_hand():
    add, cap = prompt_text("What is 3 plus 4?"), prompt_text("What is the capital of Peru?")
    right, bare, near, no = " 3 plus 4 is 7.", " 7", " 3 plus 4 is 8.", " Sorry, I can not help with that."
    # Oracle: right 1.0, bare 0.9, near 0.6, refusal 0.0 (checked in test_data_builtin).
    # Prompt 1, π_θ [1.0, 0.9] vs π₀ [0.0, 0.6]: four wins -> 1.0.
    # Prompt 2, π_θ [0.0, 1.0] vs π₀ [1.0, 0.0]: loss, tie, tie, win -> (0 + ½ + ½ + 1) / 4 = 0.5.
    judge = lambda prompts, groups: [[oracle(p, t) for t in g] for p, g in zip(prompts, groups)]
    mine = judge([add, cap], [[right, bare], [no, " The capital of Peru is Lima."]])
    base = judge([add, cap], [[no, near], [" The capital of Peru is Lima.", no]])
    assert win_rate_terms(mine, base) == [2, 1.5, 1.25]                # n, Σ rate, Σ rate²
    rate, half = win_rate(*win_rate_terms(mine, base))
    assert rate == pytest.approx(0.75)
    # CI over prompts: sd of [1.0, 0.5] (n − 1) = 0.5/√2, over √2 prompts, × 1.96 = 0.49
    assert half == pytest.approx(1.96 * 0.5 / math.sqrt(2) / math.sqrt(2))


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
    pg, vf, n_clipped = ppo_losses(logp, old, adv, values, old_values, returns, mask, clip, 0.2)
    assert float(pg) == pytest.approx(-1.2 + 0.8 - 1.1 - 0.5, abs=1e-6)      # sums over real tokens: the
    assert float(vf) == pytest.approx(0.125 + 0.405, abs=1e-6)               # caller divides by the global count
    assert float(n_clipped) == 3                                       # 1.5, 0.5, 0.5 are outside [0.8, 1.2]
    mask[0, 3] = False                                                 # a padding position adds nothing
    pg, vf, n_clipped = ppo_losses(logp, old, adv, values, old_values, returns, mask, clip, 0.2)
    assert float(pg) == pytest.approx(-1.2 + 0.8 - 1.1, abs=1e-6) and float(n_clipped) == 2


def test_group_baseline_leave_one_out_by_hand():
    scores = torch.tensor([1.0, 2.0, 6.0, 10.0, 10.0, 10.0])      # two prompts, 3 responses each
    # Prompt 1: 1 − (2+6)/2 = −3; 2 − (1+6)/2 = −1.5; 6 − (1+2)/2 = 4.5. Prompt 2: all equal -> 0.
    want = torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_baseline(scores, 3), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(group_baseline(scores, 1), scores)   # one response per prompt: no baseline
    with pytest.raises(ValueError, match="group"):
        group_baseline(scores, 4)                                    # 6 responses are not groups of 4


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


def test_rollout_logprobs_under_bf16_autocast():
    """train.py runs PPO under its --dtype's autocast (bf16 on CUDA and AMX CPUs): the trunk then
    returns bf16 while the head's weight stays fp32. The log-probs must still come back, in fp32,
    equal to the fp32 ones up to bf16 rounding, with a gradient for the fp32 head."""
    from model import Llama, get_preset
    torch.manual_seed(0)
    policy = Llama(get_preset("tiny"), head="lm")
    roll = Rollouts([[1, 5, 6], [1, 9]], [[7, 8, 2], [10, 11, 12, 13]], 3, "cpu")
    want = rollout_logprobs(policy, roll).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = rollout_logprobs(policy, roll)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=0.1)       # log-probs ~ -7, bf16 trunk
    got.sum().backward()
    assert policy.head.weight.grad is not None and policy.head.weight.grad.abs().sum() > 0


def test_value_model_from_the_rm_speaks_whitened_units(tmp_path):
    from model import Llama, get_preset
    from model.checkpoint import load_checkpoint, save_checkpoint
    torch.manual_seed(0)
    rm = Llama(get_preset("tiny"), head="reward").eval()
    with torch.no_grad():
        rm.head.bias.fill_(1.5)
    save_checkpoint(str(tmp_path / "rm"), rm, meta={"val_reward_std": 4.0})
    value = value_model_init({"helpful": load_checkpoint(str(tmp_path / "rm"))}, "cpu").eval()
    roll = Rollouts([[1, 5, 6]], [[7, 8, 2]], 3, "cpu")
    with torch.no_grad():
        v = rollout_values(value, roll)
        for t in range(3):                      # V(p, a_<t) = RM(p, a_<t) / 4
            prefix = torch.tensor([[1, 5, 6, 7, 8][:3 + t]])
            torch.testing.assert_close(v[0, t], rm(prefix)[0] / 4.0, rtol=0, atol=1e-5)


def test_short_ppo_run_raises_the_mean_reward_and_starts_at_zero_kl(tmp_path):
    from tests.test_train import TINY, train
    out = str(tmp_path / "ppo")
    train(*TINY, "--out", out, "--ppo-iters", "12", "--ppo-batch", "32", "--ppo-group", "4", "--ppo-minibatch", "16",
          "--ppo-lr", "3e-3", "--value-lr", "3e-3", "--ppo-eval-prompts", "24", timeout=400)
    rows = [json.loads(line) for line in open(os.path.join(out, "ppo", "metrics.jsonl"))][1:]   # [0]: iter 0
    assert rows[0]["kl"] == 0.0                          # π_θ = π₀ at the first rollout, same code path
    assert all(math.isfinite(r["value_loss"]) for r in rows)
    # The reward model's mean score on the same held-out prompts, sampled with the same seed before
    # and after (training rollouts draw new prompts each iteration, too noisy to compare). Over
    # seeds 1337, 1, 2, 3 it rose by 0.18, 0.43, 0.13, 0.38.
    summary = json.load(open(os.path.join(out, "ppo", "stage.json")))["summary"]
    assert summary["final"]["eval_proxy"] > summary["start"]["eval_proxy"] + 0.1, summary


def test_a_ppo_checkpoint_resumes_only_with_as_many_processes():
    """Each rank saved its own sampling generators; they cannot be dealt to another number of
    ranks. One line instead of an IndexError on rank 1 and a gloo traceback on rank 0."""
    from types import SimpleNamespace
    from model.checkpoint import CheckpointError
    from model.ppo import restore_ppo
    saved = SimpleNamespace(train_state={"generators": [[], []], "value": {}, "optimizer": {},
                                         "history": []})                     # saved by 2 processes
    with pytest.raises(CheckpointError, match=r"saved by 2 process\(es\); resume it with as many \(now 1\)"):
        restore_ppo(saved, None, None, [], 0)
