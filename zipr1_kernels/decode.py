"""Decode attention against a pruned KV cache in Triton (split-K "flash decoding").

After a sparse prefill each layer's cache holds only the selected keys, padded per sample to a common length K and
marked by key_valid (B, K).  One new query per sample attends to every valid key (all are earlier positions):

    o = Σ_j softmax_j(q · k_j / sqrt(d)) v_j      over j with key_valid[j]      (Eq. 2 for the newest query)

Decode is bound by reading K and V, so the kernel reads each KV row once for all H / Hkv query heads of its group
(GQA) and splits the K keys across programs when B · Hkv alone would leave the GPU idle.  Split s returns its running
max m_s, sum l_s and unnormalised output a_s (base-2 logits); a second kernel combines them exactly:

    o = Σ_s 2^(m_s − m) a_s / Σ_s 2^(m_s − m) l_s,      m = max_s m_s

A sample with no valid key gets o = 0 (as in sparse_attention.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_attn import INTERPRET, LOG2E, _dot, dot_flags


@triton.jit
def _decode_split(Q, K, V, Valid, Acc, M, L, qk_scale, HKV, n_keys, keys_per_split, n_splits,
                  sqb, sqh, skb, skh, skl, svb, svh, svl, s_valid,
                  GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Partial softmax state of the GROUPS query heads of one KV head over one split of the keys."""
    bkv, split = tl.program_id(0), tl.program_id(1)
    b, kvh = (bkv // HKV).to(tl.int64), (bkv % HKV).to(tl.int64)
    offs_g, offs_d = tl.arange(0, BLOCK_G), tl.arange(0, HEAD_DIM)
    heads = kvh * GROUPS + offs_g  # (BLOCK_G,) query heads sharing this KV head
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :], mask=(offs_g < GROUPS)[:, None], other=0.0)
    K, V = K + b * skb + kvh * skh, V + b * svb + kvh * svh
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        inside = cols < hi
        valid = tl.load(Valid + b * s_valid + cols, mask=inside, other=0) != 0  # (BLOCK_N,)
        k = tl.load(K + cols[:, None] * skl + offs_d[None, :], mask=inside[:, None], other=0.0)  # (BLOCK_N, D)
        s = _dot(q, tl.trans(k), UPCAST, PREC) * qk_scale  # base-2 logits  (BLOCK_G, BLOCK_N)
        s = tl.where(valid[None, :], s, float("-inf"))  # pruned-cache padding is not a key
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys so far invalid: keep p = 0, no NaN
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * svl + offs_d[None, :], mask=inside[:, None], other=0.0)  # (BLOCK_N, D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PREC)
        m_i = m_new
    row = (b * HKV * GROUPS + heads) * n_splits + split  # (BLOCK_G,) into (B, H, n_splits)
    keep = offs_g < GROUPS
    tl.store(M + row, m_i, mask=keep)
    tl.store(L + row, l_i, mask=keep)
    tl.store(Acc + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=keep[:, None])


@triton.jit
def _decode_combine(Acc, M, L, Out, H, n_splits, sob, soh,
                    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """o = Σ_s 2^(m_s − m) a_s / Σ_s 2^(m_s − m) l_s for one (sample, head); 0 when no key was valid."""
    bh = tl.program_id(0).to(tl.int64)
    offs_s, offs_d = tl.arange(0, BLOCK_S), tl.arange(0, HEAD_DIM)
    has = offs_s < n_splits
    m = tl.load(M + bh * n_splits + offs_s, mask=has, other=float("-inf"))  # (BLOCK_S,)
    l = tl.load(L + bh * n_splits + offs_s, mask=has, other=0.0)
    acc = tl.load(Acc + (bh * n_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=has[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # (BLOCK_S,), 0 for empty splits
    den = tl.sum(l * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(den > 0, den, 1.0)  # (D,)
    tl.store(Out + (bh // H) * sob + (bh % H) * soh + offs_d, out.to(Out.dtype.element_ty))


def num_splits(batch_kv_heads: int, n_keys: int, device: torch.device, block_n: int) -> int:
    """Enough splits for ~2 programs per SM, each covering at least 2 key blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = triton.cdiv(2 * sms, max(batch_kv_heads, 1))
    return max(1, min(want, triton.cdiv(n_keys, 2 * block_n)))


def decode_attention_triton(q, k, v, key_valid, scale: float | None = None, splits: int | None = None):
    """One query per sample against a padded cache.  q: (B, H, 1, D); k, v: (B, Hkv, K, D); key_valid: (B, K) bool.

    Returns (B, H, 1, D).  `splits` forces the number of key splits (default: `num_splits`)."""
    bsz, heads, _, dim = q.shape
    hkv, n_keys = k.shape[1], k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    valid = key_valid.to(torch.int8).contiguous()  # (B, K)
    block_n = 16 if INTERPRET else 64
    splits = num_splits(bsz * hkv, n_keys, q.device, block_n) if splits is None else int(splits)
    keys_per_split = triton.cdiv(triton.cdiv(n_keys, splits), block_n) * block_n
    splits = max(1, triton.cdiv(n_keys, keys_per_split))
    state = dict(device=q.device, dtype=torch.float32)
    acc = torch.empty(bsz, heads, splits, dim, **state)  # (B, H, S, D) unnormalised outputs
    m, l = torch.empty(bsz, heads, splits, **state), torch.empty(bsz, heads, splits, **state)  # (B, H, S)
    groups = heads // hkv
    sm_scale = dim ** -0.5 if scale is None else float(scale)
    _decode_split[(bsz * hkv, splits)](
        q, k, v, valid, acc, m, l, sm_scale * LOG2E, hkv, n_keys, keys_per_split, splits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        valid.stride(0), GROUPS=groups, BLOCK_G=max(16, triton.next_power_of_2(groups)), HEAD_DIM=dim,
        BLOCK_N=block_n, num_warps=4, num_stages=1 if INTERPRET else 3, **dot_flags(q.dtype))
    out = torch.empty(bsz, heads, 1, dim, device=q.device, dtype=q.dtype)  # (B, H, 1, D)
    _decode_combine[(bsz * heads,)](acc, m, l, out, heads, splits, out.stride(0), out.stride(1),
                                    HEAD_DIM=dim, BLOCK_S=triton.next_power_of_2(splits))
    return out


__all__ = ["decode_attention_triton", "num_splits"]
