"""PPO's maths on a rollout (InstructGPT; Llama 2 §3.2.3), as (B, L) tensors over response tokens.

    reward:   r_t = −β·KL_t on every response token, + R̃_c − its RLOO baseline at the last one
    GAE:      δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   returns G_t = A_t + V_t
    policy:   L = E[max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))],   ρ = π_θ(a_t) / π_old(a_t)
    value:    L = ½·E[max((V − G)², (V_old + clip(V − V_old, ±ε_v) − G)²)]

A rollout (data.batch.Rollouts) gives ids, mask (B, T) and, per response token, the flat
position pred_pos (B, L) of the hidden state that predicts it, its target and resp_mask (B, L).
"""
import copy

import torch
import torch.distributed as dist

from kernels import token_logprobs

from .files import CheckpointError
from .parallel import all_gather, global_mean_std
from .rewards import select_reward, whiten


def sample(model, prompt_ids, tok, max_new_tokens, generator):
    """Responses at temperature 1 (an empty one gets an EOS, so it has a last token) and hit_eos."""
    was_training = model.training
    samples, hit_eos = model.eval().generate(prompt_ids, max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                             generator=generator)
    model.train(was_training)
    return [s or [tok.eos_id] for s in samples], hit_eos


def rollout_logprobs(model, roll):
    """log π(a_t | p, a_<t), (B, L) fp32, 0 at padding: the fused kernel reads only the L
    predicting positions and never builds a (T, V) log-softmax."""
    h = model.trunk(roll.ids, attention_mask=roll.mask)                              # (B, T, D)
    h_pred = h.reshape(-1, h.shape[-1])[roll.pred_pos]                              # (B, L, D)
    w = model.head.weight.to(h_pred.dtype)    # under bf16 autocast h is bf16: cast as a Linear would
    return token_logprobs(h_pred, w, roll.targets.masked_fill(~roll.resp_mask, -100))


def rollout_values(value_model, roll):
    """V(p, a_<t) at the same positions, (B, L) fp32: the scalar head on every response position."""
    h = value_model.trunk(roll.ids, attention_mask=roll.mask, final_norm=False)       # (B, T, D)
    return value_model.values(h.reshape(-1, h.shape[-1])[roll.pred_pos]) * roll.resp_mask


class PolicyAndValue(torch.nn.Module):
    """π_θ and V as one module, so that one DDP wrapper syncs both gradients."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, roll):
        return rollout_logprobs(self.policy, roll), rollout_values(self.value, roll)


def value_model_init(rms, device):
    """The value model: a copy of the helpfulness (or only) reward model, as in InstructGPT, its
    head divided by the RM's validation std: the RM speaks raw units (std ~4-6 here) and the
    returns are whitened (std ~1), so V starts in the returns' units instead of a value loss
    ~20× too large. rms: {kind: Checkpoint}."""
    ck = rms["helpful" if "helpful" in rms else next(iter(rms))]
    value_model = copy.deepcopy(ck.model).to(device).train()     # trained; the RM itself stays as it is
    with torch.no_grad():
        value_model.head.weight /= ck.meta.get("val_reward_std", 1.0)
        value_model.head.bias /= ck.meta.get("val_reward_std", 1.0)
    return value_model


def final_scores(rms, roll, is_safety, whiten_by=None):
    """Each RM's score at the EOS (or the last token), Llama 2's selection, then whitening by
    the whole global batch (or by `whiten_by` = (mean, std)). rms: {kind: Checkpoint}; returns
    (raw scores per model, R_c, used_safety, R̃_c), (B,) each."""
    with torch.no_grad():            # under the caller's autocast (train.py's --dtype)
        raw = {kind: ck.model(roll.ids, attention_mask=roll.mask).float() for kind, ck in rms.items()}
    if "safety" in raw:
        r_c, used_safety = select_reward(raw["safety"], raw["helpful"], is_safety)
    else:
        (r_c,) = raw.values()
        used_safety = torch.zeros_like(r_c, dtype=torch.bool)
    return raw, r_c, used_safety, whiten(r_c, *(whiten_by or global_mean_std(r_c)))


def kl_estimate(logp_policy, logp_ref, estimator):
    """Per-token KL(π_θ ‖ π₀) estimates from samples of π_θ (Schulman's k1, k2, k3)."""
    k1 = logp_policy - logp_ref
    return {"k1": k1, "k2": 0.5 * k1 ** 2, "k3": torch.exp(-k1) - 1 + k1}[estimator]


def kl_shaped_reward(logp_policy, logp_ref, resp_mask, score, kl_coef, estimator="k1"):
    """The per-token reward (B, L): −β·KL_t on every response token, + score (B,) at the last.

    logp_policy, logp_ref, resp_mask (B, L); score is the chosen, whitened R̃_c (for PPO,
    minus its baseline). Returns (rewards, kl), both (B, L) and 0 past a response's end.
    """
    kl = kl_estimate(logp_policy, logp_ref, estimator) * resp_mask
    rewards = -kl_coef * kl
    last = (resp_mask.sum(-1) - 1).clamp(min=0)                                      # (B,)
    score = torch.where(resp_mask.any(-1), score, 0.0)                  # an empty response gets none
    rewards[torch.arange(len(last), device=last.device), last] += score
    return rewards, kl


def group_baseline(scores, group):
    """Each score minus the mean of the other scores of its prompt (RLOO, Ahmadian et al. 2024):
    scores (B,) hold `group` consecutive responses per prompt; a score is not in its own baseline."""
    if group < 1 or scores.numel() % group:
        raise ValueError(f"group_baseline: group must divide the {scores.numel()} scores, got {group}")
    if group == 1:
        return scores
    g = scores.view(-1, group)                                                   # (B/group, group)
    return (g - (g.sum(1, keepdim=True) - g) / (group - 1)).reshape(-1)


def gae(rewards, values, mask, gamma, lam):
    """Advantages and returns, (B, L) each; positions past a response's end contribute nothing."""
    adv = torch.zeros_like(rewards)
    next_adv = next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t].float()
        next_adv = (rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_adv) * m
        next_value = values[:, t] * m
        adv[:, t] = next_adv
    return adv, adv + values


def masked_whiten(x, mask):
    """Whitens the real positions of x (B, L) by the mean and std of every rank's real positions."""
    mean, std = global_mean_std(x[mask])
    return (x - mean) / (std + 1e-8) * mask


def ppo_losses(logp, old_logp, adv, values, old_values, returns, mask, clip, vf_clip):
    """Σ over real tokens of the clipped policy loss, the clipped value loss and the clipped count."""
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    v_clipped = old_values + (values - old_values).clamp(-vf_clip, vf_clip)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    return (pg * mask).sum(), (vf * mask).sum(), (((ratio - 1).abs() > clip) * mask).sum()


def ppo_state(models, opt, history, gens):
    """PPO's resumable state at an iteration boundary: the value model, the optimizer, the
    evaluation history and every rank's generators (the policy is the checkpoint's model)."""
    return {"value": models.value.state_dict(), "optimizer": opt.state_dict(), "history": history,
            "generators": all_gather([g.get_state() for g in gens])}


def restore_ppo(saved, models, opt, gens, rank):
    """Loads ppo_state's checkpoint back; returns the history (its last row: the iteration done)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not {"generators", "value", "optimizer", "history"} <= saved.train_state.keys():
        raise CheckpointError("the checkpoint's training state is not PPO's (another stage's?); --redo ppo")
    saved_world = len(saved.train_state["generators"])
    if saved_world != world:         # each rank's own sampling generators: they cannot be re-sharded
        raise CheckpointError(f"this PPO checkpoint was saved by {saved_world} process(es); resume it with "
                              f"as many (now {world}), or --redo ppo")
    models.policy.load_state_dict(saved.model.state_dict())
    models.value.load_state_dict(saved.train_state["value"])
    opt.load_state_dict(saved.train_state["optimizer"])
    for g, state in zip(gens, saved.train_state["generators"][rank]):
        g.set_state(state)
    return saved.train_state["history"]
