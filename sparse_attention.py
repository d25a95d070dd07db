"""Token-level sparse attention (ZipR1 Eq. 1-2), its token budget (§2.1) and the ZipVL Top-p mask solve (Eq. 3).

Notation (paper): a layer sees ℓ tokens with queries Q, keys K, values V. Binary indicators m_Q, m_K ∈ {0,1}^ℓ pick
the query and key tokens that take part in attention:

    M_Q = m_Q·1ᵀ,   M_K = m_K·1ᵀ                                                         (Eq. 1)
    Ô = σ((Q⊙M_Q)(K⊙M_K)ᵀ/√d) V,
      read as  Ô[m_Q] = softmax(Q[m_Q] K[m_K]ᵀ/√d + causal) V[m_K]                       (Eq. 2)
    b = ‖M_Q‖₀/d + ‖M_K‖₀/d = |m_Q| + |m_K|,   τ = b/(2ℓ)  (= k/ℓ when m_Q = m_K)      (§2.1; τ is ours)

Semantics the paper leaves open, fixed here:
  * an unselected key is excluded from every softmax (it is not in K[m_K]);
  * an unselected query gets no attention output: its row of O is 0, so after o_proj (no bias in Qwen) its
    residual stream passes the layer's attention unchanged (the MLP still runs);
  * causality is by original positions; a query that sees no selected key outputs 0.

Eq. 3 asks for the smallest budget whose attention keeps a fraction p of the attention mass:

    min_{m}  |m|   s.t.   Σ_i Σ_j m_j A_ij  ≥  p · Σ_i Σ_j A_ij        (m_Q = m_K = m, A = causal softmax)   (Eq. 3)

Summing over queries first turns the constraint into a column-sum knapsack with unit costs,
Σ_j m_j s_j ≥ p Σ_j s_j with s_j = Σ_i A_ij, which the greedy rule solves exactly: sort s descending and take the
smallest prefix reaching p. ZipVL makes it cheap by scoring with a few *probe* queries (the 64 most recent and 64
random earlier positions) and summing over probes and heads. The *count* k comes from that rule; the *identity* of the
k tokens comes from s_j divided by the number of probes that can causally see key j (early keys are seen by more
queries, so raw sums favour them). One token set per layer and sample, shared by all heads (gather-friendly).

Eq. 3, relaxed (smooth count), the learned-sparsity term of train.py: with c the cumulative sum of the normalised
column mass sorted descending (c_0 = 0), k̃ = Σ_{i ≤ ℓ} σ((p − c_{i−1}) / T) → k as T → 0, differentiable in the probe
scores; τ̃ = mean_j k̃_j / ℓ. The selection keeps the no-grad hard count; τ̃ is computed beside it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import repeat

NUM_RECENT_PROBES = 64
NUM_RANDOM_PROBES = 64


def check_keep_p(keep_p, batch_size: int, device=None) -> torch.Tensor:
    """Validate the sparsity threshold p ∈ (0, 1] and broadcast it to one value per sample: (B,) float32."""
    p = torch.as_tensor(keep_p, dtype=torch.float32, device=device).flatten()
    if p.numel() == 1:
        p = p.expand(batch_size)
    if p.numel() != batch_size:
        raise ValueError(f"keep_p has {p.numel()} values for a batch of {batch_size}")
    if not bool(((p > 0) & (p <= 1)).all()):
        raise ValueError(f"keep_p must lie in (0, 1], got {p.tolist()}")
    return p.contiguous()


def causal_key_mask(m_q: torch.Tensor, m_k: torch.Tensor) -> torch.Tensor:
    """Which (query, key) pairs Eq. 1's masks let attend: query i and key j selected, j ≤ i.  (B, 1, Lq, Lk) bool"""
    lq, lk = m_q.shape[-1], m_k.shape[-1]
    causal = torch.ones(lq, lk, dtype=torch.bool, device=m_q.device).tril(lk - lq)  # (Lq, Lk)
    return causal & m_q[:, None, :, None] & m_k[:, None, None, :]  # (B, 1, Lq, Lk)


def sparse_attention(q, k, v, m_q, m_k, scale: float | None = None) -> torch.Tensor:
    """Eq. 2 in its literal reference form: dense causal attention with unselected tokens masked out.

    q: (B, H, L, D); k, v: (B, Hkv, L, D) with H a multiple of Hkv (GQA); m_q, m_k: (B, L) bool.
    Returns (B, H, L, D); rows of unselected queries (or queries with no visible key) are 0.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    k = repeat(k, "b h l d -> b (h g) l d", g=groups)  # (B, H, L, D)
    v = repeat(v, "b h l d -> b (h g) l d", g=groups)  # (B, H, L, D)
    allowed = causal_key_mask(m_q, m_k)  # (B, 1, L, L)
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in at least fp32
    logits = (q @ k.transpose(-1, -2)).to(acc) * scale  # (B, H, L, L)
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # Eq. 2: softmax over selected keys; empty rows -> 0
    return (probs.to(v.dtype) @ v) * m_q[:, None, :, None]  # (B, H, L, D), unselected query rows -> 0


def token_budget(m_q: torch.Tensor, m_k: torch.Tensor) -> torch.Tensor:
    """b = |m_Q| + |m_K| per sample.  (B,) long."""
    return m_q.sum(-1) + m_k.sum(-1)  # §2.1


def token_ratio(kept: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """τ = mean over layers of b_j / (2ℓ) = mean_j k_j / ℓ (m_Q = m_K).  kept: (B, n_layers), lengths: (B,) -> (B,)."""
    return (2 * kept.float() / (2 * lengths.float()[:, None])).mean(-1)  # τ = b/(2ℓ) (§2.1), averaged over layers


# ----------------------------------------------------------------------------------------------------------------
# Eq. 3: the Top-p mask solve, ZipVL style
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Selection:
    """One layer's token set per sample: mask (B, L) bool, count k (B,), valid length ℓ (B,)."""

    mask: torch.Tensor
    count: torch.Tensor
    length: torch.Tensor


def probe_indices(valid: torch.Tensor, num_recent=NUM_RECENT_PROBES, num_random=NUM_RANDOM_PROBES, seed=0):
    """Probe queries per sample: the `num_recent` most recent valid positions + `num_random` random earlier ones.

    Random choices depend only on (seed, ℓ), so the same prompt gets the same probes in rollout and in training,
    whatever else is in the batch.  Returns idx (B, P) long (sorted, padded with the last position) and ok (B, P) bool.
    """
    rows = []
    for b in range(valid.shape[0]):
        pos = valid[b].nonzero().squeeze(-1)  # (ℓ,) positions of real tokens
        recent, earlier = pos[-num_recent:], pos[:-num_recent] if pos.numel() > num_recent else pos[:0]
        if earlier.numel() > num_random:
            g = torch.Generator().manual_seed((int(seed) * 1_000_003 + pos.numel()) % 2**64)  # any seed: no overflow
            earlier = earlier[torch.randperm(earlier.numel(), generator=g)[:num_random].sort().values.to(pos.device)]
        rows.append(torch.cat([earlier, recent]))
    width = max(r.numel() for r in rows)
    idx = torch.stack([F.pad(r, (0, width - r.numel()), value=int(r[-1])) for r in rows])  # (B, P)
    ok = torch.arange(width, device=valid.device)[None] < torch.tensor([r.numel() for r in rows], device=valid.device)[:, None]
    return idx, ok


def probe_queries(q, probe_idx) -> torch.Tensor:
    """The probe rows of q: (B, H, L, D), probe_idx (B, P) -> (B, H, P, D)."""
    return torch.gather(q, 2, repeat(probe_idx, "b p -> b h p d", h=q.shape[1], d=q.shape[-1]))  # (B, H, P, D)


def column_mass(qp, k, valid, probe_idx, probe_ok, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mass of the probe queries qp (B, H, P, D) over keys k (B, Hkv, L, D); differentiable in qp and k.

    Causal softmax per probe and head, summed over heads and real probes. Returns s (B, L) (0 on padding) and the
    number of probes that can causally see each key, n (B, L).
    """
    scale = qp.shape[-1] ** -0.5 if scale is None else scale
    groups, acc = qp.shape[1] // k.shape[1], torch.promote_types(qp.dtype, torch.float32)
    qp = qp.unflatten(1, (k.shape[1], groups)).to(acc) * scale  # (B, Hkv, G, P, D)
    with torch.autocast(qp.device.type, enabled=False):  # scores in fp32 even inside a bf16 autocast region
        logits = torch.einsum("bhgpd,bhld->bhgpl", qp, k.to(acc))  # (B, Hkv, G, P, L)
        key_pos = torch.arange(k.shape[2], device=k.device)
        sees = (key_pos[None, None, :] <= probe_idx[:, :, None]) & valid[:, None, :]  # (B, P, L); probes see themselves
        probs = torch.softmax(logits.masked_fill_(~sees[:, None, None], float("-inf")), dim=-1)  # (B, Hkv, G, P, L)
        mass = torch.einsum("bhgpl,bp->bl", probs, probe_ok.to(acc))  # Σ over heads and (real) probes
    return mass, (sees & probe_ok[:, :, None]).sum(1).to(acc)  # (B, L), (B, L)


@torch.no_grad()
def probe_column_mass(q, k, valid, probe_idx, probe_ok, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Score keys with probe queries: causal softmax per probe, summed over probes and heads (no gradient: this is
    what the selection uses; `relaxed_layer_ratio` is its differentiable twin).

    q: (B, H, L, D); k: (B, Hkv, L, D); valid: (B, L) bool; probe_idx, probe_ok: (B, P).
    Returns the column mass s (B, L) and the number of probes that can causally see each key, n (B, L).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return column_mass(probe_queries(q, probe_idx), k, valid, probe_idx, probe_ok, scale)


def top_p_count(mass: torch.Tensor, keep_p: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """k = smallest k whose sorted cumulative column mass reaches p × total (ZipVL's solve of Eq. 3's relaxation).

    mass: (B, L) (0 on padding); keep_p: (B,); length: (B,). p = 1 keeps all ℓ tokens.  Returns (B,) long in [1, ℓ].
    """
    sorted_mass = mass.sort(dim=-1, descending=True).values  # (B, L)
    cum = sorted_mass.cumsum(-1)  # (B, L)
    target = keep_p[:, None] * cum[:, -1:]  # (B, 1)
    k = (cum < target).sum(-1) + 1  # Eq. 3: first prefix with cum ≥ p·total
    k = torch.where(keep_p >= 1.0, length, k)  # p = 1 is dense, even where some key's mass underflowed to 0
    return torch.minimum(k, length).clamp(min=1)


def smooth_top_p_count(mass: torch.Tensor, keep_p: torch.Tensor, length: torch.Tensor, temperature: float):
    """Eq. 3, relaxed (smooth count): k̃ = Σ_{i ≤ ℓ} σ((p − c_{i−1}) / T), differentiable in the mass.

    c is the cumulative sum of the column mass normalised to 1 and sorted descending, c_0 = 0. Key i counts fully
    while the keys ranked above it hold less than p, so k̃ → `top_p_count` as T → 0. Raising the share of the top
    keys lowers k̃. p = 1 gives ℓ exactly, with zero gradient, as the hard count does.
    mass: (B, L) (0 on padding); keep_p: (B,); length: (B,).  Returns (B,) float.
    """
    share = mass / mass.sum(-1, keepdim=True)  # (B, L), sums to 1
    sorted_share = share.sort(dim=-1, descending=True).values  # (B, L); padding (mass 0) sorts last
    before = F.pad(sorted_share.cumsum(-1)[:, :-1], (1, 0))  # (B, L): c_{i-1}, c_0 = 0
    slot = torch.arange(mass.shape[-1], device=mass.device)[None] < length[:, None]  # (B, L): the ℓ real keys
    count = (torch.sigmoid((keep_p[:, None] - before) / temperature) * slot).sum(-1)  # Eq. 3, relaxed
    return torch.where(keep_p >= 1, length.to(count.dtype), count)  # p = 1 keeps all ℓ: constant


def relaxed_layer_ratio(qp, k, valid, probe_idx, probe_ok, keep_p, temperature, scale=None) -> torch.Tensor:
    """One layer's relaxed token ratio τ̃_j = k̃_j / ℓ from probe queries qp (B, H, P, D), with gradient.  (B,)"""
    mass, _ = column_mass(qp, k, valid, probe_idx, probe_ok, scale)  # (B, L), differentiable
    length = valid.sum(-1)  # (B,)
    return smooth_top_p_count(mass, keep_p, length, temperature) / length  # τ (§2.1) with the relaxed count


def relaxed_token_ratio(q, k, keep_p, temperature: float, valid=None, num_recent=NUM_RECENT_PROBES,
                        num_random=NUM_RANDOM_PROBES, seed=0, scale=None, recompute=True) -> torch.Tensor:
    """τ̃ of one layer with the probes `top_p_select` uses (same seed): the differentiable twin of k/ℓ.  (B,)

    q: (B, H, L, D); k: (B, Hkv, L, D); keep_p: (B,); valid: (B, L) bool. recompute=True runs the scoring under
    torch.utils.checkpoint: backward recomputes the (B, H, P, L) probe probabilities instead of keeping them, so a
    layer holds only its probe queries (B, H, P, D) and τ̃ (B,) until backward.
    """
    valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device) if valid is None else valid.bool()
    probe_idx, probe_ok = probe_indices(valid, num_recent, num_random, seed)  # (B, P)
    qp = probe_queries(q, probe_idx)  # (B, H, P, D)
    args = (qp, k, valid, probe_idx, probe_ok, keep_p, temperature, scale)
    if recompute and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(relaxed_layer_ratio, *args, use_reentrant=False)
    return relaxed_layer_ratio(*args)


def top_p_select(q, k, keep_p, valid=None, num_recent=NUM_RECENT_PROBES, num_random=NUM_RANDOM_PROBES,
                 seed=0, scale=None, bonus=None) -> Selection:
    """Eq. 3 for one layer: choose one shared token set per sample from probe attention.

    q: (B, H, L, D); k: (B, Hkv, L, D); keep_p: float or (B,); valid: (B, L) bool, False on left padding.
    The final valid position is always kept; padded positions are never kept nor counted in ℓ. bonus: see
    `select_from_mass`.
    """
    bsz, _, seq, _ = q.shape
    valid = torch.ones(bsz, seq, dtype=torch.bool, device=q.device) if valid is None else valid.bool()
    keep_p = check_keep_p(keep_p, bsz, q.device)
    length = valid.sum(-1)  # (B,)
    if bool((length == 0).any()):
        raise ValueError("a sample has no valid tokens to select from")
    probe_idx, probe_ok = probe_indices(valid, num_recent, num_random, seed)
    mass, seen_by = probe_column_mass(q, k, valid, probe_idx, probe_ok, scale)  # (B, L), (B, L)
    return select_from_mass(mass, seen_by, valid, keep_p, bonus)


def final_position(valid: torch.Tensor) -> torch.Tensor:
    """The final valid position per sample, which the selection always keeps.  valid: (B, L) bool -> (B,) long"""
    return valid.shape[1] - 1 - valid.flip(-1).float().argmax(-1)


def identity_score(mass, seen_by, bonus=None) -> torch.Tensor:
    """Which keys Eq. 3 keeps, ranked: column mass per seeing probe, times e^bonus where a scorer gives one.  (B, L)"""
    score = mass / seen_by.clamp(min=1)  # (B, L)
    return score if bonus is None else score * bonus.to(score.dtype).exp()  # (B, L)


def select_from_mass(mass, seen_by, valid, keep_p, bonus=None) -> Selection:
    """Count from the raw column mass (Eq. 3), identity from the mass per probe that sees the key.

    mass, seen_by: (B, L); valid: (B, L) bool; keep_p: (B,). The final valid position is always kept.
    bonus: None (ZipVL), or (B, L) a learned log-factor on each key's identity score (learned_sparsity.probe_bonus):
    it changes which k keys are kept, never k.
    """
    bsz, seq = valid.shape
    length = valid.sum(-1)  # (B,)
    count = top_p_count(mass, keep_p, length)  # (B,)
    score = identity_score(mass, seen_by, bonus).masked_fill(~valid, float("-inf"))  # (B, L)
    last = final_position(valid)  # (B,)
    score[torch.arange(bsz, device=valid.device), last] = float("inf")  # the final position is always kept
    order = score.argsort(dim=-1, descending=True)  # (B, L)
    ranks = torch.arange(seq, device=valid.device)[None, :] < count[:, None]  # (B, L): first k of the order
    mask = torch.zeros_like(valid).scatter(1, order, ranks)  # (B, L)
    return Selection(mask=mask, count=count, length=length)


# ----------------------------------------------------------------------------------------------------------------
# The same Eq. 2 computed on gathered tokens: cost ∝ k², not ℓ².
# ----------------------------------------------------------------------------------------------------------------

def mask_to_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected positions per sample in increasing order, padded: idx (B, K) long (pad = 0), ok (B, K) bool."""
    count = mask.sum(-1)  # (B,)
    width = max(int(count.max()), 1)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :width]  # (B, K) selected first, in order
    ok = torch.arange(width, device=mask.device)[None] < count[:, None]  # (B, K)
    return order.masked_fill(~ok, 0), ok


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D), idx (B, K) -> (B, H, K, D)."""
    return torch.gather(x, 2, repeat(idx, "b k -> b h k d", h=x.shape[1], d=x.shape[-1]))


def gathered_sparse_attention(q, k, v, mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Eq. 2 with m_Q = m_K = mask, computed by gathering the selected tokens and running SDPA on them.

    q: (B, H, L, D); k, v: (B, Hkv, L, D); mask (B, L) bool.  Returns (B, H, L, D), zero on unselected rows.
    Matches `sparse_attention(q, k, v, mask, mask)`; differentiable in q, k, v.
    """
    idx, ok = mask_to_indices(mask)  # (B, K)
    qs, ks, vs = gather_tokens(q, idx), gather_tokens(k, idx), gather_tokens(v, idx)  # (B, H|Hkv, K, D)
    kk, gqa = idx.shape[1], q.shape[1] != k.shape[1]
    if bool(ok.all()):  # same count in every row: plain causal attention on the gathered tokens (flash path)
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)  # Eq. 2
    else:
        causal = torch.ones(kk, kk, dtype=torch.bool, device=q.device).tril()  # idx is increasing: order == position
        allowed = causal & ok[:, None, :] | torch.eye(kk, dtype=torch.bool, device=q.device)  # pads see themselves
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed[:, None], scale=scale,
                                             enable_gqa=gqa)  # Eq. 2: (B, H, K, D)
    out = out * ok[:, None, :, None]
    full = out.new_zeros(q.shape[0], q.shape[1], q.shape[2] + 1, q.shape[3])  # (B, H, L+1, D), last row = dump
    dump = torch.where(ok, idx, q.shape[2])  # padded slots scatter into the dump row
    full = full.scatter(2, repeat(dump, "b k -> b h k d", h=q.shape[1], d=q.shape[-1]), out)
    return full[:, :, :-1]  # (B, H, L, D)


__all__ = [
    "Selection", "check_keep_p", "sparse_attention", "token_budget", "token_ratio", "probe_indices",
    "probe_queries", "column_mass", "probe_column_mass", "top_p_count", "smooth_top_p_count", "relaxed_layer_ratio",
    "relaxed_token_ratio", "top_p_select", "final_position", "select_from_mass", "mask_to_indices",
    "gathered_sparse_attention",
]
