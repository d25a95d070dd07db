"""Sparse prefill attention in Triton: Eq. 2 with m_Q = m_K = m (Eq. 1), reading the selected rows by index.

Read beside sparse_attention.py (the torch reference) and Triton's fused-attention tutorial, which this follows.

The k selected positions of a sample, in increasing order, are idx[0] < idx[1] < ... < idx[k-1].  Because idx is
sorted, "key position ≤ query position" (causality by original positions) is the same as "key rank ≤ query rank",
so Eq. 2 is ordinary causal attention over the k×k grid of ranks:

    S[r, c] = q[idx[r]] · k[idx[c]] / sqrt(d)                 c ≤ r < k          (Eq. 2, logits)
    O[idx[r]] = Σ_c softmax_c(S[r, :]) v[idx[c]],   other rows of O are 0        (Eq. 2)

Each program owns BLOCK_M query ranks of one (sample, head) and streams BLOCK_N key ranks at a time with the online
softmax of FlashAttention. Rows are loaded straight from q, k, v in HF's (B, H, L, D) layout through idx — no
gathered copies — so the work is ∝ k² instead of ℓ²: at τ = k/ℓ = 0.25 it is 1/16 of dense.  GQA: query head h
reads KV head h // (H / Hkv).  The grid covers ℓ; programs past a sample's count exit at once (no host sync), and
the blocks of the last ranks, which see the most keys, are launched first.

Backward (Triton, FlashAttention-2 style, recomputing P from the saved log-sum-exp):
    dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ∘ (dP − δ) with δ_r = o_r · do_r,   dQ = dS K / sqrt(d),   dK = dSᵀ Q / sqrt(d)
One kernel per KV head writes dK, dV (summing its GQA query heads in registers, no atomics); one per query head
writes dQ.  Gradients of unselected rows are 0 (their output is the constant 0).

Precision: logits and softmax in fp32; P is cast to V's dtype before P·V (as in the tutorial); fp32 inputs use
IEEE dots (no TF32), so fp32 results match torch to rounding.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sparse_attention import gathered_sparse_attention

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634  # exp(x) = exp2(x · log2 e): the kernels work in base 2


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """a @ b in fp32.  UPCAST only under the Triton 3.9 interpreter, whose dot multiplies bf16 as raw integers."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexprs for `_dot`: exact IEEE fp32 products (no TF32), and the interpreter's bf16 work-around."""
    return dict(UPCAST=INTERPRET and dtype == torch.bfloat16, PREC="ieee" if dtype == torch.float32 else "tf32")


def configs(gpu: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) to autotune on a GPU (checked free of register spills on sm_90 for
    bf16, d = 128); one small block under the interpreter."""
    gpu = [(16, 16, 4, 1)] if INTERPRET else gpu
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s) for m, n, w, s in gpu]


def smallest_tile_for_fp32(configs, named_args, **kwargs):
    """fp32 runs IEEE dots on CUDA cores: large tiles take minutes to compile and overflow shared memory, so fp32
    gets the smallest tile without tuning.  (Autotuning is keyed on HEAD_DIM and the argument dtypes.)"""
    if named_args["Q"].dtype != torch.float32:
        return configs
    return [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def autotune(gpu_configs):
    return triton.autotune(configs(gpu_configs), key=["HEAD_DIM"],
                           prune_configs_by=dict(early_config_prune=smallest_tile_for_fp32))


# ---------------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, ranks_m, K, V, idx, count, stride_kl, stride_vl, offs_d, lo, hi, qk_scale,
               DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Online softmax over key ranks [lo, hi); DIAGONAL blocks apply the causal mask c ≤ r."""
    for start_n in range(lo, hi, BLOCK_N):
        ranks_n = start_n + tl.arange(0, BLOCK_N)
        pos_n = tl.load(idx + ranks_n, mask=ranks_n < count, other=0)  # original positions of these keys
        k = tl.load(K + pos_n[:, None] * stride_kl + offs_d[None, :])  # (BLOCK_N, D)
        s = _dot(q, tl.trans(k), UPCAST, PREC) * qk_scale  # Eq. 2 logits, base-2 units  (BLOCK_M, BLOCK_N)
        if DIAGONAL:
            s = tl.where(ranks_m[:, None] >= ranks_n[None, :], s, float("-inf"))  # causal by position
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + pos_n[:, None] * stride_vl + offs_d[None, :])  # (BLOCK_N, D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PREC)
        m_i = m_new
    return acc, l_i, m_i


@autotune([(128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4)])
@triton.jit
def _sparse_attn_fwd(Q, K, V, Out, Lse, Idx, Count, qk_scale, H, GROUPS,
                     sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, s_idx, s_lse,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     UPCAST: tl.constexpr, PREC: tl.constexpr):
    """O[idx[r]] for BLOCK_M query ranks r of one (sample, head), and their log-sum-exp for the backward."""
    bh, blocks_left = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    count = tl.load(Count + b)  # k for this sample
    n_blocks = tl.cdiv(count, BLOCK_M)
    if blocks_left >= n_blocks:
        return
    start_m = n_blocks - 1 - blocks_left  # the longest rows (last ranks) start first: shorter tail
    b64, h64, kvh64 = b.to(tl.int64), h.to(tl.int64), (h // GROUPS).to(tl.int64)
    idx = Idx + b64 * s_idx
    ranks_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    pos_m = tl.load(idx + ranks_m, mask=ranks_m < count, other=0)  # (BLOCK_M,) query positions
    q = tl.load(Q + b64 * sqb + h64 * sqh + pos_m[:, None] * sql + offs_d[None, :])  # (BLOCK_M, D)
    K, V = K + b64 * skb + kvh64 * skh, V + b64 * svb + kvh64 * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo = start_m * BLOCK_M  # key blocks before the diagonal need no mask
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, ranks_m, K, V, idx, count, skl, svl, offs_d, 0, lo, qk_scale,
                               False, BLOCK_N, UPCAST, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, ranks_m, K, V, idx, count, skl, svl, offs_d, lo, lo + BLOCK_M,
                               qk_scale, True, BLOCK_N, UPCAST, PREC)
    keep = ranks_m < count
    out = acc / l_i[:, None]  # Eq. 2: softmax-weighted sum of the selected values  (BLOCK_M, D)
    tl.store(Out + b64 * sob + h64 * soh + pos_m[:, None] * sol + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=keep[:, None])
    tl.store(Lse + bh.to(tl.int64) * s_lse + ranks_m, m_i + tl.math.log2(l_i), mask=keep)  # base-2 log-sum-exp


# ---------------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_delta(Out, dOut, Delta, Idx, Count, H, sob, soh, sol, sdb, sdh, sdl, s_idx, s_delta,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """δ_r = o_r · do_r for the selected rows (r < k), in rank order."""
    start_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    count = tl.load(Count + b)
    ranks = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    keep = ranks < count
    pos = tl.load(Idx + b * s_idx + ranks, mask=keep, other=0)
    offs_d = tl.arange(0, HEAD_DIM)
    o = tl.load(Out + b * sob + h * soh + pos[:, None] * sol + offs_d[None, :]).to(tl.float32)
    do = tl.load(dOut + b * sdb + h * sdh + pos[:, None] * sdl + offs_d[None, :]).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * s_delta + ranks, tl.sum(o * do, 1), mask=keep)


@autotune([(32, 64, 4, 3), (32, 128, 8, 2), (32, 128, 8, 3), (16, 128, 8, 3)])
@triton.jit
def _bwd_dkdv(Q, K, V, dOut, dK, dV, Lse, Delta, Idx, Count, qk_scale, sm_scale, H, GROUPS, HKV,
              sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, s_idx, s_lse,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              UPCAST: tl.constexpr, PREC: tl.constexpr):
    """dK, dV for BLOCK_N key ranks of one KV head: sum over its GROUPS query heads and the ranks r ≥ c."""
    bkv, start_n = tl.program_id(0), tl.program_id(1)  # start_n = 0 (most query rows) starts first
    b, kvh = bkv // HKV, bkv % HKV
    count = tl.load(Count + b)
    if start_n * BLOCK_N >= count:
        return
    b64 = b.to(tl.int64)
    idx = Idx + b64 * s_idx
    ranks_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    pos_n = tl.load(idx + ranks_n, mask=ranks_n < count, other=0)
    k_off = b64 * skb + kvh.to(tl.int64) * skh + pos_n[:, None] * skl + offs_d[None, :]
    v_off = b64 * svb + kvh.to(tl.int64) * svh + pos_n[:, None] * svl + offs_d[None, :]
    k, v = tl.load(K + k_off), tl.load(V + v_off)  # (BLOCK_N, D)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(GROUPS):
        h64 = (kvh * GROUPS + g).to(tl.int64)
        lse_row = Lse + (b64 * H + h64) * s_lse
        for start_m in range(start_n * BLOCK_N, count, BLOCK_M):  # only ranks r ≥ c see these keys
            ranks_m = start_m + tl.arange(0, BLOCK_M)
            pos_m = tl.load(idx + ranks_m, mask=ranks_m < count, other=0)
            q = tl.load(Q + b64 * sqb + h64 * sqh + pos_m[:, None] * sql + offs_d[None, :])  # (BLOCK_M, D)
            do = tl.load(dOut + b64 * sdb + h64 * sdh + pos_m[:, None] * sdl + offs_d[None, :])  # (BLOCK_M, D)
            lse = tl.load(lse_row + ranks_m, mask=ranks_m < count, other=0.0)
            delta = tl.load(Delta + (b64 * H + h64) * s_lse + ranks_m, mask=ranks_m < count, other=0.0)
            st = _dot(k, tl.trans(q), UPCAST, PREC) * qk_scale  # Sᵀ  (BLOCK_N, BLOCK_M)
            visible = (ranks_m[None, :] >= ranks_n[:, None]) & (ranks_m[None, :] < count)
            pt = tl.where(visible, tl.math.exp2(st - lse[None, :]), 0.0)  # Pᵀ
            dv += _dot(pt.to(do.dtype), do, UPCAST, PREC)  # dV = Pᵀ dO
            dpt = _dot(v, tl.trans(do), UPCAST, PREC)  # dPᵀ = V dOᵀ
            dst = pt * (dpt - delta[None, :])  # dSᵀ = Pᵀ ∘ (dPᵀ − δ)
            dk += _dot(dst.to(q.dtype), q, UPCAST, PREC)  # dK = dSᵀ Q (· scale below)
    keep = (ranks_n < count)[:, None]
    tl.store(dK + k_off, (dk * sm_scale).to(dK.dtype.element_ty), mask=keep)
    tl.store(dV + v_off, dv.to(dV.dtype.element_ty), mask=keep)


@autotune([(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 3)])
@triton.jit
def _bwd_dq(Q, K, V, dOut, dQ, Lse, Delta, Idx, Count, qk_scale, sm_scale, H, GROUPS,
            sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, s_idx, s_lse,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            UPCAST: tl.constexpr, PREC: tl.constexpr):
    """dQ for BLOCK_M query ranks of one head: sum over key ranks c ≤ r."""
    bh, blocks_left = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    count = tl.load(Count + b)
    n_blocks = tl.cdiv(count, BLOCK_M)
    if blocks_left >= n_blocks:
        return
    start_m = n_blocks - 1 - blocks_left  # longest rows first
    b64, h64, kvh64 = b.to(tl.int64), h.to(tl.int64), (h // GROUPS).to(tl.int64)
    idx = Idx + b64 * s_idx
    ranks_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    pos_m = tl.load(idx + ranks_m, mask=ranks_m < count, other=0)
    q_off = b64 * sqb + h64 * sqh + pos_m[:, None] * sql + offs_d[None, :]
    q = tl.load(Q + q_off)  # (BLOCK_M, D)
    do = tl.load(dOut + b64 * sdb + h64 * sdh + pos_m[:, None] * sdl + offs_d[None, :])  # (BLOCK_M, D)
    lse = tl.load(Lse + bh.to(tl.int64) * s_lse + ranks_m, mask=ranks_m < count, other=0.0)
    delta = tl.load(Delta + bh.to(tl.int64) * s_lse + ranks_m, mask=ranks_m < count, other=0.0)
    K, V = K + b64 * skb + kvh64 * skh, V + b64 * svb + kvh64 * svh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, (start_m + 1) * BLOCK_M, BLOCK_N):
        ranks_n = start_n + tl.arange(0, BLOCK_N)
        pos_n = tl.load(idx + ranks_n, mask=ranks_n < count, other=0)
        k = tl.load(K + pos_n[:, None] * skl + offs_d[None, :])  # (BLOCK_N, D)
        v = tl.load(V + pos_n[:, None] * svl + offs_d[None, :])  # (BLOCK_N, D)
        s = _dot(q, tl.trans(k), UPCAST, PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.where(ranks_m[:, None] >= ranks_n[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, PREC)  # dP = dO Vᵀ
        ds = p * (dp - delta[:, None])  # dS = P ∘ (dP − δ)
        dq += _dot(ds.to(k.dtype), k, UPCAST, PREC)  # dQ = dS K (· scale below)
    tl.store(dQ + q_off, (dq * sm_scale).to(dQ.dtype.element_ty), mask=(ranks_m < count)[:, None])


# ---------------------------------------------------------------------------------------------------------------
# Host side: index preparation, launches, autograd
# ---------------------------------------------------------------------------------------------------------------

def selected_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected positions in increasing order, padded to ℓ: idx (B, L) int64 (so position × row stride cannot
    overflow in the kernels), count k (B,) int32.  No host sync."""
    idx = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices  # (B, L) selected first, in order
    return idx.contiguous(), mask.sum(-1, dtype=torch.int32)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _dense(x: torch.Tensor) -> bool:
    """Whether x fills its memory span without gaps, in some dim order (HF's (B, L, H, D).transpose(1, 2) does), so
    `zeros_like(x)` has x's strides: the backward writes dq, dk, dv with the strides of q, k, v."""
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride()), key=lambda pair: pair[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _forward(q, k, v, idx, count, sm_scale):
    bsz, heads, seq, dim = q.shape
    out = q.new_zeros(bsz, seq, heads, dim).transpose(1, 2)  # (B, H, L, D) view of (B, L, H, D) memory, which HF's
    # attention output wants: out.transpose(1, 2) is contiguous, no copy. Unselected rows stay 0.
    lse = torch.empty(bsz * heads, seq, device=q.device, dtype=torch.float32)  # (B·H, L) per selected rank

    def grid(meta):  # heads vary fastest: the GQA heads sharing K, V rows run together (L2 reuse)
        return bsz * heads, triton.cdiv(seq, meta["BLOCK_M"])

    _sparse_attn_fwd[grid](q, k, v, out, lse, idx, count, sm_scale * LOG2E, heads, heads // k.shape[1],
                           *_strides(q), *_strides(k), *_strides(v), *_strides(out), idx.stride(0), lse.stride(0),
                           HEAD_DIM=dim, **dot_flags(q.dtype))
    return out, lse


def _backward(q, k, v, out, lse, idx, count, sm_scale, dout):
    bsz, heads, seq, dim = q.shape
    hkv = k.shape[1]
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))  # the strides of q, k, v (dense: see _dense)
    delta = torch.empty_like(lse)  # (B·H, L)
    block = 16 if INTERPRET else 64
    _bwd_delta[(triton.cdiv(seq, block), bsz * heads)](out, dout, delta, idx, count, heads, *_strides(out),
                                                       *_strides(dout), idx.stride(0), delta.stride(0),
                                                       HEAD_DIM=dim, BLOCK_M=block)
    common = (sm_scale * LOG2E, sm_scale, heads, heads // hkv)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout), idx.stride(0), lse.stride(0))
    _bwd_dkdv[lambda meta: (bsz * hkv, triton.cdiv(seq, meta["BLOCK_N"]))](
        q, k, v, dout, dk, dv, lse, delta, idx, count, *common, hkv, *strides, HEAD_DIM=dim, **dot_flags(q.dtype))
    _bwd_dq[lambda meta: (bsz * heads, triton.cdiv(seq, meta["BLOCK_M"]))](
        q, k, v, dout, dq, lse, delta, idx, count, *common, *strides, HEAD_DIM=dim, **dot_flags(q.dtype))
    return dq, dk, dv


def reference_grads(q, k, v, out, lse, idx, count, sm_scale, dout):
    """`_backward`'s dq, dk, dv from the torch reference (sparse_attention.gathered_sparse_attention), recomputed
    from the inputs: the fall-back when the Triton backward cannot run."""
    ranks = torch.arange(idx.shape[1], device=idx.device)
    mask = torch.zeros_like(idx, dtype=torch.bool).scatter_(1, idx, ranks < count[:, None])  # (B, L)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(gathered_sparse_attention(*leaves, mask, sm_scale), leaves, dout)


class SparseAttention(torch.autograd.Function):
    """Eq. 2 (m_Q = m_K) forward and backward in Triton; idx, count from `selected_positions`.

    `guard_backward(triton_grads, torch_grads)`, if given, picks what runs when the Triton backward fails
    (zipr1_kernels.run_kernel).  Only the saved tensors are kept, so activation checkpointing still frees them."""

    @staticmethod
    def forward(ctx, q, k, v, idx, count, sm_scale, guard_backward=None):
        q, k, v = (t if t.stride(-1) == 1 and _dense(t) else t.contiguous() for t in (q, k, v))
        out, lse = _forward(q, k, v, idx, count, sm_scale)
        ctx.save_for_backward(q, k, v, out, lse, idx, count)
        ctx.sm_scale, ctx.guard_backward = sm_scale, guard_backward
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = (*ctx.saved_tensors, ctx.sm_scale, dout)
        if ctx.guard_backward is None:
            dq, dk, dv = _backward(*saved)
        else:
            dq, dk, dv = ctx.guard_backward(lambda: _backward(*saved), lambda: reference_grads(*saved))
        return dq, dk, dv, None, None, None, None


def sparse_attention_triton(q, k, v, mask, scale: float | None = None, guard_backward=None) -> torch.Tensor:
    """Eq. 2 with m_Q = m_K = mask.  q: (B, H, L, D); k, v: (B, Hkv, L, D); mask: (B, L) bool -> (B, H, L, D)."""
    idx, count = selected_positions(mask)  # (B, L), (B,)
    sm_scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return SparseAttention.apply(q, k, v, idx, count, sm_scale, guard_backward)


__all__ = ["SparseAttention", "sparse_attention_triton", "selected_positions", "reference_grads", "dot_flags",
           "configs", "INTERPRET", "LOG2E"]
