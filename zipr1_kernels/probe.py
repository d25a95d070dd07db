"""Fused probe scoring for the Top-p mask solve (Eq. 3): causal softmax of the probe queries, summed per key.

sparse_attention.probe_column_mass materialises the probe logits (B, H, P, ℓ) in fp32 — 256 MB per sample at
ℓ = 32k with Qwen2.5-VL-3B's 16 heads and P = 128 probes — then softmaxes and sums them.  Here nothing of size
P × ℓ is ever stored.  With t_p the position of probe p and row (h, p) of the probe logits

    z[h, p, j] = q[h, t_p] · k[h // G, j] / sqrt(d),      visible when j ≤ t_p and j is a valid (unpadded) token,

pass 1 computes each row's log-sum-exp λ[h, p] = log Σ_j exp z[h, p, j] (keys split across programs, partial
results combined with torch.logsumexp), and pass 2 sums the softmax over probes and heads for each key:

    s_j = Σ_h Σ_p exp(z[h, p, j] − λ[h, p])                                              (column mass of Eq. 3)

Rows are the G query heads × P probes that share one KV head, so each K row is loaded once per group.
`top_p_select_triton` is sparse_attention.top_p_select with this column mass (same probes, count rule and identity
rule), its probe positions found without a per-sample loop so that selection costs one host sync.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sparse_attention import NUM_RANDOM_PROBES, NUM_RECENT_PROBES, Selection, check_keep_p, probe_indices, select_from_mass
from .sparse_attn import INTERPRET, LOG2E, _dot, dot_flags


@triton.jit
def _probe_rows(Q, Probe, ProbeOk, b, kvh, HKV, start_r, n_probes, sqb, sqh, sql, s_probe,
                GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows r = g·P + p of one KV group: query vectors (BLOCK_R, D), their positions, whether they exist, head."""
    rows = start_r + tl.arange(0, BLOCK_R)
    exists = rows < GROUPS * n_probes
    g, p = rows // n_probes, rows % n_probes
    head = kvh * GROUPS + g
    pos = tl.load(Probe + b * s_probe + p, mask=exists, other=0)
    ok = exists & (tl.load(ProbeOk + b * s_probe + p, mask=exists, other=0) != 0)
    q = tl.load(Q + b * sqb + head[:, None] * sqh + pos[:, None] * sql + tl.arange(0, HEAD_DIM)[None, :],
                mask=exists[:, None], other=0.0)  # (BLOCK_R, D)
    return q, pos, ok, (b * HKV * GROUPS + head) * n_probes + p  # row of (B, H, P)


@triton.jit
def _probe_logits(q, pos, ok, K, Valid, cols, seq, skl, s_valid, qk_scale,
                  HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Base-2 probe logits for key columns `cols`, -inf where a probe cannot see the key.  (BLOCK_R, BLOCK_N)"""
    inside = cols < seq
    valid = tl.load(Valid + cols, mask=inside, other=0) != 0
    k = tl.load(K + cols[:, None] * skl + tl.arange(0, HEAD_DIM)[None, :], mask=inside[:, None], other=0.0)
    z = _dot(q, tl.trans(k), UPCAST, PREC) * qk_scale
    sees = (cols[None, :] <= pos[:, None]) & valid[None, :] & ok[:, None]  # causal, unpadded, real probe
    return tl.where(sees, z, float("-inf"))


@triton.jit
def _probe_lse(Q, K, Valid, Probe, ProbeOk, LsePart, qk_scale, HKV, n_probes, seq, keys_per_split, n_splits,
               sqb, sqh, sql, skb, skh, skl, s_valid, s_probe,
               GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
               UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Pass 1: base-2 log-sum-exp of each probe row over one split of the keys -> LsePart (B, H, P, S)."""
    start_r, bkv, split = tl.program_id(0) * BLOCK_R, tl.program_id(1), tl.program_id(2)
    b, kvh = (bkv // HKV).to(tl.int64), (bkv % HKV).to(tl.int64)
    q, pos, ok, row = _probe_rows(Q, Probe, ProbeOk, b, kvh, HKV, start_r, n_probes, sqb, sqh, sql, s_probe,
                                  GROUPS, HEAD_DIM, BLOCK_R)
    K, Valid = K + b * skb + kvh * skh, Valid + b * s_valid
    lo = split * keys_per_split
    hi = tl.minimum(tl.minimum(lo + keys_per_split, seq), tl.max(pos, 0) + 1)  # no probe sees past its position
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        z = _probe_logits(q, pos, ok, K, Valid, start_n + tl.arange(0, BLOCK_N), seq, skl, s_valid, qk_scale,
                          HEAD_DIM, UPCAST, PREC)
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_ref) + tl.sum(tl.math.exp2(z - m_ref[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(LsePart + row * n_splits + split, lse, mask=start_r + tl.arange(0, BLOCK_R) < GROUPS * n_probes)


@triton.jit
def _probe_mass(Q, K, Valid, Probe, ProbeOk, Lse, MassPart, qk_scale, HKV, n_probes, seq,
                sqb, sqh, sql, skb, skh, skl, s_valid, s_probe, s_mass,
                GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Pass 2: s_j summed over the probe rows of one KV group for BLOCK_N keys -> MassPart (B, Hkv, L)."""
    cols, bkv = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N), tl.program_id(1)
    b, kvh = (bkv // HKV).to(tl.int64), (bkv % HKV).to(tl.int64)
    K, Valid = K + b * skb + kvh * skh, Valid + b * s_valid
    mass = tl.zeros([BLOCK_N], tl.float32)
    for start_r in range(0, GROUPS * n_probes, BLOCK_R):
        q, pos, ok, row = _probe_rows(Q, Probe, ProbeOk, b, kvh, HKV, start_r, n_probes, sqb, sqh, sql, s_probe,
                                      GROUPS, HEAD_DIM, BLOCK_R)
        lse = tl.load(Lse + row, mask=ok, other=0.0)  # (BLOCK_R,) base-2 λ
        z = _probe_logits(q, pos, ok, K, Valid, cols, seq, skl, s_valid, qk_scale, HEAD_DIM, UPCAST, PREC)
        mass += tl.sum(tl.where(z > float("-inf"), tl.math.exp2(z - lse[:, None]), 0.0), 0)  # Σ_p softmax
    tl.store(MassPart + bkv.to(tl.int64) * s_mass + cols, mass, mask=cols < seq)


@torch.no_grad()
def probe_column_mass_triton(q, k, valid, probe_idx, probe_ok, scale=None, splits: int | None = None):
    """Same contract as sparse_attention.probe_column_mass: s (B, L) float32 and probes seeing each key (B, L).

    `splits` forces the number of key splits of pass 1 (default: enough programs for ~2 per SM)."""
    bsz, heads, seq, dim = q.shape
    hkv, n_probes = k.shape[1], probe_idx.shape[1]
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    valid8, ok8 = valid.to(torch.int8).contiguous(), probe_ok.to(torch.int8).contiguous()  # (B, L), (B, P)
    probe = probe_idx.to(torch.int64).contiguous()  # (B, P) positions
    block_r, block_n = (16, 16) if INTERPRET else (64, 64)
    rows = (heads // hkv) * n_probes
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    if splits is None:
        splits = max(1, min(triton.cdiv(2 * sms, bsz * hkv * triton.cdiv(rows, block_r)), triton.cdiv(seq, 8 * block_n)))
    keys_per_split = triton.cdiv(triton.cdiv(seq, splits), block_n) * block_n
    splits = triton.cdiv(seq, keys_per_split)
    qk_scale = (dim ** -0.5 if scale is None else float(scale)) * LOG2E
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), valid8.stride(0))
    meta = dict(GROUPS=heads // hkv, HEAD_DIM=dim, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4,
                **dot_flags(q.dtype))
    lse_part = torch.empty(bsz, heads, n_probes, splits, device=q.device, dtype=torch.float32)  # (B, H, P, S)
    _probe_lse[(triton.cdiv(rows, block_r), bsz * hkv, splits)](
        q, k, valid8, probe, ok8, lse_part, qk_scale, hkv, n_probes, seq, keys_per_split, splits, *strides,
        probe.stride(0), **meta)
    lse = torch.logsumexp(lse_part * math.log(2), -1) / math.log(2)  # (B, H, P): combine the key splits
    mass_part = torch.empty(bsz, hkv, seq, device=q.device, dtype=torch.float32)  # (B, Hkv, L)
    _probe_mass[(triton.cdiv(seq, block_n), bsz * hkv)](
        q, k, valid8, probe, ok8, lse.contiguous(), mass_part, qk_scale, hkv, n_probes, seq, *strides,
        probe.stride(0), seq, **meta)
    key_pos = torch.arange(seq, device=q.device)
    sees = (key_pos[None, None, :] <= probe_idx[:, :, None]) & valid[:, None, :] & probe_ok[:, :, None]  # (B, P, L)
    return mass_part.sum(1), sees.sum(1).float()  # (B, L), (B, L)


@functools.lru_cache(maxsize=512)
def probe_ranks(length: int, num_recent: int, num_random: int, seed: int) -> torch.Tensor:
    """Which of a sample's `length` valid tokens (by rank) sparse_attention.probe_indices makes probes.

    probe_indices' choice depends only on (length, counts, seed), so it is computed once per length.  (P,) long."""
    return probe_indices(torch.ones(1, length, dtype=torch.bool), num_recent, num_random, seed)[0][0]


def probe_positions(valid: torch.Tensor, lengths: list[int], num_recent: int, num_random: int, seed: int):
    """sparse_attention.probe_indices without its per-sample loop: the r-th valid position is found by
    searchsorted on the running count of valid tokens.  Returns idx (B, P) long and ok (B, P) bool."""
    ranks = [probe_ranks(n, num_recent, num_random, seed) for n in lengths]
    width = max(r.numel() for r in ranks)
    padded = torch.stack([F.pad(r, (0, width - r.numel()), value=int(r[-1])) for r in ranks])  # (B, P) ranks
    ok = torch.arange(width)[None] < torch.tensor([r.numel() for r in ranks])[:, None]  # (B, P)
    running = valid.to(torch.int32).cumsum(-1)  # (B, L): valid tokens up to and including each position
    idx = torch.searchsorted(running, padded.to(valid.device, torch.int32) + 1)  # (B, P) position of rank r
    return idx, ok.to(valid.device)


def top_p_select_triton(q, k, keep_p, valid=None, num_recent=NUM_RECENT_PROBES, num_random=NUM_RANDOM_PROBES,
                        seed=0, scale=None, bonus=None) -> Selection:
    """sparse_attention.top_p_select (Eq. 3) with the fused column mass and one host sync; same Selection."""
    bsz, _, seq, _ = q.shape
    valid = torch.ones(bsz, seq, dtype=torch.bool, device=q.device) if valid is None else valid.bool()
    keep_p = check_keep_p(keep_p, bsz, q.device)
    lengths = valid.sum(-1).tolist()
    if min(lengths) == 0:
        raise ValueError("a sample has no valid tokens to select from")
    probe_idx, probe_ok = probe_positions(valid, lengths, num_recent, num_random, seed)  # (B, P)
    mass, seen_by = probe_column_mass_triton(q, k, valid, probe_idx, probe_ok, scale)  # (B, L), (B, L)
    return select_from_mass(mass, seen_by, valid, keep_p, bonus)  # Eq. 3: count and identity, as the reference


__all__ = ["probe_column_mass_triton", "top_p_select_triton", "probe_positions", "probe_ranks"]
