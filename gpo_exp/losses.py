"""Pure loss functions for the base optimizers: tensors in, tensors out, no models, no state.

Every function states the paper equation it implements and the TRL v1.9 code path whose numbers it
reproduces (fp32, to 1e-6). Conventions shared by all functions:

- "logps" arguments are 1-D per-sequence log-probabilities of shape (B,): the sum over completion
  tokens, unless the name says `avg` (the per-token mean over completion tokens).
- Per-token arguments are (B, T) with a right-padded `mask` (1 for completion tokens, 0 for padding).
- Preference losses return per-example losses (B,); the caller reduces (TRL takes the mean).
  PPO/GRPO losses return the already-reduced scalar, because their reduction is part of the method.
- Anything that is not the trained policy (reference logps, old logps, advantages, returns, old values,
  KL reference points) is detached here, so it acts as a constant even if the caller forgot no_grad.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gpo_exp.registry import check

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


# ----------------------------------------------------------------------------- masked helpers


def masked_mean(values: Tensor, mask: Tensor, axis: int | None = None) -> Tensor:
    """Mean of `values` over positions where `mask` is 1 (TRL `masked_mean`)."""
    mask = mask.to(values.dtype)
    if axis is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(axis) / mask.sum(axis)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over masked positions, Bessel-corrected like TRL `masked_var`."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"masked_var needs at least 2 unmasked values, got {int(n)}")
        variance = variance * (n / (n - 1))
    return variance


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise to zero mean / unit variance over masked positions (TRL `masked_whiten`, eps 1e-8).

    With shift_mean=False the mean is added back (TRL uses that to whiten rewards).
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def _check_right_padded(mask: Tensor) -> None:
    """GAE and the score position assume every row is real tokens followed only by padding."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, T), got shape {tuple(mask.shape)}")
    m = mask.to(torch.int64)
    if (m[:, 1:] > m[:, :-1]).any():
        raise ValueError("mask must be right-padded: 1s then 0s in every row")
    if (m.sum(-1) == 0).any():
        raise ValueError("mask has a row with no tokens; every rollout needs at least one")


# ----------------------------------------------------------------------------- DPO


def dpo_logps_for(loss_type: str, summed_logps: Tensor, lengths: Tensor) -> Tensor:
    """The per-sequence logps `dpo_loss` expects for `loss_type`: summed, or per-token mean for ipo.

    TRL DPOTrainer (`_compute_loss`, loss_type="ipo") divides each summed log-ratio by its number of
    completion tokens (clamped at 1); dividing the policy and reference logps by the same lengths here
    is the same number. Use it on policy and reference logps alike.
    """
    check(loss_type in DPO_LOSS_TYPES, "loss_type", loss_type, f"one of {', '.join(DPO_LOSS_TYPES)}")
    if loss_type == "ipo":
        return summed_logps / lengths.to(summed_logps.dtype).clamp(min=1.0)
    return summed_logps


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    dpop_lambda: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO and its pairwise variants. Returns (losses (B,), chosen_rewards, rejected_rewards).

    With h = (pi_c - ref_c) - (pi_r - ref_r) (log-ratio margin) and eps = label_smoothing:
      sigmoid: -log sigma(beta h)  -- "Direct Preference Optimization: Your Language Model is Secretly
               a Reward Model" (Rafailov et al. 2023), Eq. 7.
      ipo:     (h - 1/(2 beta))^2  -- "A General Theoretical Paradigm to Understand Learning from Human
               Preferences" (Azar et al. 2023), Eq. 17; beta plays tau. The CALLER passes per-token
               averaged logps (see `dpo_logps_for`), as TRL does.
      hinge:   max(0, 1 - beta h)  -- the SLiC hinge on normalised likelihood used by "Statistical
               Rejection Sampling Improves Preference Optimization" (Liu et al. 2023, RSO).
      robust:  [-(1-eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)  -- the de-biased
               loss of "Provably Robust DPO: Aligning Language Models with Noisy Feedback"
               (Chowdhury et al. 2024); eps is the assumed label-flip rate, in [0, 0.5).
    dpop_lambda > 0 (any loss_type) replaces h by h - lambda * max(0, ref_c - pi_c): DPO-Positive,
    "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive" (Pal et al. 2024),
    Eq. 3. It penalises the chosen completion's likelihood falling below the reference's, which
    plain DPO allows when chosen and rejected differ in few tokens (e.g. one wrong digit).

    Matches TRL v1.9 `DPOTrainer._compute_loss` (f_divergence_type="reverse_kl", one loss type, no
    WPO weighting); TRL applies label_smoothing only to robust, so any other loss_type with a nonzero
    label_smoothing is rejected rather than silently ignored. Rewards are
    beta * (policy - ref), detached, as TRL logs them (`rewards/chosen`, `rewards/rejected`); for ipo
    they are therefore per-token rewards, whereas TRL logs the summed ones.
    """
    check(loss_type in DPO_LOSS_TYPES, "loss_type", loss_type, f"one of {', '.join(DPO_LOSS_TYPES)}")
    check(beta > 0, "beta", beta, "> 0")
    check(dpop_lambda >= 0, "dpop_lambda", dpop_lambda, ">= 0")
    if loss_type == "robust":
        check(0.0 <= label_smoothing < 0.5, "label_smoothing", label_smoothing, "in [0, 0.5) for robust")
    else:
        check(label_smoothing == 0.0, "label_smoothing", label_smoothing, "0.0 unless loss_type is robust")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_logratios = policy_rejected_logps - ref_rejected_logps.detach()
    margin = chosen_logratios - rejected_logratios
    if dpop_lambda > 0:
        margin = margin - dpop_lambda * torch.relu(-chosen_logratios)

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    else:  # robust
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * margin) + eps * F.logsigmoid(-beta * margin)) / (1 - 2 * eps)

    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ----------------------------------------------------------------------------- KTO


def kto_mismatched_indices(batch_size: int) -> Tensor:
    """Completion index for each prompt of the KTO KL batch: KL pair i is (prompt i, completion (i-1)%B).

    Equivalently completion i is paired with prompt (i+1)%B. This is TRL's `_get_kl_dataset`, which
    rotates the completions by one ([c_{B-1}, c_0, ..., c_{B-2}]), so the mismatched outputs are the
    same set as the batch's own outputs, each under a different prompt. TRL refuses a batch of 1
    because the "mismatched" pair would be the matched one.
    """
    check(batch_size >= 2, "batch_size", batch_size, ">= 2 for the KTO KL estimate")
    return (torch.arange(batch_size) - 1) % batch_size


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    policy_kl_logps: Tensor,
    ref_kl_logps: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """KTO loss. Returns (losses (B,), rewards (B,), kl (scalar)).

    "KTO: Model Alignment as Prospect Theoretic Optimization" (Ethayarajh et al. 2024), Eq. 7 (TRL
    cites the same equation): with r = policy - ref and reference point z0 = KL estimate,
      desirable:   w_d * (1 - sigma(beta (r - z0)))
      undesirable: w_u * (1 - sigma(beta (z0 - r)))
    z0 = mean over the batch of (policy_kl_logps - ref_kl_logps), clamped at 0 and detached; the KL
    logps are those of the mismatched (prompt, completion) pairs of `kto_mismatched_indices`.

    Matches TRL v1.9 `KTOTrainer.kto_loss` (loss_type="kto", calculate_KL=True, one process: TRL
    averages the KL over processes). TRL concatenates the desirable then undesirable losses; here
    they stay in batch order, which leaves the mean unchanged. rewards = beta * r, detached.
    """
    check(beta > 0, "beta", beta, "> 0")
    desirable = desirable.to(torch.bool)
    kl = (policy_kl_logps.detach() - ref_kl_logps.detach()).mean().clamp(min=0)
    logratios = policy_logps - ref_logps.detach()
    chosen_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    rejected_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(desirable, chosen_losses, rejected_losses)
    return losses, beta * logratios.detach(), kl


# ----------------------------------------------------------------------------- SimPO / ORPO


def simpo_loss(
    policy_chosen_avg_logps: Tensor,
    policy_rejected_avg_logps: Tensor,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO loss (reference-free, length-normalised). Returns (losses (B,), chosen_rewards, rejected_rewards).

    "SimPO: Simple Preference Optimization with a Reference-Free Reward" (Meng et al. 2024), Eq. 6:
      -log sigma(beta * avg_c - beta * avg_r - gamma),  gamma = gamma_beta_ratio * beta,
    with cDPO-style label smoothing as TRL applies it:
      -(1-eps) log sigma(z) - eps log sigma(-z),  z = beta * (avg_c - avg_r - gamma_beta_ratio).

    Matches TRL v1.9 `CPOTrainer.cpo_loss` with loss_type="simpo" (its logps are per-token averages
    for simpo) and cpo_alpha=0 (pure SimPO; TRL's default cpo_alpha=1 adds an NLL term).
    TRL's `simpo_gamma` is the absolute margin gamma, so simpo_gamma = gamma_beta_ratio * beta.
    Rewards are beta * avg logps, detached, as TRL logs them.
    """
    check(beta > 0, "beta", beta, "> 0")
    check(0.0 <= label_smoothing < 0.5, "label_smoothing", label_smoothing, "in [0, 0.5)")
    z = beta * (policy_chosen_avg_logps - policy_rejected_avg_logps - gamma_beta_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * policy_chosen_avg_logps.detach(), beta * policy_rejected_avg_logps.detach()


def _log1m_exp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012, "Accurately Computing log(1-exp(-|a|))").

    Near 0 (p close to 1) use log(-expm1(x)); far below, log1p(-exp(x)). x is clamped just below 0 so
    p == 1 gives a large negative number instead of -inf.
    """
    ln2 = 0.6931471805599453
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    # Feed each branch only inputs where it is finite, so torch.where's backward sees no inf * 0.
    near = torch.log(-torch.expm1(torch.clamp(x, min=-ln2)))
    far = torch.log1p(-torch.exp(torch.clamp(x, max=-ln2)))
    return torch.where(x > -ln2, near, far)


def orpo_loss(
    policy_chosen_avg_logps: Tensor,
    policy_rejected_avg_logps: Tensor,
    chosen_nll: Tensor,
    *,
    lam: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ORPO loss. Returns (losses (B,), chosen_rewards, rejected_rewards, log_odds_ratio (B,)), all fp32.

    "ORPO: Monolithic Preference Optimization without Reference Model" (Hong et al. 2024):
    odds(y|x) = p / (1 - p) with p = exp(avg logp) (Eq. 4); L_OR = -log sigma(log odds_c - log odds_r)
    (Eq. 7); L_ORPO = L_SFT + lam * L_OR (Eq. 6). L_SFT is `chosen_nll`: pass TRL's scalar
    (token-level cross-entropy over all chosen tokens of the batch) to get TRL's loss from
    losses.mean(); a (B,) per-example NLL also broadcasts.

    Matches TRL v1.9 `ORPOTrainer.odds_ratio_loss` + `get_batch_loss_metrics` (beta there is lam).
    log(1 - p) uses the stable `_log1m_exp` instead of TRL's log1p(-exp(x)): both agree to 1e-6 for
    avg logps <= -0.01; closer to 0 TRL's fp32 form loses digits and is -inf at p = 1, while this one
    stays accurate and finite. Rewards are lam * avg logps (detached);
    log_odds_ratio is the detached per-example log odds ratio: TRL logs its mean as
    `log_odds_chosen` and the mean of its log-sigmoid as `log_odds_ratio`.
    """
    check(lam >= 0, "lam", lam, ">= 0")
    chosen = policy_chosen_avg_logps.float()
    rejected = policy_rejected_avg_logps.float()
    log_odds = (chosen - rejected) - (_log1m_exp(chosen) - _log1m_exp(rejected))
    losses = chosen_nll.float() - lam * F.logsigmoid(log_odds)
    return losses, lam * chosen.detach(), lam * rejected.detach(), log_odds.detach()


# ----------------------------------------------------------------------------- PPO


def ppo_kl_rewards(
    score: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, *, kl_coef: float = 0.05
) -> Tensor:
    """Per-token PPO rewards (B, T): -kl_coef * (logp - ref_logp) on every real token, score added on the last.

    KL-shaped reward of "Fine-Tuning Language Models from Human Preferences" (Ziegler et al. 2019),
    Eq. 2, with the k1 estimator per token. Matches TRL's `PPOTrainer.compute_rewards` (score on the last
    non-masked token). TRL v1.9's PPOTrainer (`train`, step "4. compute rewards") instead adds the score
    one slot past the last token when that slot exists (logprobs there are set equal, so KL 0), and
    trains the value on that extra slot; that off-by-one is not reproduced. Padding gets 0; detached.
    """
    _check_right_padded(mask)
    m = mask.to(logprobs.dtype)
    rewards = -kl_coef * (logprobs.detach() - ref_logprobs.detach()) * m
    last = mask.to(torch.int64).sum(-1) - 1
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += score.detach().to(rewards.dtype)
    return rewards


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation over (B, T) tokens. Returns (advantages, returns), detached.

    "Proximal Policy Optimization Algorithms" (Schulman et al. 2017), Eqs. 11-12 (truncated GAE of
    "High-Dimensional Continuous Control Using Generalized Advantage Estimation", Eq. 16):
      delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  returns = A + V,
    with V and r zeroed on padding, so the episode ends after the last real token (V_T = 0).
    Matches TRL's backward GAE loop (`PPOTrainer.compute_advantages` / v1.9 `train` step 6) before
    whitening: TRL then whitens the advantages with `masked_whiten(advantages, mask)`; do that here
    with `masked_whiten` if you want TRL's numbers. Returns are built from the un-whitened advantages.
    """
    _check_right_padded(mask)
    m = mask.to(values.dtype)
    rewards, values = rewards.detach() * m, values.detach() * m
    T = rewards.shape[1]
    running = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        running = delta + gamma * lam * running
        reversed_advantages.append(running)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages * m, (advantages + values) * m


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_range: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Clipped surrogate policy loss (scalar) and clip fraction.

    "Proximal Policy Optimization Algorithms" (Schulman et al. 2017), Eq. 7 (L^CLIP, negated):
      masked_mean(max(-A ratio, -A clip(ratio, 1-eps, 1+eps))),  ratio = exp(logp - old_logp).
    clipfrac = masked mean of (clipped term > unclipped term). Matches TRL v1.9 `PPOTrainer.train`
    (`pg_loss`, `pg_clipfrac`) and the legacy `PPOTrainer.loss`.
    """
    check(clip_range > 0, "clip_range", clip_range, "> 0")
    advantages = advantages.detach()
    ratio = torch.exp(logprobs - old_logprobs.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(loss.dtype), mask).detach()
    return loss, clipfrac


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_range_value: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Clipped value loss (scalar) and clip fraction.

    0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)): the squared-error value
    term of "Proximal Policy Optimization Algorithms" (Schulman et al. 2017), Eq. 9 (L^VF), with the
    value clipping of the OpenAI baselines ppo2 code it shipped with. Matches TRL v1.9
    `PPOTrainer.train` (`vf_loss`, `vf_clipfrac`).
    """
    check(clip_range_value > 0, "clip_range_value", clip_range_value, "> 0")
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_err, clipped_err), mask)
    clipfrac = masked_mean((clipped_err > unclipped_err).to(loss.dtype), mask).detach()
    return loss, clipfrac


# ----------------------------------------------------------------------------- GRPO


def grpo_advantages(rewards: Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """Group-normalised advantages (G*M,): (r - group mean) / (group std + eps); groups are contiguous.

    "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models" (Shao et al.
    2024), Sec. 4.1.2 (outcome supervision), used in the GRPO objective Eq. 3. The std is torch's
    unbiased (Bessel-corrected) std, as in TRL v1.9 `GRPOTrainer._generate_and_score_completions`
    (scale_rewards="group" for scale=True, "none" for scale=False; eps 1e-4). A group whose rewards
    are all equal gets advantage 0.
    """
    check(group_size >= 2, "group_size", group_size, ">= 2 (the group std needs two samples)")
    check(rewards.dim() == 1 and rewards.numel() % group_size == 0, "rewards.shape", tuple(rewards.shape),
          f"1-D with a length divisible by group_size={group_size}")
    grouped = rewards.detach().view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale:
        std = grouped.std(dim=1).repeat_interleave(group_size)
        advantages = advantages / (std + eps)
    return advantages


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon: float = 0.2,
    beta: float = 0.0,
    ref_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss (scalar) and metrics, from per-token logprobs (B, T) and per-sequence advantages (B,).

    "DeepSeekMath: ..." (Shao et al. 2024), Eq. 3 (negated): per token
      -min(ratio A, clip(ratio, 1-eps, 1+eps) A) + beta * KL,   ratio = exp(logp - old_logp),
    with the unbiased k3 estimator of Eq. 4: KL = exp(ref - logp) - (ref - logp) - 1.
    Normalisation is the token-level masked mean over the whole batch: TRL v1.9 `GRPOTrainer._compute_loss`
    with loss_type="bnpo" (equal to its default "dapo" on one process without gradient accumulation;
    "grpo" would average per sequence first). old_logprobs=None means one policy update per
    generation (TRL's num_iterations=1): the ratio is 1 but the gradient is the policy gradient.

    metrics (detached scalars, TRL's names): "clip_ratio/low_mean", "clip_ratio/high_mean",
    "clip_ratio/region_mean" and, when ref_logprobs is given, "kl" (masked mean of the k3 term).
    """
    check(epsilon > 0, "epsilon", epsilon, "> 0")
    check(beta >= 0, "beta", beta, ">= 0")
    check(beta == 0.0 or ref_logprobs is not None, "beta", beta, "0.0 when no ref_logprobs are given")
    old = logprobs.detach() if old_logprobs is None else old_logprobs.detach()
    adv = advantages.detach().unsqueeze(1)

    ratio = torch.exp(logprobs - old)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token_loss = -torch.min(ratio * adv, clipped_ratio * adv)

    metrics: dict[str, Tensor] = {}
    if ref_logprobs is not None:
        ref_minus_logp = ref_logprobs.detach() - logprobs
        per_token_kl = torch.exp(ref_minus_logp) - ref_minus_logp - 1
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = masked_mean(per_token_kl, mask).detach()

    m = mask.to(per_token_loss.dtype)
    loss = (per_token_loss * m).sum() / m.sum().clamp(min=1.0)

    low = ((ratio < 1 - epsilon) & (adv < 0)).to(m.dtype)
    high = ((ratio > 1 + epsilon) & (adv > 0)).to(m.dtype)
    metrics["clip_ratio/low_mean"] = masked_mean(low, m).detach()
    metrics["clip_ratio/high_mean"] = masked_mean(high, m).detach()
    metrics["clip_ratio/region_mean"] = masked_mean(torch.clamp(low + high, max=1.0), m).detach()
    return loss, metrics
