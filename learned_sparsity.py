"""Learned sparsity: the loss term that gives the efficiency reward a gradient (docs/learned_sparsity.md).

The literal ZipR1 reward C·(1 − τ_n) cannot move τ: τ_n does not depend on the sampled answer (no score-function
gradient) and Eq. 3's hard count is piecewise constant (no pathwise gradient). train.py therefore adds

    λ · mean_n C_n · max(τ̃_n − τ*, 0) · [p_n < 1]

to the GRPO loss, τ̃ the relaxed Eq. 3 count (sparse_attention.smooth_top_p_count) of the same teacher forward.
λ = 0 is the paper's literal objective.
"""
from __future__ import annotations

import torch


def sparsity_coef_at(coef: float, warmup_steps: int, step: int) -> float:
    """λ at this step: coef, ramped linearly over the first warmup_steps (0: no ramp)."""
    ramp = 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)
    return coef * ramp


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
                  per_layer: bool = False, skip_layers=(), layer_targets=()) -> torch.Tensor:
    """Per row C·max(τ̃ − target, 0), and 0 where p = 1 (dense rows have nothing to sparsify).  (N,)

    τ̃_j (N, n_layers) is the relaxed Eq. 3 ratio of each layer, with gradient; its pathwise gradient is what the
    literal reward lacks. τ̃ is the mean over the layers not in skip_layers; per_layer hinges each τ̃_j at the
    target and averages the hinges instead, so layers already below it are not pushed to make up for one that resists.
    layer_targets (one per layer) gives each layer its own target τ*_j and hinges per layer: a per-layer budget.
    """
    skip = set(skip_layers)
    layers = [j for j in range(tau_layers.shape[-1]) if j not in skip]
    tau = tau_layers[:, layers]  # (N, J): the layers the term acts on
    if len(layer_targets):
        targets = torch.as_tensor(layer_targets, dtype=tau.dtype, device=tau.device)[layers]  # (J,)
        excess = (tau - targets).clamp(min=0).mean(-1)  # (N,)
    else:
        excess = (tau - target).clamp(min=0).mean(-1) if per_layer else (tau.mean(-1) - target).clamp(min=0)  # (N,)
    return torch.where(keep_p < 1, gate * excess, 0.0)  # (N,)
