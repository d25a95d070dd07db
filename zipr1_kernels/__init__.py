"""Triton kernels for ZipR1's sparse attention, each with the torch reference of sparse_attention.py as fall-back.

All tensors use HF's (batch, heads, tokens, head_dim) layout:

    prefill_sparse_attention(q, k, v, mask, scale=None)                  -> (B, H, L, D)   Eq. 2 with m_Q = m_K = mask
    decode_attention(q, k, v, key_valid, scale=None)                      -> (B, H, 1, D)   newest query, pruned cache
    probe_column_mass(q, k, valid, probe_idx, probe_ok, scale=None)       -> s (B, L), n (B, L)   Eq. 3 probe scores
    top_p_select(q, k, keep_p, valid=None, num_recent, num_random, seed, bonus) -> Selection Eq. 3 token set

Each takes `backend=`: "auto" (default) runs Triton when the tensors are on CUDA, triton imports, the kernel covers
the dtype (fp16 / bf16 / fp32) and head_dim (16, 32, 64, 128), and the environment variable ZIPR1_ATTN_BACKEND is not
"torch"; otherwise the torch reference.  "torch" forces the reference, "triton" forces the kernels (on CPU tensors
that needs TRITON_INTERPRET=1 set before triton is first imported: that is how the tests run them).
ZIPR1_ATTN_BACKEND ∈ {auto, torch, triton} sets what "auto" means for the whole process.

Fall-back: under "auto", a kernel that fails to compile or launch (a Triton CompilationError, a missing C compiler,
too little shared memory, ...) does not stop the run: one warning of one line names the error and
ZIPR1_ATTN_BACKEND=torch, and that kernel runs the torch reference from then on (`run_kernel`).  A forced "triton"
raises the error instead.  A kernel that launches but computes wrong is not caught here: that is what the tests and
benchmarks/ragged_check.py are for.

Gradients: prefill has a Triton backward (zipr1_kernels/sparse_attn.py).  decode_attention and the probe scores are
inference-only: decode_attention falls back to torch when a gradient is required (and refuses under "triton").
Importing this package never imports triton; the kernel modules load on first use.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch
import torch.nn.functional as F

import sparse_attention as ref

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "ZIPR1_ATTN_BACKEND"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_HEAD_DIMS = (16, 32, 64, 128)
FAILED: set[str] = set()  # kernels that raised under "auto" in this process: they run the torch reference now


@functools.cache
def triton_available() -> bool:
    """Whether the triton package imports (it is optional on CPU-only machines)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """`backend`, with "auto" replaced by what ZIPR1_ATTN_BACKEND says (itself "auto" when unset)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    env = os.environ.get(ENV_VAR, "auto") or "auto"
    if env not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
    return env if backend == "auto" else backend


def on_cuda(x: torch.Tensor) -> bool:
    """The device half of the "auto" decision (a function of its own so that tests can pretend a GPU)."""
    return x.is_cuda


def use_triton(x: torch.Tensor, backend: str = "auto", needs_grad: bool = False) -> bool:
    """Resolve `backend` for tensors like x: True to run the Triton kernel, False for the torch reference."""
    backend = resolve_backend(backend)
    covered = x.dtype in KERNEL_DTYPES and x.shape[-1] in KERNEL_HEAD_DIMS
    if backend == "torch":
        return False
    if backend == "auto":
        return on_cuda(x) and covered and not needs_grad and triton_available()
    if not triton_available():
        raise RuntimeError("backend 'triton' asked for, but the triton package is not installed")
    if not covered:
        raise ValueError(f"the Triton kernels take dtypes {KERNEL_DTYPES} and head_dim in {KERNEL_HEAD_DIMS}, "
                         f"got {x.dtype} and head_dim {x.shape[-1]}")
    if needs_grad:
        raise ValueError("this Triton kernel has no backward; use backend='torch' when gradients are needed")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return True


def _kernels(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def run_kernel(name: str, kernel, reference, backend: str = "auto"):
    """kernel(); under "auto", if it raises, warn once (one line) and return reference(), as for every later call of
    the kernel `name`.  A forced "triton" lets the error through; so does running out of GPU memory."""
    if resolve_backend(backend) == "triton":
        return kernel()
    if name in FAILED:
        return reference()
    try:
        return kernel()
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001  compile and launch errors come in many types
        FAILED.add(name)
        detail = " ".join(str(getattr(err, "error_message", None) or err).split())[:200]  # one line
        warnings.warn(f"zipr1_kernels: the Triton {name} kernel failed ({type(err).__name__}: {detail}); "
                      f"running the torch reference for it from now on. {ENV_VAR}=torch skips Triton, "
                      f"{ENV_VAR}=triton raises the error.", RuntimeWarning, stacklevel=3)
        return reference()


def check_attention_shapes(q, k, v, mask, name: str = "mask") -> None:
    """q (B, H, Lq, D), k and v (B, Hkv, L, D) with Hkv | H, one dtype, mask (B, L) bool; one clear error otherwise."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q (B, H, Lq, D) and k, v (B, Hkv, L, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim, or the query "
                         f"heads are not a multiple of the KV heads")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if mask.dtype != torch.bool or tuple(mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"{name} must be a (B, L) = {(k.shape[0], k.shape[2])} bool tensor, "
                         f"got {mask.dtype} {tuple(mask.shape)}")


def prefill_sparse_attention(q, k, v, mask, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Eq. 2 among the selected tokens (m_Q = m_K = mask), causal by original position, GQA.

    q: (B, H, L, D); k, v: (B, Hkv, L, D); mask: (B, L) bool.  Returns (B, H, L, D), zero on unselected rows.
    Differentiable in q, k, v on both backends."""
    check_attention_shapes(q, k, v, mask)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"prefill needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
    reference = functools.partial(ref.gathered_sparse_attention, q, k, v, mask, scale)
    if not use_triton(q, backend):
        return reference()
    guard_backward = functools.partial(run_kernel, "prefill backward", backend=backend)
    kernel = lambda: _kernels("sparse_attn").sparse_attention_triton(q, k, v, mask, scale, guard_backward)  # noqa: E731
    return run_kernel("prefill", kernel, reference, backend)


def decode_attention_torch(q, k, v, key_valid, scale: float | None = None) -> torch.Tensor:
    """Masked SDPA of one query per sample over the valid cache entries; a sample with no valid key gets 0.

    The G query heads sharing a KV head become G queries of that head (no causal mask at decode), so K and V are
    read once and any SDPA backend applies."""
    bsz, heads, _, dim = q.shape
    queries = q.reshape(bsz, k.shape[1], heads // k.shape[1], dim)  # (B, Hkv, G, D)
    out = F.scaled_dot_product_attention(queries, k, v, attn_mask=key_valid[:, None, None, :], scale=scale)
    out = out.reshape(bsz, heads, 1, dim)  # (B, H, 1, D)
    return torch.where(key_valid.any(-1)[:, None, None, None], out, 0.0)


def decode_attention(q, k, v, key_valid, scale: float | None = None, backend: str = "auto",
                     splits: int | None = None) -> torch.Tensor:
    """The newest query of each sample against its pruned cache: q (B, H, 1, D); k, v (B, Hkv, K, D);
    key_valid (B, K) bool (False on padding).  Returns (B, H, 1, D).  `splits` forces the Triton key split."""
    check_attention_shapes(q, k, v, key_valid, name="key_valid")
    if q.shape[2] != 1:
        raise ValueError(f"decode takes one query per sample, got {q.shape[2]}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    reference = functools.partial(decode_attention_torch, q, k, v, key_valid, scale)
    if not use_triton(q, backend, needs_grad=needs_grad):
        return reference()
    kernel = lambda: _kernels("decode").decode_attention_triton(q, k, v, key_valid, scale, splits)  # noqa: E731
    return run_kernel("decode", kernel, reference, backend)


def probe_column_mass(q, k, valid, probe_idx, probe_ok, scale=None, backend: str = "auto"):
    """sparse_attention.probe_column_mass (Eq. 3 scores), fused in Triton: s (B, L) float32, n (B, L)."""
    check_attention_shapes(q, k, k, valid, name="valid")
    reference = functools.partial(ref.probe_column_mass, q, k, valid, probe_idx, probe_ok, scale)
    if not use_triton(q, backend):
        return reference()
    kernel = lambda: _kernels("probe").probe_column_mass_triton(q, k, valid, probe_idx, probe_ok, scale)  # noqa: E731
    return run_kernel("probe scoring", kernel, reference, backend)


def top_p_select(q, k, keep_p, valid=None, num_recent=ref.NUM_RECENT_PROBES, num_random=ref.NUM_RANDOM_PROBES,
                 seed=0, scale=None, backend: str = "auto", bonus=None) -> ref.Selection:
    """sparse_attention.top_p_select (Eq. 3), with the fused probe scoring on the Triton backend."""
    shape_valid = valid.bool() if valid is not None else torch.ones(k.shape[0], k.shape[2], dtype=torch.bool)
    check_attention_shapes(q, k, k, shape_valid, name="valid")
    args = (q, k, keep_p, valid, num_recent, num_random, seed, scale, bonus)
    reference = functools.partial(ref.top_p_select, *args)
    if not use_triton(q, backend):
        return reference()
    return run_kernel("probe scoring", lambda: _kernels("probe").top_p_select_triton(*args), reference, backend)


__all__ = ["prefill_sparse_attention", "decode_attention", "decode_attention_torch", "probe_column_mass",
           "top_p_select", "use_triton", "resolve_backend", "run_kernel", "triton_available", "check_attention_shapes",
           "BACKENDS", "ENV_VAR", "FAILED"]
