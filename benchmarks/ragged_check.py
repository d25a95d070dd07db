"""Ragged batches at full size: the Triton kernels against the torch reference, pass or fail (bf16).

    python benchmarks/ragged_check.py                                # GPU: B = 64, ℓ = 32768, 16 / 2 heads, d = 128
    TRITON_INTERPRET=1 python benchmarks/ragged_check.py --dry-run   # CPU: tiny shapes, checks the script itself

Each sample b is left-padded by up to ℓ/8 tokens and keeps k_b = round(τ_b · its length) of its tokens, the last one
always, with τ_b ~ U(0.05, 0.5) drawn per sample: every row of the batch has its own count.  The kernels run on the
whole batch (backend="triton"); the torch reference of sparse_attention.py runs in fp32 on the same bf16 inputs, on a
few rows (0, B/2 − 1, B/2, B − 1), K and V expanded per query head so that SDPA takes its memory-efficient path:

  forward   zipr1_kernels.prefill_sparse_attention at batch B  vs sparse_attention.gathered_sparse_attention
  backward  the same at batch 4 (the first four samples), dq, dk, dv vs the reference's autograd
  decode    zipr1_kernels.decode_attention on each sample's pruned cache (K = max_b k_b keys, ragged key_valid)
            vs zipr1_kernels.decode_attention_torch
  probe     zipr1_kernels.probe_column_mass with sparse_attention.probe_indices' 128 probes
            vs sparse_attention.probe_column_mass (the Eq. 3 scores)

Where offsets above 2³¹ show: q and the prefill output are (B, L, H, D) memory (HF's layout) of
B·ℓ·H·d = 64 · 32768 · 16 · 128 = 2³² elements, so every sample b ≥ 32 starts at an element offset ≥ 2³¹ and an
int32 offset in the prefill forward or the probe kernels would wrap there: rows 31 and 32 straddle the boundary, row
63 reads the last 2²⁶ elements.  K and V (2 KV heads) hold 2²⁹ elements, the batch-4 backward 2²⁸ per q, the pruned
decode cache fewer than 2³¹: those checks test the ragged counts, not large offsets.  The script prints which tensors
pass 2³¹ at the shapes it ran.

Pass: max |Triton − reference| ≤ tol · scale.  For the outputs (forward, decode) and the probe mass the scale is
each row's largest reference value (a row: all dims but the last; rows that are exactly 0 in the reference, such as
unselected tokens, use 10⁻³ · the tensor's largest value).  For the gradients, whose rows cancel by construction
(Σ_c dS_rc = 0), it is the largest value of the sample's dq, dk or dv.  tol = 2e-2 (five bf16 steps) for outputs and
gradients, 1e-3 for the probe mass, whose bf16 products are exact in fp32.  The error of torch's own bf16 path is
printed beside the forward and backward as a yardstick.  Exit status 1 if any check fails.
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import zipr1_kernels  # noqa: E402
from sparse_attention import (gather_tokens, gathered_sparse_attention, mask_to_indices, probe_column_mass,  # noqa: E402
                              probe_indices)

TOL_BF16, TOL_MASS = 2e-2, 1e-3


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tau-range", type=float, nargs=2, default=(0.05, 0.5), metavar=("LOW", "HIGH"))
    ap.add_argument("--backward-batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (needs TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.batch, args.length, args.heads, args.kv_heads, args.head_dim = 4, 48, 4, 2, 16
    return args


def ragged_batch(args, device):
    """bf16 q (B, H, L, D), k, v (B, Hkv, L, D) as views of HF's (B, L, H, D) memory; valid (B, L) (left padding);
    mask (B, L) with k_b = round(τ_b · length_b) selected tokens, the last always; τ (B,)."""
    bsz, length = args.batch, args.length
    g = torch.Generator().manual_seed(args.seed)
    low, high = args.tau_range
    tau = low + (high - low) * torch.rand(bsz, generator=g)  # (B,) per-row token ratio
    pad = torch.randint(0, length // 8 + 1, (bsz,), generator=g)  # (B,) left padding
    valid = torch.arange(length)[None] >= pad[:, None]  # (B, L)
    count = (tau * (length - pad)).round().long().clamp(min=1)  # (B,) k_b
    scores = torch.rand(bsz, length, generator=g).masked_fill(~valid, -1.0)
    scores[:, -1] = 2.0  # the last token is always kept
    rank = scores.argsort(-1, descending=True).argsort(-1)  # (B, L) rank of each token's score
    mask = rank < count[:, None]  # (B, L)
    gd = torch.Generator(device).manual_seed(args.seed)
    make = lambda h: torch.randn(bsz, length, h, args.head_dim, generator=gd, device=device,  # noqa: E731
                                 dtype=torch.bfloat16).transpose(1, 2)  # (B, h, L, D) view of (B, L, h, D)
    q, k, v = make(args.heads), make(args.kv_heads), make(args.kv_heads)
    return q, k, v, valid.to(device), mask.to(device), tau


def expand(x, heads):
    """(B, Hkv, L, D) -> (B, H, L, D): K or V repeated per query head (SDPA's efficient path takes no GQA)."""
    return x.repeat_interleave(heads // x.shape[1], 1)


def scaled_error(got, ref, per_row: bool = True) -> float:
    """max over rows (all dims but the last) of max |got − ref| / max |ref row|, all-zero reference rows scaled by
    1e-3 · max |ref| instead; per_row=False: max |got − ref| / max |ref| over the whole tensor."""
    diff, ref = (got.float() - ref.float()).abs(), ref.float().abs()
    largest = max(ref.max().item(), 1e-30)
    if not per_row:
        return diff.max().item() / largest
    return (diff.amax(-1) / ref.amax(-1).clamp_min(1e-3 * largest)).max().item()


def reference_prefill(q, k, v, mask, rows, dtype=torch.float32):
    """gathered_sparse_attention per row in `dtype`: {row: (H, L, D)}."""
    return {b: gathered_sparse_attention(q[b:b + 1].to(dtype), expand(k[b:b + 1].to(dtype), q.shape[1]),
                                         expand(v[b:b + 1].to(dtype), q.shape[1]), mask[b:b + 1])[0] for b in rows}


def check_forward(q, k, v, mask, rows):
    out = zipr1_kernels.prefill_sparse_attention(q, k, v, mask, backend="triton")  # (B, H, L, D)
    ref, torch_bf16 = reference_prefill(q, k, v, mask, rows), reference_prefill(q, k, v, mask, rows, torch.bfloat16)
    err = max(scaled_error(out[b], ref[b]) for b in rows)
    yardstick = max(scaled_error(torch_bf16[b], ref[b]) for b in rows)
    return err, TOL_BF16, f"torch bf16: {yardstick:.1e}"


def reference_grads(q, k, v, mask, grad_out, b, dtype=torch.float32):
    """dq, dk, dv of row b from the reference's autograd, in `dtype`."""
    leaves = [t[b:b + 1].detach().to(dtype).requires_grad_() for t in (q, k, v)]
    with torch.enable_grad():
        out = gathered_sparse_attention(leaves[0], expand(leaves[1], q.shape[1]), expand(leaves[2], q.shape[1]),
                                        mask[b:b + 1])
        return [g[0] for g in torch.autograd.grad(out, leaves, grad_out[b:b + 1].to(dtype))]


def check_backward(q, k, v, mask, batch):
    leaves = [t[:batch].detach().clone().requires_grad_() for t in (q, k, v)]  # clone keeps HF's strides
    grad_out = torch.randn_like(leaves[0])
    zipr1_kernels.prefill_sparse_attention(*leaves, mask[:batch], backend="triton").backward(grad_out)
    err = yardstick = 0.0
    for b in range(batch):
        ref = reference_grads(q, k, v, mask, grad_out, b)
        torch_bf16 = reference_grads(q, k, v, mask, grad_out, b, torch.bfloat16)
        err = max([err] + [scaled_error(t.grad[b], r, per_row=False) for t, r in zip(leaves, ref)])
        yardstick = max([yardstick] + [scaled_error(t, r, per_row=False) for t, r in zip(torch_bf16, ref)])
    return err, TOL_BF16, f"dq, dk, dv at batch {batch}; torch bf16: {yardstick:.1e}"


def check_decode(k, v, mask, heads, rows):
    idx, key_valid = mask_to_indices(mask)  # (B, K) selected positions, padded; (B, K) ragged
    kc, vc = gather_tokens(k, idx), gather_tokens(v, idx)  # (B, Hkv, K, D) pruned caches
    q = torch.randn(k.shape[0], heads, 1, k.shape[-1], device=k.device, dtype=k.dtype)  # (B, H, 1, D) newest query
    out = zipr1_kernels.decode_attention(q, kc, vc, key_valid, backend="triton")  # (B, H, 1, D)
    ref = zipr1_kernels.decode_attention_torch(q[rows].float(), kc[rows].float(), vc[rows].float(), key_valid[rows])
    lengths = key_valid.sum(-1)
    return scaled_error(out[rows], ref), TOL_BF16, f"K = {kc.shape[2]}, valid keys {lengths.min()}..{lengths.max()}"


def check_probe(q, k, valid, rows):
    probe_idx, probe_ok = (t.to(q.device) for t in probe_indices(valid.cpu()))  # (B, P)
    mass, seen = zipr1_kernels.probe_column_mass(q, k, valid, probe_idx, probe_ok, backend="triton")  # (B, L)
    ref_mass, ref_seen = probe_column_mass(q[rows].float(), k[rows].float(), valid[rows], probe_idx[rows],
                                           probe_ok[rows])
    if not torch.equal(seen[rows], ref_seen):
        return math.inf, TOL_MASS, "probe visibility counts differ"
    return scaled_error(mass[rows], ref_mass), TOL_MASS, f"{probe_idx.shape[1]} probes"


def offsets_line(q, k) -> str:
    """Which tensors' element offsets pass 2³¹ at these shapes (q: also the prefill output)."""
    def state(name, t):
        n = t.numel()
        return f"{name} {n} elements (2^{math.log2(n):.1f}, {'beyond' if n > 2 ** 31 else 'within'} int32)"
    first = next((b for b in range(q.shape[0]) if b * q[0].numel() >= 2 ** 31), None)
    where = f"samples ≥ {first} start past 2^31" if first is not None else "no offset reaches 2^31"
    return f"offsets: {state('q and output', q)}, {state('k and v each', k)}; {where}"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("no GPU: run with TRITON_INTERPRET=1 --dry-run to exercise the kernels on the CPU")
    torch.manual_seed(args.seed)
    q, k, v, valid, mask, tau = ragged_batch(args, device)
    rows = sorted({0, args.batch // 2 - 1, args.batch // 2, args.batch - 1})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"# ragged_check: {name}, B={args.batch} ℓ={args.length} H={args.heads} Hkv={args.kv_heads} "
          f"d={args.head_dim} bf16, τ_b ~ U{tuple(args.tau_range)} (drawn {tau.min():.3f}..{tau.max():.3f}), "
          f"reference rows {rows}")
    print(f"# {offsets_line(q, k)}")
    checks = [("forward", lambda: check_forward(q, k, v, mask, rows)),
              ("backward", lambda: check_backward(q, k, v, mask, min(args.backward_batch, args.batch))),
              ("decode", lambda: check_decode(k, v, mask, args.heads, rows)),
              ("probe mass", lambda: check_probe(q, k, valid, rows))]
    print("| check | scaled error | tolerance | result | s | note |\n|---|---|---|---|---|---|")
    failed = []
    for check, run in checks:
        start = time.perf_counter()
        try:
            err, tol, note = run()
        except Exception as exc:  # noqa: BLE001  a crash is a failed check; report it and go on
            err, tol, note = math.inf, math.nan, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ok = err <= tol
        failed += [] if ok else [check]
        print(f"| {check} | {err:.2e} | {tol:g} | {'PASS' if ok else 'FAIL'} | {time.perf_counter() - start:.1f} | "
              f"{note} |", flush=True)
    print(f"ragged check: {'PASS' if not failed else 'FAIL (' + ', '.join(failed) + ')'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
