"""The ZipR1 / GRPO objective (paper Eq. 4-5), in the spirit of tiny-grpo's loss.py.

For one question the rollout samples N answers o_1..o_N (each with its own top-p threshold p_n); each answer
gets a scalar reward r_n. GRPO needs no value model: the advantage of every token of answer n is its reward
standardised within its group (Eq. 4), and the policy maximises a PPO-style clipped surrogate minus a KL
penalty to the frozen full-attention reference model (Eq. 5):

    A_n     = (r_n - mean(r)) / (std(r) + eps)                                        (Eq. 4)
    rho_t   = pi_theta(o_t | q, o_<t) / pi_old(o_t | q, o_<t)
    J       = E[ min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) - beta KL_t(pi_theta || pi_ref) ]  (Eq. 5)
    KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (the k3 estimator, unbiased and >= 0)

The loss is -J; `loss_type` picks how per-token terms are averaged (see `grpo_loss`).
Shapes: B = G*N sequences (G groups of N answers, group-contiguous), T completion tokens, V vocabulary.
"""
import torch

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
REWARD_SCALINGS = ("group", "batch", "none")  # TRL's scale_rewards: the std Eq. 4 divides by
KL_LOG_RATIO_CLAMP = 20.0  # |ref - logp| is clamped to this before exp(): exp(20) ~ 5e8, finite in fp16/bf16/fp32


def group_advantages(rewards: torch.Tensor, num_generations: int, eps: float = 1e-4,
                     scale: str = "group") -> torch.Tensor:
    """Eq. 4: A = (r - mean_group(r)) / (std_group(r) + eps), per group of `num_generations` answers.

    scale (TRL's scale_rewards): "group" is Eq. 4; "batch" divides by the std of all rewards of the batch (the mean
    stays per group); "none" only centres, A = r - mean_group(r) (Dr. GRPO).

    `rewards` is (G*N,) in group-contiguous order (answers 0..N-1 belong to question 0, ...) or (G, N); the
    result has the same shape. std is the *unbiased* (Bessel-corrected, divide by N-1) sample std, as in TRL's
    GRPOTrainer (torch.std), so numbers match the most used open implementation. A group whose rewards are all
    equal (std 0, including N=1) carries no learning signal and gets exactly zero advantages, never NaN.
    """
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if rewards.dim() == 1 and rewards.numel() % num_generations != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of num_generations={num_generations}")
    if rewards.dim() == 2 and rewards.shape[1] != num_generations:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} need {num_generations} columns (G, N)")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be (G*N,) or (G, N), got shape {tuple(rewards.shape)}")
    if scale not in REWARD_SCALINGS:
        raise ValueError(f"scale must be one of {REWARD_SCALINGS}, got {scale!r}")
    r = rewards.reshape(-1, num_generations).to(torch.float32)  # (G, N)
    mean = r.mean(dim=1, keepdim=True)  # (G, 1)
    if scale == "group":
        std = r.std(dim=1, keepdim=True, correction=1 if num_generations > 1 else 0)  # (G, 1)
        advantages = (r - mean) / (std + eps)  # (G, N)  # Eq. 4
    elif scale == "batch":
        advantages = (r - mean) / (r.std(correction=1 if r.numel() > 1 else 0) + eps)  # (G, N)
    else:
        advantages = r - mean  # (G, N)
    constant = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)  # (G, 1) zero-std groups
    advantages = torch.where(constant, torch.zeros_like(advantages), advantages)  # (G, N)
    return advantages.reshape(rewards.shape)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token_t | context) = logits_t[token_t] / temp - logsumexp(logits_t / temp), per token.

    logits (B, T, V) must already be aligned with tokens (B, T): logits[:, t] is the distribution that
    produced tokens[:, t] (i.e. pass model logits[:, :-1] against ids[:, 1:]). `temperature` must be the one the
    rollout sampled with, so the ratio in Eq. 5 compares the same distributions. Works one sequence at a time
    in float32, so the peak extra memory is one (T, V) row instead of a full (B, T, V) log_softmax copy.
    Returns float32 (B, T).
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"need logits (B, T, V), tokens (B, T); got {tuple(logits.shape)}, {tuple(tokens.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows = []
    for row_logits, row_tokens in zip(logits, tokens):  # (T, V), (T,)
        scaled = row_logits.float() / temperature  # (T, V)
        picked = scaled.gather(-1, row_tokens.long().unsqueeze(-1)).squeeze(-1)  # (T,)
        rows.append(picked - torch.logsumexp(scaled, dim=-1))  # (T,)
    return torch.stack(rows)  # (B, T)


def completion_mask(completion_ids: torch.Tensor, eos_token_id, pad_token_id: int | None = None) -> torch.Tensor:
    """1 for every completion token up to and including the first EOS, 0 after it and on padding.

    completion_ids (B, T); eos_token_id is an int or a list of ints (chat models often stop on several ids).
    Pad positions before the first EOS are 0 too; if pad_token_id equals an EOS id the first EOS is still kept.
    Returns int64 (B, T).
    """
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_ids must be (B, T), got shape {tuple(completion_ids.shape)}")
    eos_ids = torch.as_tensor(eos_token_id, device=completion_ids.device).reshape(-1)  # (E,)
    is_eos = torch.isin(completion_ids, eos_ids)  # (B, T)
    eos_seen = is_eos.long().cumsum(dim=1)  # (B, T) number of EOS at or before t
    first_eos = is_eos & (eos_seen == 1)  # (B, T)
    keep = (eos_seen == 0) | first_eos  # (B, T) before the first EOS, or the EOS itself
    if pad_token_id is not None:
        keep &= (completion_ids != pad_token_id) | first_eos  # (B, T)
    return keep.long()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (0 if the mask is empty)."""
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = ref - logp clamped to +-20."""
    d = (ref_logp - logp).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)  # (B, T)
    return torch.exp(d) - d - 1  # (B, T)


def loss_normalizer(mask: torch.Tensor, loss_type: str, max_completion_length: int | None = None) -> int:
    """The count n that `grpo_loss` divides a batch's summed loss by, for mask (B, T) and `loss_type`:
    "grpo": B sequences (the sum is of per-sequence means); "bnpo", "dapo": Σ m, the completion tokens;
    "dr_grpo": B · max_completion_length (default T). A batch split into micro-batches b has n = Σ_b n_b, so
    multi_gpu.loss_weight only needs each micro-batch's n_b and their sum over ranks."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if loss_type in ("bnpo", "dapo"):
        return int(mask.sum())
    if loss_type == "dr_grpo":
        return mask.shape[0] * (max_completion_length or mask.shape[1])
    return mask.shape[0]


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.04,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 5 as a loss: -[min(rho A, clip(rho, 1-eps, 1+eps_high) A) - beta KL_k3], averaged per `loss_type`.

    logp (B, T) are the policy's log-probs (with grad) of the sampled tokens; old_logp (B, T) the sampling
    policy's (None -> logp.detach(), the single-update mu=1 case where rho = 1 but its gradient is grad log pi);
    ref_logp (B, T) the reference model's (None or beta=0 -> no KL term); advantages (B,) per sequence or (B, T);
    mask (B, T) 1 on completion tokens. Masked positions must hold finite values. Aggregation of per-token loss l:
      "grpo":          mean_i [ sum_t l_it m_it / sum_t m_it ]   (the paper's J; an all-masked row counts as 0)
      "bnpo", "dapo":  sum_it l_it m_it / sum_it m_it            (token-level, one normaliser for the batch)
      "dr_grpo":       sum_it l_it m_it / (B * max_completion_length)   (Dr. GRPO; default length T)
    (the denominators are `loss_normalizer`'s).
    Returns (loss, stats): stats has kl (masked mean k3, nan without ref_logp), clip_fraction (masked tokens whose
    clip was active: rho < 1-eps with A < 0, or rho > 1+eps_high with A > 0), its _low/_high parts, ratio_mean.
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high  # loss_type is checked by loss_normalizer
    if not (0 <= epsilon < 1 and epsilon_high >= 0 and beta >= 0):
        raise ValueError(f"need 0 <= epsilon < 1, epsilon_high >= 0, beta >= 0; got {epsilon}, {epsilon_high}, {beta}")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected logp's {tuple(logp.shape)} (B, T)")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages must be (B,) or (B, T); got {tuple(advantages.shape)}, logp {tuple(logp.shape)}")

    mask = mask.bool()  # (B, T)
    adv = advantages.to(logp.dtype).detach()
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # (B, 1) or (B, T)
    old_logp = logp.detach() if old_logp is None else old_logp.detach()
    ratio = torch.exp(logp - old_logp)  # (B, T)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high)  # (B, T)
    objective = torch.min(ratio * adv, clipped * adv)  # (B, T)  # Eq. 5, clipped surrogate
    kl = kl_k3(logp, ref_logp.detach()) if ref_logp is not None else None  # (B, T)
    if kl is not None and beta != 0:
        objective = objective - beta * kl  # (B, T)  # Eq. 5, KL penalty
    per_token_loss = torch.where(mask, -objective, 0.0)  # (B, T)

    if loss_type == "grpo":  # Eq. 5: 1/G sum_i 1/|o_i| sum_t
        summed = (per_token_loss.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()  # Σ_i of per-sequence means
    else:  # bnpo, dapo, dr_grpo: every token's loss
        summed = per_token_loss.sum()
    loss = summed / max(loss_normalizer(mask, loss_type, max_completion_length), 1)

    with torch.no_grad():
        low = (ratio < 1 - epsilon) & (adv < 0)  # (B, T)
        high = (ratio > 1 + epsilon_high) & (adv > 0)  # (B, T)
        stats = {
            "kl": masked_mean(kl, mask).item() if kl is not None else float("nan"),
            "clip_fraction": masked_mean((low | high).float(), mask).item(),
            "clip_low_fraction": masked_mean(low.float(), mask).item(),
            "clip_high_fraction": masked_mean(high.float(), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, stats
