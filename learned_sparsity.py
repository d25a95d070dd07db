"""Learned sparsity: the loss term that gives the efficiency reward a gradient (docs/learned_sparsity.md).

The literal ZipR1 reward C·(1 − τ_n) cannot move τ: τ_n does not depend on the sampled answer (no score-function
gradient) and Eq. 3's hard count is piecewise constant (no pathwise gradient). train.py therefore adds

    λ · mean_n C_n · max(τ̃_n − τ*, 0) · [p_n < 1]

to the GRPO loss, τ̃ the relaxed Eq. 3 count (sparse_attention.smooth_top_p_count) of the same teacher forward.
λ = 0 is the paper's literal objective. τ* can fall gradually from 1 (`sparsity_targets_at`), and only while
the rollouts' accuracy holds (`compression_clock`); λ can switch off for recovery phases (`compressing`).
"""
from __future__ import annotations

import math

import torch


def sparsity_coef_at(coef: float, warmup_steps: int, step: int) -> float:
    """λ at this step: coef, ramped linearly over the first warmup_steps (0: no ramp)."""
    ramp = 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)
    return coef * ramp


def sparsity_targets_at(target: float, layer_targets, steps: int, step: int) -> tuple[float, list[float]]:
    """τ* and each τ*_j at this step: from 1 (no push) down to their values over the first `steps` steps along
    (1 − t/steps)³, the gradual pruning schedule of Zhu & Gupta (2017), so τ falls while Eq. 5 keeps recovering the
    accuracy; 0 steps: the targets from the first step."""
    left = 0.0 if steps == 0 else max(0.0, 1 - (step + 1) / steps) ** 3
    return target + (1 - target) * left, [t + (1 - t) * left for t in layer_targets]


def compressing(step: int, cycle_steps: int, recovery_steps: int) -> bool:
    """Whether λ is on at this step: every step (cycle_steps 0), or the first cycle_steps − recovery_steps steps of
    each cycle of cycle_steps, whose last recovery_steps are Eq. 5 alone (alternating compression and recovery)."""
    return cycle_steps == 0 or step % cycle_steps < cycle_steps - recovery_steps


def compression_clock(accuracies, hold: float, decay: float = 0.98, compressed=None) -> int:
    """Where the target schedule stands (`sparsity_targets_at`'s step) after the steps whose rollout accuracies are
    given: every compressing step when hold = 0; otherwise only those at which the accuracy held, its running mean
    (an EMA over steps, this decay) within `hold` of the best running mean so far. So τ* falls only while the accuracy
    holds and waits while Eq. 5 wins it back (a compression schedule that follows accuracy), and stands still in
    recovery phases.  accuracies: one per step, in order; compressed: whether each step compressed (default all)."""
    compressed = [True] * len(accuracies) if compressed is None else compressed
    if hold == 0:
        return sum(compressed)
    clock, mean, best = 0, None, -math.inf
    for acc, on in zip(accuracies, compressed):
        mean = acc if mean is None else decay * mean + (1 - decay) * acc
        best = max(best, mean)
        clock += on and mean >= best - hold
    return clock


def sparsity_gates(kind: str, parts: dict, acc: torch.Tensor, threshold: float = 1.0, group_size: int = 1
                   ) -> torch.Tensor:
    """C per rollout row for the sparsity term: the reward's group gate ("group"), the row's own correctness
    ("answer": acc >= threshold, so binary acc is acc itself and a graded one counts from the threshold), every
    answer of the row's group correct ("all": a question pushes only while it is solved at every p_n), or 1
    ("none").  acc: (G*N,) in groups of group_size N.  Returns (G*N,)"""
    correct = (acc >= threshold).float()  # (G*N,)
    if kind == "all":
        return correct.view(-1, group_size).amin(-1).repeat_interleave(group_size)  # (G*N,)
    return {"group": parts["gate"], "answer": correct, "none": torch.ones_like(acc, dtype=torch.float32)}[kind]


def sparsity_term(tau_layers: torch.Tensor, gate: torch.Tensor, keep_p: torch.Tensor, target: float,
                  per_layer: bool = False, skip_layers=(), layer_targets=(), layer_floors=()) -> torch.Tensor:
    """Per row C·max(τ̃ − target, 0), and 0 where p = 1 (dense rows have nothing to sparsify).  (N,)

    τ̃_j (N, n_layers) is the relaxed Eq. 3 ratio of each layer, with gradient; its pathwise gradient is what the
    literal reward lacks. τ̃ is the mean over the layers not in skip_layers; per_layer hinges each τ̃_j at the
    target and averages the hinges instead, so layers already below it are not pushed to make up for one that resists.
    layer_targets (one per layer) gives each layer its own target τ*_j and hinges per layer: a per-layer budget.
    layer_floors (one per layer) adds the mean of max(f_j − τ̃_j, 0): a layer that falls below its floor f_j (the
    toy's layer 1 overshot its target) is pulled back up, so the budget is a band [f_j, τ*_j].
    """
    skip = set(skip_layers)
    layers = [j for j in range(tau_layers.shape[-1]) if j not in skip]
    tau = tau_layers[:, layers]  # (N, J): the layers the term acts on
    on_layers = lambda values: torch.as_tensor(values, dtype=tau.dtype, device=tau.device)[layers]  # noqa: E731 (J,)
    if len(layer_targets):
        targets = on_layers(layer_targets)  # (J,)
        excess = (tau - targets).clamp(min=0).mean(-1)  # (N,)
    else:
        excess = (tau - target).clamp(min=0).mean(-1) if per_layer else (tau.mean(-1) - target).clamp(min=0)  # (N,)
    if len(layer_floors):
        floors = on_layers(layer_floors)  # (J,)
        excess = excess + (floors - tau).clamp(min=0).mean(-1)  # (N,) below the floor costs as above the target
    return torch.where(keep_p < 1, gate * excess, 0.0)  # (N,)


# ----------------------------------------------------------------------------------------------------------------
# A straight-through gradient for *which* tokens Eq. 3 keeps (--selection_straight_through T)
# ----------------------------------------------------------------------------------------------------------------

def straight_through_mask(score: torch.Tensor, hard: torch.Tensor, ranked: torch.Tensor, temperature: float
                          ) -> torch.Tensor:
    """The hard selection m (B, L) as floats, with the gradient of a soft inclusion σ(log(s_j/θ) / T).

    score: (B, L) the identity score of Eq. 3's selection (mass per seeing probe), with gradient; hard: (B, L) bool,
    the keys kept; ranked: (B, L) bool, the keys the score ranks (real tokens but the always-kept final one); θ: the
    geometric midpoint of the lowest kept and the highest dropped ranked score (detached), so σ > ½ exactly on the
    kept keys. The forward is m itself; keys within a factor ~e^T of θ get the gradient. A row with nothing ranked
    kept or nothing dropped (p = 1) keeps m without gradient.  Returns (B, L)"""
    log_s = score.clamp(min=torch.finfo(score.dtype).tiny).log()  # (B, L)
    lowest_kept = log_s.detach().masked_fill(~(hard & ranked), float("inf")).amin(-1)  # (B,)
    highest_dropped = log_s.detach().masked_fill(hard | ~ranked, float("-inf")).amax(-1)  # (B,)
    theta = (lowest_kept + highest_dropped) / 2  # (B,)
    ok = torch.isfinite(theta)  # (B,) something kept and something dropped
    soft = torch.sigmoid((log_s - theta.where(ok, 0.0)[:, None]) / temperature) * ranked  # (B, L)
    m = hard.to(score.dtype)  # (B, L)
    return torch.where(ok[:, None], m + (soft - soft.detach()), m)  # value exactly m, gradient σ'


def soft_masked_attention(q, k, v, m_q, m_k, reachable, scale: float) -> torch.Tensor:
    """Eq. 2 with real-valued masks: a_ij = m_j e^{s_ij} / Σ_j' m_j' e^{s_ij'} over the causal keys `reachable`,
    row i scaled by m_q,i. With m ∈ {0, 1} it is Eq. 2 (`sparse_attention`); an excluded key (m_j = 0) still gets
    ∂/∂m_j, computed as if its score were at most the row's top kept one (so |∂a_ij/∂m_j| ≤ 1: a straight-through
    gradient, not a blow-up where a dropped key dominates a row). Dense (B, H, L, L), like eager attention.
    q: (B, H, L, D); k, v: (B, Hkv, L, D); m: (B, L) float."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))  # (B, H, L, D)
    acc = torch.promote_types(q.dtype, torch.float32)
    logits = (q @ k.transpose(-1, -2)).to(acc) * scale  # (B, H, L, L)
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()  # (L, L)
    allowed = causal & reachable[:, None, None, :]  # (B, 1, L, L)
    kept = allowed & (m_k.detach() > 0)[:, None, None, :]  # (B, 1, L, L) the hard selection's keys
    top = logits.masked_fill(~kept, float("-inf")).amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0)  # (B, H, L, 1)
    # a dropped key above every kept one counts as level with the top: ∂a_ij/∂m_j stays in [−1, 1]
    weight = (logits - top.detach()).clamp(max=0.0).exp().masked_fill(~allowed, 0.0) * m_k[:, None, None, :]
    probs = weight / weight.sum(-1, keepdim=True).clamp(min=torch.finfo(acc).tiny)  # (B, H, L, L)
    return (probs.to(v.dtype) @ v) * m_q[:, None, :, None]  # (B, H, L, D)


# ----------------------------------------------------------------------------------------------------------------
# A learned probe scorer for *which* tokens Eq. 3 keeps (--probe_scorer)
# ----------------------------------------------------------------------------------------------------------------

BONUS_LIMIT = 20.0  # |log-factor| at most this: e^20 reorders any two scores, and exp stays finite in fp32
SCORER = "zipr1_probe_scorer"  # the parameter w_j (Hkv, D) on each text-decoder attention module (--probe_scorer)


def probe_bonus(value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The learned log-factor b_l = Σ_h w_h · v_{h,l} on key l's identity score (mass per seeing probe), from the
    layer's own value states (content, no rotary position). w = 0 is ZipVL's selection; the count k of Eq. 3 never
    depends on it. value: (B, Hkv, L, D); weight: (Hkv, D).  Returns (B, L) in [−BONUS_LIMIT, BONUS_LIMIT]"""
    acc = torch.promote_types(value.dtype, torch.float32)  # at least fp32, also under bf16
    bonus = torch.einsum("bhld,hd->bl", value.to(acc), weight.to(acc))  # (B, L)
    return bonus.clamp(-BONUS_LIMIT, BONUS_LIMIT)


def decoder_attentions(model) -> list:
    """The attention module of each text-decoder layer, in order."""
    return [layer.self_attn for layer in model.model.language_model.layers]


def add_probe_scorers(model, weights: dict | None = None):
    """Give each text-decoder layer j a learned probe scorer w_j (Hkv, D) (learned_sparsity.probe_bonus): zeros
    (ZipVL's selection until trained) or weights["layers.j"]. A layer that has one keeps it."""
    heads = model.config.get_text_config(decoder=True).num_key_value_heads
    for j, attn in enumerate(decoder_attentions(model)):
        like = attn.v_proj.weight  # (Hkv·D, hidden): the device and dtype of the layer
        init = torch.zeros(heads, like.shape[0] // heads) if weights is None else weights[f"layers.{j}"]
        if not hasattr(attn, SCORER) or weights is not None:
            attn.register_parameter(SCORER, torch.nn.Parameter(init.to(like.device, like.dtype)))
    return model
