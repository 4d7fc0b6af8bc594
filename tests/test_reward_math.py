"""The reward maths of the `reward` stage, against hand-computed values."""
import math

import pytest
import torch

from model.parallel import global_mean_std
from model.rewards import SAFETY_LOGIT, select_reward, sigmoid_prob, whiten


def test_safety_logit_is_logit_of_0_15():
    assert SAFETY_LOGIT == pytest.approx(math.log(0.15 / 0.85), abs=1e-15)
    assert SAFETY_LOGIT == pytest.approx(-1.7346010553881064, abs=1e-12)
    assert float(sigmoid_prob(torch.tensor(SAFETY_LOGIT, dtype=torch.float64))) == pytest.approx(0.15, abs=1e-7)


def test_selection_rule_at_the_0_15_boundary():
    eps = 1e-4
    r_s = torch.tensor([SAFETY_LOGIT - eps, SAFETY_LOGIT + eps, SAFETY_LOGIT + eps, 5.0, -30.0], dtype=torch.float64)
    r_h = torch.tensor([1.0, 2.0, 3.0, 4.0, 9.0], dtype=torch.float64)
    is_safety = [False, False, True, False, False]
    r_c, used = select_reward(r_s, r_h, is_safety)
    # σ(R_s) just below 0.15 -> safety; just above on a helpful prompt -> helpfulness;
    # a safety prompt always -> safety; a confident unsafe score far below -> safety.
    assert used.tolist() == [True, False, True, False, True]
    assert r_c.tolist() == [r_s[0].item(), 2.0, r_s[2].item(), 4.0, -30.0]


def test_selection_never_computes_the_logit_of_a_saturated_sigmoid():
    # σ(40) == 1.0 in fp32 and logit(1.0) = inf; the rule works on raw scores and stays finite.
    r_s = torch.tensor([40.0, -40.0])
    r_c, used = select_reward(r_s, torch.tensor([0.5, 0.5]), [False, False])
    assert torch.isfinite(r_c).all() and r_c.tolist() == [0.5, -40.0] and used.tolist() == [False, True]
    assert torch.isinf(torch.logit(torch.sigmoid(r_s)))[0]          # what we avoid


def test_whiten_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mean, std = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + 9) / 4)   # population std
    torch.testing.assert_close(whiten(x, *global_mean_std(x)), (x - mean) / std, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(whiten(x, mean=1.0, std=2.0), (x - 1.0) / 2.0)


def test_kl_estimators_by_hand():
    from model.ppo import kl_estimate
    lp_policy = torch.tensor([-1.0, -2.0, -0.5])
    lp_ref = torch.tensor([-1.5, -1.0, -0.5])
    torch.testing.assert_close(kl_estimate(lp_policy, lp_ref, "k1"), torch.tensor([0.5, -1.0, 0.0]))
    torch.testing.assert_close(kl_estimate(lp_policy, lp_ref, "k2"), torch.tensor([0.125, 0.5, 0.0]))
    k3 = torch.tensor([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0])
    torch.testing.assert_close(kl_estimate(lp_policy, lp_ref, "k3"), k3)


def test_kl_shaped_reward_by_hand():
    """The one function the reward table and PPO both call: (B, L) rewards and per-token KL."""
    from model.ppo import kl_shaped_reward
    # Two responses, L = 3: the first has 3 tokens, the second 2 (its third position is padding,
    # with log-probs that must not count).
    lp_policy = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.7, -9.0]])
    lp_ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.4, -0.3, -1.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    score = torch.tensor([2.5, -1.0])                     # R̃_c of each response
    beta = 0.1
    rewards, kl = kl_shaped_reward(lp_policy, lp_ref, mask, score, beta)
    # k1 per token: row 1 [0.5, −1.0, 0.0]; row 2 [0.2, −0.4, (padding) 0].
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [0.2, -0.4, 0.0]]))
    # −β·KL_t everywhere, + the score at the last real token (t = 2 in row 1, t = 1 in row 2).
    want = torch.tensor([[-0.05, 0.1, 0.0 + 2.5], [-0.02, 0.04 - 1.0, 0.0]])
    torch.testing.assert_close(rewards, want)
    # Σ_t r_t = R̃_c − β·Σ_t KL_t: Llama 2's R = R̃_c − β·KL for the whole response.
    torch.testing.assert_close(rewards.sum(-1), score - beta * kl.sum(-1))
    # With k3 the KL changes, the placement does not.
    rewards3, kl3 = kl_shaped_reward(lp_policy, lp_ref, mask, score, beta, estimator="k3")
    assert kl3[1, 2] == 0 and rewards3[0, 2] == pytest.approx(2.5 - beta * float(kl3[0, 2]))
    # A response with no tokens gets no reward anywhere (its score went to position 0 before).
    empty, _ = kl_shaped_reward(lp_policy, lp_ref, torch.zeros_like(mask), score, beta)
    assert (empty == 0).all()


def test_a_non_finite_reward_is_an_error_not_a_wrong_pair():
    """NaN > x and NaN == x are both False, so a NaN pair counted as wrong (and inf − inf too):
    the accuracy then silently fell. A hand count of the finite pairs is the reference."""
    from data.evaluate import pair_outcomes
    from data.records import PrefRecord
    rec = PrefRecord(prompt="p", responses=["a", "b"], pairs=[(0, 1)], pair_weight=[1.0], margin=[None],
                     rating=[None])
    assert [o["correct"] for o in pair_outcomes([rec, rec], [[2.0, 1.0], [0.0, 3.0]])] == [True, False]
    for bad in ([float("nan"), 0.5], [float("inf"), float("inf")]):
        with pytest.raises(FloatingPointError, match="not finite"):
            pair_outcomes([rec], [bad])


def test_k1_is_zero_when_policy_is_reference():
    from data.batch import Rollouts
    from model.ppo import rollout_logprobs
    from model import Llama, get_preset
    torch.manual_seed(0)
    model = Llama(get_preset("tiny"), head="lm").eval()
    same = Llama(get_preset("tiny"), head="lm").eval()
    same.load_state_dict(model.state_dict())
    prompts, responses = [[1, 5, 6], [1, 9]], [[7, 8, 2], [10, 11, 12, 13]]
    roll = Rollouts(prompts, responses, 3, "cpu")
    with torch.no_grad():
        a, b = rollout_logprobs(model, roll), rollout_logprobs(same, roll)
    assert torch.equal(a - b, torch.zeros_like(a))
    # and they are the model's real log-probs: compare one against log_softmax of a plain forward
    full = torch.log_softmax(model(torch.tensor([prompts[1] + responses[1]])).double(), -1)[0]
    expected = torch.stack([full[len(prompts[1]) - 1 + t, tok] for t, tok in enumerate(responses[1])])
    torch.testing.assert_close(a[1].double(), expected, rtol=0, atol=1e-5)


def test_fit_temperature_calibrates_by_hand_and_against_a_grid():
    from model.rewards import fit_temperature
    # Three pairs won by 2, one lost by 2: the loss' slope is zero where 3σ(−2s) = σ(2s), i.e.
    # e^{2s} = 3, s = ln(3)/2; then σ(s·2) = 3/4, the pairs' accuracy: calibrated.
    s = fit_temperature([2.0, 2.0, 2.0, -2.0])
    assert s == pytest.approx(math.log(3) / 2, abs=1e-9)
    assert 1 / (1 + math.exp(-2 * s)) == pytest.approx(0.75, abs=1e-12)
    # Odd gaps: the minimiser of the mean softplus(−s·gap) on a fine grid of (0, 1].
    gaps = torch.tensor([7.3, 11.0, -4.2, 9.9, 0.4, -12.5, 15.1, 3.3, 6.0], dtype=torch.float64)
    grid = torch.linspace(1e-4, 1.0, 200001, dtype=torch.float64)
    loss = torch.nn.functional.softplus(-grid[:, None] * gaps[None, :]).mean(1)
    assert fit_temperature(gaps) == pytest.approx(float(grid[loss.argmin()]), abs=1e-5)
    # A model that separates every pair is never sharpened (s stays at most 1).
    assert fit_temperature([1.0, 3.0]) == 1.0
    # Pairs ranked worse than chance would drive s to 0 and erase the model: the floor holds.
    assert fit_temperature([-1.0, -3.0, 0.5], min_scale=0.05) == 0.05
    assert fit_temperature([2.0, 2.0, 2.0, -2.0], min_scale=0.05) == pytest.approx(math.log(3) / 2, abs=1e-9)
    with pytest.raises(ValueError, match="gaps"):
        fit_temperature([])
