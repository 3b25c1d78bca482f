"""Golden-value tests for gpo_exp.losses: every expected number is computed here with `math` from the
paper/TRL formula, never by calling the function under test."""
from __future__ import annotations

import math

import pytest
import torch

from gpo_exp.losses import (
    dpo_logps_for,
    dpo_loss,
    gae,
    grpo_advantages,
    grpo_loss,
    kto_loss,
    kto_mismatched_indices,
    masked_mean,
    masked_whiten,
    orpo_loss,
    ppo_kl_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    simpo_loss,
)
from gpo_exp.registry import ConfigError


def t(*rows, grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows if len(rows) > 1 or not isinstance(rows[0], list) else rows[0],
                        dtype=torch.float32, requires_grad=grad)


def close(x: torch.Tensor, expected, tol: float = 1e-6) -> None:
    got = x.detach().double().flatten().tolist()
    exp = [float(e) for e in (expected if isinstance(expected, (list, tuple)) else [expected])]
    assert len(got) == len(exp), (got, exp)
    for g, e in zip(got, exp):
        assert abs(g - e) <= tol * max(1.0, abs(e)), (got, exp)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ----------------------------------------------------------------------------- DPO

# Hand example: margins h = (pc - rc) - (pr - rr) = [1.5, -0.7].
PC, PR, RC, RR = [-5.0, -8.0], [-7.0, -6.0], [-6.0, -7.5], [-6.5, -6.2]
H = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]


def dpo_inputs(grad: bool = False):
    return t(PC, grad=grad), t(PR, grad=grad), t(RC, grad=grad), t(RR, grad=grad)


def test_dpo_sigmoid_policy_equals_reference_is_ln2():
    logps = t([-3.0, -12.5, -0.25])
    losses, cr, rr = dpo_loss(logps, logps - 1.0, logps, logps - 1.0, beta=0.3)
    close(losses, [math.log(2)] * 3, tol=1e-7)
    close(cr, [0.0] * 3)
    close(rr, [0.0] * 3)


def test_dpo_sigmoid_golden_and_rewards():
    beta = 0.1
    losses, chosen_r, rejected_r = dpo_loss(*dpo_inputs(), beta=beta)
    close(losses, [-logsig(beta * h) for h in H])
    close(chosen_r, [beta * (pc - rc) for pc, rc in zip(PC, RC)])  # [0.1, -0.05]
    close(rejected_r, [beta * (pr - rr) for pr, rr in zip(PR, RR)])  # [-0.05, 0.02]


def test_dpop_penalises_only_a_chosen_likelihood_below_the_reference():
    # pair 0: pi_c - ref_c = +1.0 -> no penalty, h = 1.5; pair 1: pi_c - ref_c = -0.5 -> h = -0.7 - 50 * 0.5
    losses, chosen_r, _ = dpo_loss(*dpo_inputs(), beta=0.1, dpop_lambda=50.0)
    close(losses, [math.log1p(math.exp(-0.15)), math.log1p(math.exp(2.57))], tol=1e-6)
    close(chosen_r, [0.1, -0.05])  # logged rewards stay the plain DPO ones
    close(dpo_loss(*dpo_inputs(), beta=0.1, dpop_lambda=0.0)[0], dpo_loss(*dpo_inputs(), beta=0.1)[0].tolist())
    pc, pr, rc, rr = dpo_inputs(grad=True)
    dpo_loss(pc, pr, rc, rr, beta=0.1, dpop_lambda=50.0)[0].sum().backward()
    g_dpop = pc.grad.clone()
    pc, pr, rc, rr = dpo_inputs(grad=True)
    dpo_loss(pc, pr, rc, rr, beta=0.1)[0].sum().backward()
    assert g_dpop[0] == pc.grad[0] and g_dpop[1] < 5 * pc.grad[1] < 0  # pair 1 pulls chosen up much harder
    with pytest.raises(ConfigError, match="dpop_lambda"):
        dpo_loss(*dpo_inputs(), dpop_lambda=-1.0)


def test_dpo_hinge_golden():
    close(dpo_loss(*dpo_inputs(), beta=0.1, loss_type="hinge")[0], [0.85, 1.07])
    close(dpo_loss(*dpo_inputs(), beta=1.0, loss_type="hinge")[0], [0.0, 1.7])  # 1 - 1.5 < 0 -> 0


def test_dpo_ipo_golden_uses_per_token_logps():
    beta = 0.1
    close(dpo_loss(*dpo_inputs(), beta=beta, loss_type="ipo")[0], [(h - 1 / (2 * beta)) ** 2 for h in H])
    # dpo_logps_for: ipo averages over completion tokens (length clamped at 1); others keep sums.
    summed, lengths = t([-6.0, -4.0]), torch.tensor([3, 0])
    close(dpo_logps_for("ipo", summed, lengths), [-2.0, -4.0])
    close(dpo_logps_for("sigmoid", summed, lengths), [-6.0, -4.0])
    # TRL's ipo: each summed log-ratio divided by its length == loss on averaged logps.
    pc, pr, rc, rr, lc, lr = -12.0, -9.0, -13.5, -8.0, 4, 2
    h = (pc - rc) / lc - (pr - rr) / lr
    avg = [dpo_logps_for("ipo", t([v]), torch.tensor([n])) for v, n in ((pc, lc), (pr, lr), (rc, lc), (rr, lr))]
    close(dpo_loss(*avg, beta=0.5, loss_type="ipo")[0], [(h - 1.0) ** 2])


def test_dpo_robust_with_label_smoothing():
    beta, eps = 0.1, 0.1
    expected = [(-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps) for h in H]
    close(dpo_loss(*dpo_inputs(), beta=beta, loss_type="robust", label_smoothing=eps)[0], expected)
    # eps = 0 reduces to plain DPO.
    close(dpo_loss(*dpo_inputs(), beta=beta, loss_type="robust")[0], [-logsig(beta * h) for h in H])


def test_dpo_bad_config_errors_are_one_line():
    with pytest.raises(ConfigError) as err:
        dpo_loss(*dpo_inputs(), loss_type="kto_pair")
    msg = str(err.value)
    assert "\n" not in msg and "'kto_pair'" in msg
    assert all(name in msg for name in ("sigmoid", "ipo", "hinge", "robust"))
    with pytest.raises(ConfigError, match="label_smoothing"):
        dpo_loss(*dpo_inputs(), loss_type="sigmoid", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="label_smoothing"):
        dpo_loss(*dpo_inputs(), loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ConfigError, match="loss_type"):
        dpo_logps_for("simpo", t([1.0]), torch.tensor([1]))


def test_dpo_gradients_reach_policy_not_reference():
    beta = 0.1
    pc, pr, rc, rr = dpo_inputs(grad=True)
    losses, chosen_r, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    # d/dpc -log sigma(beta h) = -beta * sigma(-beta h); d/dpr is its negative.
    close(pc.grad, [-beta * sigmoid(-beta * h) for h in H])
    close(pr.grad, [beta * sigmoid(-beta * h) for h in H])
    assert rc.grad is None and rr.grad is None
    assert not chosen_r.requires_grad


# ----------------------------------------------------------------------------- KTO

KTO_POLICY, KTO_REF = [-3.0, -4.0, -2.0, -5.0], [-3.5, -3.0, -2.5, -4.0]  # log-ratios [0.5, -1, 0.5, -1]
KTO_DESIRABLE = torch.tensor([True, False, True, False])


def test_kto_golden_with_nonzero_kl_reference_point():
    beta, w_d, w_u = 0.5, 1.0, 1.5
    policy_kl, ref_kl = [-6.0, -7.0, -5.0, -8.0], [-6.4, -7.2, -5.6, -8.0]
    z0 = sum(p - r for p, r in zip(policy_kl, ref_kl)) / 4  # 0.3
    losses, rewards, kl = kto_loss(t(KTO_POLICY), t(KTO_REF), KTO_DESIRABLE, t(policy_kl), t(ref_kl),
                                   beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    r = [p - q for p, q in zip(KTO_POLICY, KTO_REF)]
    close(kl, z0)
    close(losses, [w_d * (1 - sigmoid(beta * (r[0] - z0))), w_u * (1 - sigmoid(beta * (z0 - r[1]))),
                   w_d * (1 - sigmoid(beta * (r[2] - z0))), w_u * (1 - sigmoid(beta * (z0 - r[3])))])
    close(rewards, [beta * x for x in r])


def test_kto_kl_reference_point_is_clamped_at_zero():
    beta = 0.5
    ref_kl = [-6.4, -7.2, -5.6, -8.0]
    policy_kl = [x - 0.3 for x in ref_kl]  # mean policy - ref = -0.3 < 0 -> z0 = 0
    losses, _, kl = kto_loss(t(KTO_POLICY), t(KTO_REF), KTO_DESIRABLE, t(policy_kl), t(ref_kl), beta=beta)
    close(kl, 0.0)
    close(losses, [1 - sigmoid(0.25), 1 - sigmoid(0.5), 1 - sigmoid(0.25), 1 - sigmoid(0.5)])


def test_kto_gradients_skip_kl_and_reference():
    beta, w_u = 0.5, 1.5
    policy, ref = t(KTO_POLICY, grad=True), t(KTO_REF, grad=True)
    policy_kl, ref_kl = t([-6.0, -7.0, -5.0, -8.0], grad=True), t([-6.4, -7.2, -5.6, -8.0], grad=True)
    losses, rewards, kl = kto_loss(policy, ref, KTO_DESIRABLE, policy_kl, ref_kl, beta=beta,
                                   undesirable_weight=w_u)
    losses.sum().backward()
    assert policy_kl.grad is None and ref_kl.grad is None and ref.grad is None
    assert not kl.requires_grad and not rewards.requires_grad
    s_d, s_u = sigmoid(beta * (0.5 - 0.3)), sigmoid(beta * (0.3 + 1.0))
    close(policy.grad, [-beta * s_d * (1 - s_d), w_u * beta * s_u * (1 - s_u)] * 2)


def test_kto_mismatched_indices_rotate_completions_by_one():
    idx = kto_mismatched_indices(4)
    assert idx.tolist() == [3, 0, 1, 2]  # KL pair i = (prompt i, completion idx[i])
    assert all(idx[(i + 1) % 4].item() == i for i in range(4))  # completion i meets prompt i+1
    assert sorted(idx.tolist()) == [0, 1, 2, 3]  # the same completions, each under another prompt
    with pytest.raises(ConfigError, match="batch_size"):
        kto_mismatched_indices(1)


# ----------------------------------------------------------------------------- SimPO / ORPO


def test_simpo_golden_and_trl_gamma_mapping():
    beta, ratio = 2.0, 0.5
    avg_c, avg_r = [-0.8, -1.5], [-1.2, -1.0]
    losses, chosen_r, rejected_r = simpo_loss(t(avg_c), t(avg_r), beta=beta, gamma_beta_ratio=ratio)
    # Paper Eq. 6 with gamma = ratio * beta ...
    gamma = ratio * beta
    close(losses, [-logsig(beta * c - beta * r - gamma) for c, r in zip(avg_c, avg_r)])
    # ... and TRL's CPO form with simpo_gamma = gamma: logits = (c - r) - simpo_gamma / beta.
    close(losses, [-logsig(beta * ((c - r) - gamma / beta)) for c, r in zip(avg_c, avg_r)])
    close(chosen_r, [beta * c for c in avg_c])
    close(rejected_r, [beta * r for r in avg_r])
    eps = 0.2
    z = [beta * (c - r - ratio) for c, r in zip(avg_c, avg_r)]
    close(simpo_loss(t(avg_c), t(avg_r), label_smoothing=eps)[0],
          [-(1 - eps) * logsig(x) - eps * logsig(-x) for x in z])


def test_simpo_gradient_flows_to_both_policy_logps():
    c, r = t([-0.8], grad=True), t([-1.2], grad=True)
    simpo_loss(c, r)[0].sum().backward()
    s = sigmoid(-2.0 * (0.4 - 0.5))
    close(c.grad, [-2.0 * s])
    close(r.grad, [2.0 * s])


def log1m_exp(x: float) -> float:
    return math.log(-math.expm1(x))


def test_orpo_golden():
    lam, nll = 0.1, 0.7
    avg_c, avg_r = [-0.5, -0.2], [-1.5, -0.9]
    losses, chosen_r, rejected_r, log_odds = orpo_loss(t(avg_c), t(avg_r), torch.tensor(nll), lam=lam)
    # Eq. 4 odds and Eq. 7, computed the way TRL writes it: log1p(-exp(x)).
    lo = [(c - r) - (math.log1p(-math.exp(c)) - math.log1p(-math.exp(r))) for c, r in zip(avg_c, avg_r)]
    close(log_odds, lo)
    close(losses, [nll - lam * logsig(x) for x in lo])
    close(chosen_r, [lam * c for c in avg_c])
    close(rejected_r, [lam * r for r in avg_r])
    # Per-example NLL broadcasts too.
    close(orpo_loss(t(avg_c), t(avg_r), t([1.0, 2.0]), lam=lam)[0], [1.0 - lam * logsig(lo[0]),
                                                                    2.0 - lam * logsig(lo[1])])


def test_orpo_is_fp32_and_finite_at_the_extremes():
    lam = 0.1
    # p ~ 1 (avg logp just below 0, and exactly 0) against very negative, and the reverse.
    chosen = t([-1e-7, 0.0, -30.0], grad=True)
    rejected = t([-50.0, -80.0, -0.01], grad=True)
    nll = t([0.3, 0.3, 0.3], grad=True)
    losses, _, _, log_odds = orpo_loss(chosen, rejected, nll, lam=lam)
    losses.sum().backward()
    for x in (losses, log_odds, chosen.grad, rejected.grad, nll.grad):
        assert torch.isfinite(x).all(), x
    c, r = chosen.tolist(), rejected.tolist()  # fp32-rounded inputs
    lo0 = (c[0] - r[0]) - (log1m_exp(c[0]) - log1m_exp(r[0]))  # ~ 50 + 16.12
    lo2 = (c[2] - r[2]) - (log1m_exp(c[2]) - log1m_exp(r[2]))  # ~ -29.99 - 4.61
    close(log_odds[[0, 2]], [lo0, lo2], tol=1e-6)
    close(losses[[0, 2]], [0.3 - lam * logsig(lo0), 0.3 - lam * logsig(lo2)])
    assert log_odds[1].item() > 80  # p == 1 exactly: huge but finite odds instead of inf
    close(nll.grad, [1.0, 1.0, 1.0])
    # bf16 inputs are computed and returned in fp32.
    out = orpo_loss(t([-0.5]).bfloat16(), t([-1.5]).bfloat16(), torch.tensor(0.7).bfloat16())
    assert all(x.dtype == torch.float32 for x in out)


# ----------------------------------------------------------------------------- PPO

MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_ppo_kl_rewards_score_on_last_real_token():
    score = t([2.0, -1.0])
    logprobs = t([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
    ref = t([[-1.2, -1.5, -0.5], [-0.4, -0.7, -1.0]])
    rewards = ppo_kl_rewards(score, logprobs, ref, MASK, kl_coef=0.05)
    close(rewards, [-0.05 * 0.2, -0.05 * -0.5, 2.0, -0.05 * 0.1, -1.0, 0.0])


def test_gae_golden_with_padding():
    gamma, lam = 1.0, 0.95
    # Padding slots hold junk (7.0, 9.0) that must not leak into the result.
    rewards = t([[0.0, -0.1, 1.0], [0.1, 1.0, 7.0]])
    values = t([[0.3, 0.5, 0.8], [0.5, 0.2, 9.0]])
    adv, ret = gae(rewards, values, MASK, gamma=gamma, lam=lam)
    # Row 0: delta_t = r_t + gamma V_{t+1} - V_t with V_3 = 0.
    d0 = [0.0 + gamma * 0.5 - 0.3, -0.1 + gamma * 0.8 - 0.5, 1.0 + 0.0 - 0.8]
    a0_2 = d0[2]
    a0_1 = d0[1] + gamma * lam * a0_2
    a0_0 = d0[0] + gamma * lam * a0_1
    # Row 1 ends after t=1.
    a1_1 = 1.0 + 0.0 - 0.2
    a1_0 = (0.1 + gamma * 0.2 - 0.5) + gamma * lam * a1_1
    close(adv, [a0_0, a0_1, a0_2, a1_0, a1_1, 0.0])  # [0.5705, 0.39, 0.2, 0.56, 0.8, 0]
    close(ret, [a0_0 + 0.3, a0_1 + 0.5, a0_2 + 0.8, a1_0 + 0.5, a1_1 + 0.2, 0.0])
    # gamma < 1 discounts the bootstrap value and the trace.
    adv9, _ = gae(rewards, values, MASK, gamma=0.9, lam=lam)
    close(adv9[1, 0], (0.1 + 0.9 * 0.2 - 0.5) + 0.9 * lam * 0.8)
    with pytest.raises(ValueError, match="right-padded"):
        gae(rewards, values, torch.tensor([[0, 1, 1], [1, 1, 0]]))


def test_masked_mean_and_whiten():
    x = t([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]])
    close(masked_mean(x, m), 2.5)
    close(masked_mean(x, m, axis=1), [1.5, 3.5])
    var = ((1.5**2 + 0.5**2) * 2) / 3  # unbiased over the 4 unmasked values
    w = masked_whiten(x, m)
    close(w[:, :2], [(v - 2.5) / math.sqrt(var + 1e-8) for v in (1.0, 2.0, 3.0, 4.0)])


def test_ppo_policy_loss_clip_golden_and_gradient():
    old = t([[-1.0, -1.0], [-1.0, -1.0]])
    logprobs = (old + t([[0.5, -0.5], [-0.5, 0.1]])).detach().requires_grad_(True)
    old.requires_grad_(True)
    adv = t([[1.0, 1.0], [-1.0, 5.0]], grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, clipfrac = ppo_policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    up, down = math.exp(0.5), math.exp(-0.5)
    # token 00: ratio 1.65, A>0 -> clipped to 1.2; 01: ratio 0.61, A>0 -> unclipped; 10: A<0 -> clipped 0.8.
    per_token = [max(-up, -1.2), max(-down, -0.8), max(down, 0.8)]
    close(loss, sum(per_token) / 3)
    close(clipfrac, 2 / 3)
    loss.backward()
    close(logprobs.grad, [0.0, -down / 3, 0.0, 0.0])  # only the unclipped real token carries gradient
    assert old.grad is None and adv.grad is None


def test_ppo_value_loss_clip_golden():
    values = t([[2.0, 1.1], [0.5, 3.0]], grad=True)
    old = t([[1.0, 1.0], [0.45, 0.0]], grad=True)
    returns = t([[3.0, 0.0], [1.0, 0.0]], grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, clipfrac = ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    # 00: clip(2.0, 0.8, 1.2) = 1.2 -> max((2-3)^2, (1.2-3)^2) = 3.24; 01, 10 inside the clip range.
    close(loss, 0.5 * (max(1.0, 1.8**2) + 1.1**2 + 0.5**2) / 3)
    close(clipfrac, 1 / 3)
    loss.backward()
    close(values.grad[0, 0], 0.0)  # the clipped branch is flat in V
    close(values.grad[1, 0], 0.5 * 2 * (0.5 - 1.0) / 3)
    assert old.grad is None and returns.grad is None


# ----------------------------------------------------------------------------- GRPO


def test_grpo_advantages_golden():
    rewards = t([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    g1_std = math.sqrt(4 * 0.5**2 / 3)  # unbiased std of [1, 0, 0, 1]
    g2_std = math.sqrt((3 * 0.25**2 + 0.75**2) / 3)  # of [1, 1, 1, 0]
    a1, a2 = 0.5 / (g1_std + 1e-4), 1 / (g2_std + 1e-4)
    expected = [a1, -a1, -a1, a1] + [0.25 * a2] * 3 + [-0.75 * a2] + [0.0] * 4  # equal group -> 0
    close(grpo_advantages(rewards, 4), expected)
    close(grpo_advantages(rewards, 4, scale=False), [0.5, -0.5, -0.5, 0.5] + [0.25] * 3 + [-0.75] + [0.0] * 4)


def test_grpo_advantages_bad_group_size():
    with pytest.raises(ConfigError, match="group_size"):
        grpo_advantages(t([1.0, 0.0]), 1)
    with pytest.raises(ConfigError, match="rewards.shape"):
        grpo_advantages(t([1.0, 0.0, 1.0]), 2)


GRPO_MASK = torch.tensor([[1, 1], [1, 0]])


def grpo_inputs():
    logprobs = t([[-1.0, -2.0], [-0.5, -3.0]], grad=True)
    old = t([[-1.3, -2.0], [-0.1, -1.0]], grad=True)
    ref = t([[-1.1, -1.8], [-0.7, -2.0]], grad=True)
    adv = t([1.5, -0.5], grad=True)
    return logprobs, old, ref, adv


def test_grpo_loss_golden_with_kl():
    eps, beta = 0.2, 0.04
    logprobs, old, ref, adv = grpo_inputs()
    loss, metrics = grpo_loss(logprobs, old, adv, GRPO_MASK, epsilon=eps, beta=beta, ref_logprobs=ref)
    r00, r10 = math.exp(0.3), math.exp(-0.4)  # 00: above 1+eps with A>0; 10: below 1-eps with A<0
    surrogate = [-min(r00 * 1.5, 1.2 * 1.5), -min(1.0 * 1.5, 1.0 * 1.5), -min(r10 * -0.5, 0.8 * -0.5)]
    k3 = [math.exp(d) - d - 1 for d in (-1.1 + 1.0, -1.8 + 2.0, -0.7 + 0.5)]  # ref - logp
    close(loss, sum(s + beta * k for s, k in zip(surrogate, k3)) / 3)
    close(metrics["kl"], sum(k3) / 3)
    close(metrics["clip_ratio/high_mean"], 1 / 3)
    close(metrics["clip_ratio/low_mean"], 1 / 3)
    close(metrics["clip_ratio/region_mean"], 2 / 3)
    loss.backward()
    assert ref.grad is None and old.grad is None and adv.grad is None
    # Token 01: ratio 1 unclipped -> -A/3 from the surrogate plus beta * d k3/d logp = beta (1 - e^{ref-logp}) / 3.
    close(logprobs.grad[0, 1], (-1.5 + beta * (1 - math.exp(0.2))) / 3)
    close(logprobs.grad[1, 1], 0.0)  # padding


def test_grpo_loss_without_kl_and_single_iteration():
    logprobs, old, _, adv = grpo_inputs()
    loss, metrics = grpo_loss(logprobs, old, adv, GRPO_MASK, epsilon=0.2)
    close(loss, (-1.8 - 1.5 + 0.4) / 3)
    assert "kl" not in metrics
    # old_logprobs=None: ratio 1 everywhere, gradient is the plain policy gradient -A per token.
    logprobs2 = logprobs.detach().requires_grad_(True)
    loss2, _ = grpo_loss(logprobs2, None, adv, GRPO_MASK)
    close(loss2, (-1.5 - 1.5 + 0.5) / 3)
    loss2.backward()
    close(logprobs2.grad, [-1.5 / 3, -1.5 / 3, 0.5 / 3, 0.0])
    with pytest.raises(ConfigError, match="beta"):
        grpo_loss(logprobs, old, adv, GRPO_MASK, beta=0.1)
