"""Sparse attention kernels vs dense: time ratios and achieved throughput, all measured in one run.

    python benchmarks/bench_kernels.py                               # GPU: ℓ ∈ {4k,16k,32k}, τ ∈ {1,.5,.25,.1}, bf16
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --smoke    # CPU: tiny shapes, checks that the script runs

Qwen2.5-VL-3B's attention layout by default (16 query heads, 2 KV heads, d = 128), random q, k, v laid out as
transformers hands them to the attention ((B, L, H, D) memory seen as (B, H, L, D)).  For each
context length ℓ and token ratio τ, a random selection of k = τℓ tokens (the final one always kept) is timed with:

  prefill   dense causal SDPA over ℓ tokens | torch gather + SDPA (sparse_attention.gathered_sparse_attention)
            | Triton (zipr1_kernels.prefill_sparse_attention)
  selection sparse_attention.top_p_select (torch) | zipr1_kernels.top_p_select (fused probe kernels), 128 probes, p = 0.975
  prefill incl. selection   fused selection + Triton prefill: the cost a sparse layer actually pays
  fwd+bwd   dense SDPA vs Triton forward + backward (training)
  decode    one query per sample: dense SDPA over the full ℓ-token cache vs torch masked SDPA / Triton split-K decode
            over the pruned τℓ-token cache

Dense SDPA is timed on each fused backend that takes the inputs (flash, memory-efficient, cuDNN; math only where
none does) and the fastest is the baseline; the lines after the table name it and list what was timed.
Ratios are dense time / method time (higher is better).  Prefill throughput is the causal attention FLOPs of the
tokens attended (2·H·d·k² forward, 3.5× that for forward + backward) per second; decode throughput is KV-cache bytes
read per second; both as a fraction of the device's peak (--peak-tflops / --peak-tbps override the table).
Goals (issue): prefill incl. selection ≥ 12× over dense at τ = 0.25, ℓ = 32k; decode ≥ 3.3× at long context.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import zipr1_kernels  # noqa: E402
from sparse_attention import gathered_sparse_attention, top_p_select  # noqa: E402

PEAKS = {  # name fragment -> (dense bf16/fp16 tensor TFLOP/s, HBM TB/s), vendor datasheets
    "H200": (989.0, 4.8), "H100 PCIe": (756.0, 2.0), "H100": (989.0, 3.35), "A100": (312.0, 2.0),
    "L40S": (362.0, 0.864), "A10": (125.0, 0.6), "4090": (165.0, 1.0),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def device_peaks(device, args):
    """(TFLOP/s, TB/s) peak of the device: command line first, then the table; None where unknown."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    table = next((v for key, v in PEAKS.items() if key in name), (None, None))
    tflops = args.peak_tflops or (table[0] if args.dtype != "fp32" else None)
    return name, tflops, args.peak_tbps or table[1]


def bench(fn, device, repeats):
    """Median milliseconds of fn(): triton's do_bench on a GPU (flushes L2 between runs), wall clock on the CPU."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # warm-up (and Triton's autotuning)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


FUSED_SDPA = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")  # MATH only where none of them runs
BASELINES = []  # one line per dense baseline: the SDPA backend the ratios divide by, printed after the table


def sdpa_on(backend: str, q, k, v, causal: bool, enable_gqa: bool = False):
    """SDPA restricted to one backend (raises RuntimeError where that backend cannot take these inputs)."""
    with torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, backend)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=enable_gqa)


def dense_candidates(phase: str, q, k, v, backends=FUSED_SDPA) -> list:
    """(label, fn) per SDPA backend for the dense baseline of `phase`.  prefill: causal over all ℓ tokens, native
    GQA where the backend has it, else K, V expanded per query head (the expansion is timed too).  decode: one query
    per head against the full cache, as flash decoding does for GQA: the G query heads of a KV head become G queries
    of one head, so K and V are read once.  q (B, H, 1, D) -> (B, H, 1, D)."""
    bsz, heads, _, dim = q.shape
    groups = heads // k.shape[1]
    if phase == "decode":
        queries = q.reshape(bsz, k.shape[1], groups, dim)  # (B, Hkv, G, D)
        return [(name, lambda b=name: sdpa_on(b, queries, k, v, False).reshape(bsz, heads, 1, dim))
                for name in backends]
    cands = []
    for name in backends:
        cands.append((f"{name}, native GQA", lambda b=name: sdpa_on(b, q, k, v, True, enable_gqa=True)))
        cands.append((f"{name}, K/V expanded", lambda b=name: sdpa_on(
            b, q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), True)))
    return cands


def fastest_dense(cands, device, repeats, wrap=None):
    """Time every candidate that runs (each backend once: native GQA before K/V expanded; `wrap` adds the backward)
    and return the fastest as (label, ms, fn) and a line naming what was timed."""
    timed, skipped, done = [], [], set()
    for label, fn in cands:
        backend = label.split(",")[0]
        if backend in done:
            continue
        run = wrap(fn) if wrap else fn
        try:
            run()
        except RuntimeError as err:
            skipped.append(f"{label}: {str(err).splitlines()[0][:60]}")
            continue
        done.add(backend)
        timed.append((label, bench(run, device, repeats), run))
    if not timed:
        raise RuntimeError("no SDPA backend ran: " + "; ".join(skipped))
    best = min(timed, key=lambda t: t[1])
    note = ", ".join(f"{label} {ms:.3f} ms" for label, ms, _ in timed)
    note += f"; unsupported here: {len(skipped)} variants" if skipped else ""
    return best, note


def dense_baseline(phase, q, k, v, device, repeats, wrap=None):
    """The dense SDPA the ratios divide by: the fastest fused backend (MATH where none runs), printed by name."""
    try:
        (label, ms, fn), note = fastest_dense(dense_candidates(phase, q, k, v), device, repeats, wrap)
    except RuntimeError:
        (label, ms, fn), note = fastest_dense(dense_candidates(phase, q, k, v, ("MATH",)), device, repeats, wrap)
    BASELINES.append(f"dense {phase}{' fwd+bwd' if wrap else ''} at ℓ={k.shape[2]}: SDPA {label} (timed: {note})")
    return label, ms, fn


def random_selection(batch, length, tau, device, seed=0):
    """Exactly k = round(τℓ) selected tokens per sample, the final one always among them.  (B, L) bool."""
    count = max(1, round(tau * length))
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        mask[b, torch.randperm(length - 1, generator=g)[: count - 1]] = True
    mask[:, -1] = True
    return mask.to(device), count


def with_backward(fn, leaves, grad_out):
    """fn's forward and backward, gradients cleared first."""
    def run():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad_out)
    return run


def grad_error(fn, reference, leaves, grad_out) -> float:
    """Largest |Δ| of dq, dk, dv between fn and the reference, relative to the reference's largest gradient."""
    grads = []
    for f in (fn, reference):
        with_backward(f, leaves, grad_out)()
        grads.append([t.grad.float() for t in leaves])
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*grads))


def prefill_rows(q, k, v, args, device, peak_tflops):
    """Table rows (phase, ℓ, τ, method, ms, ratio, throughput) for one context length."""
    bsz, heads, length, dim = q.shape
    flops = lambda count: 2.0 * bsz * heads * dim * count * count  # noqa: E731  causal forward FLOPs
    tflops = lambda f, ms: f"{f / ms / 1e9:.0f} TFLOP/s" + (f" ({100 * f / ms / 1e9 / peak_tflops:.0f}%)"  # noqa: E731
                                                          if peak_tflops else "")
    label, t_dense, _ = dense_baseline("prefill", q, k, v, device, args.repeats)
    rows = [("prefill", length, 1.0, f"dense SDPA ({label})", t_dense, 1.0, tflops(flops(length), t_dense))]
    t_sel_torch = bench(lambda: top_p_select(q, k, args.keep_p), device, args.repeats)
    t_sel = bench(lambda: zipr1_kernels.top_p_select(q, k, args.keep_p, backend="triton"), device, args.repeats)
    rows += [("selection", length, None, "torch top_p_select", t_sel_torch, t_dense / t_sel_torch, ""),
             ("selection", length, None, "fused probe (Triton)", t_sel, t_dense / t_sel, "")]
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn_like(q)
    if args.backward:
        label, t_dense_bwd, _ = dense_baseline("prefill", *leaves, device, args.repeats,
                                               wrap=lambda fn: with_backward(lambda *_: fn(), leaves, grad_out))
        rows.append(("fwd+bwd", length, 1.0, f"dense SDPA ({label})", t_dense_bwd, 1.0,
                     tflops(3.5 * flops(length), t_dense_bwd)))
    for tau in args.taus:
        mask, count = random_selection(bsz, length, tau, device)
        err = (zipr1_kernels.prefill_sparse_attention(q, k, v, mask, backend="triton").float()
               - gathered_sparse_attention(q, k, v, mask).float()).abs().max().item()
        t_gather = bench(lambda: gathered_sparse_attention(q, k, v, mask), device, args.repeats)
        t_triton = bench(lambda: zipr1_kernels.prefill_sparse_attention(q, k, v, mask, backend="triton"), device,
                         args.repeats)
        rows += [("prefill", length, tau, "torch gather+SDPA", t_gather, t_dense / t_gather,
                  tflops(flops(count), t_gather)),
                 ("prefill", length, tau, f"Triton (max|Δ| vs torch {err:.1e})", t_triton, t_dense / t_triton,
                  tflops(flops(count), t_triton)),
                 ("prefill incl. selection", length, tau, "fused selection + Triton", t_sel + t_triton,
                  t_dense / (t_sel + t_triton), tflops(flops(count), t_sel + t_triton))]
        if args.backward:
            sparse = lambda a, b, c: zipr1_kernels.prefill_sparse_attention(a, b, c, mask, backend="triton")  # noqa: E731
            gerr = grad_error(sparse, lambda a, b, c: gathered_sparse_attention(a, b, c, mask), leaves, grad_out)
            t_bwd = bench(with_backward(sparse, leaves, grad_out), device, args.repeats)
            rows.append(("fwd+bwd", length, tau, f"Triton (max rel |Δ grad| vs torch {gerr:.1e})", t_bwd,
                         t_dense_bwd / t_bwd, tflops(3.5 * flops(count), t_bwd)))
    return rows


def decode_rows(length, args, device, dtype, peak_tbps):
    """Dense decode over an ℓ-token cache vs sparse decode over the pruned τℓ-token cache."""
    g = torch.Generator(device).manual_seed(1)
    bsz, d = args.decode_batch, args.head_dim
    make = lambda h, n: torch.randn(bsz, h, n, d, generator=g, device=device, dtype=dtype)  # noqa: E731  (B, h, n, D)
    q, k, v = make(args.heads, 1), make(args.kv_heads, length), make(args.kv_heads, length)
    cache_bytes = lambda n: 2 * bsz * args.kv_heads * n * d * q.element_size()  # noqa: E731  K and V
    tbps = lambda n, ms: f"{cache_bytes(n) / ms / 1e9:.2f} TB/s" + (  # noqa: E731
        f" ({100 * cache_bytes(n) / ms / 1e9 / peak_tbps:.0f}%)" if peak_tbps else "")
    label, t_dense, _ = dense_baseline("decode", q, k, v, device, args.repeats)
    rows = [("decode", length, 1.0, f"dense SDPA ({label})", t_dense, 1.0, tbps(length, t_dense))]
    for tau in args.taus:
        keys = max(1, round(tau * length))
        kp, vp = k[:, :, :keys].contiguous(), v[:, :, :keys].contiguous()  # (B, Hkv, τℓ, D) pruned cache
        valid = torch.ones(bsz, keys, dtype=torch.bool, device=device)
        err = (zipr1_kernels.decode_attention(q, kp, vp, valid, backend="triton").float()
               - zipr1_kernels.decode_attention(q, kp, vp, valid, backend="torch").float()).abs().max().item()
        t_torch = bench(lambda: zipr1_kernels.decode_attention(q, kp, vp, valid, backend="torch"), device, args.repeats)
        t_triton = bench(lambda: zipr1_kernels.decode_attention(q, kp, vp, valid, backend="triton"), device, args.repeats)
        rows += [("decode", length, tau, "torch masked SDPA", t_torch, t_dense / t_torch, tbps(keys, t_torch)),
                 ("decode", length, tau, f"Triton split-K (max|Δ| vs torch {err:.1e})", t_triton, t_dense / t_triton,
                  tbps(keys, t_triton))]
    return rows


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default=None, help="default 4096,16384,32768 (--smoke: 64,128)")
    ap.add_argument("--taus", default=None, help="default 1,0.5,0.25,0.1 (--smoke: 1,0.25)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--batch", type=int, default=1, help="prefill batch")
    ap.add_argument("--decode-batch", type=int, default=16, help="samples decoding together")
    ap.add_argument("--keep-p", type=float, default=0.975, help="p of the timed Top-p selection")
    ap.add_argument("--no-backward", dest="backward", action="store_false", help="skip the fwd+bwd rows")
    ap.add_argument("--repeats", type=int, default=5, help="CPU only; on a GPU do_bench decides")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--peak-tbps", type=float, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (needs TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.smoke:
        args.heads, args.kv_heads, args.head_dim, args.dtype, args.decode_batch, args.repeats = 4, 2, 16, "fp32", 2, 1
    args.lengths = [int(x) for x in (args.lengths or ("64,128" if args.smoke else "4096,16384,32768")).split(",")]
    args.taus = [float(x) for x in (args.taus or ("1,0.25" if args.smoke else "1,0.5,0.25,0.1")).split(",")]
    return args


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("no GPU: run with TRITON_INTERPRET=1 (and --smoke) to exercise the kernels on the CPU")
    dtype = DTYPES[args.dtype]
    name, peak_tflops, peak_tbps = device_peaks(device, args)
    print(f"device={name} torch={torch.__version__} dtype={args.dtype} H={args.heads} Hkv={args.kv_heads} "
          f"d={args.head_dim} prefill batch={args.batch} decode batch={args.decode_batch} "
          f"peak={peak_tflops} TFLOP/s, {peak_tbps} TB/s")
    print("| phase | ℓ | τ | method | ms | × vs dense | throughput |\n|---|---|---|---|---|---|---|")
    results = []
    for length in args.lengths:
        g = torch.Generator(device).manual_seed(length)
        make = lambda h: torch.randn(args.batch, length, h, args.head_dim, generator=g, device=device,  # noqa: E731
                                     dtype=dtype).transpose(1, 2)  # HF's layout: (B, L, H, D) memory
        q, k, v = make(args.heads), make(args.kv_heads), make(args.kv_heads)  # (B, H|Hkv, L, D) strided views
        rows = prefill_rows(q, k, v, args, device, peak_tflops) + decode_rows(length, args, device, dtype, peak_tbps)
        for phase, ell, tau, method, ms, ratio, throughput in rows:
            tau_s = "" if tau is None else f"{tau:g}"
            print(f"| {phase} | {ell} | {tau_s} | {method} | {ms:.3f} | {ratio:.2f} | {throughput} |", flush=True)
        results += rows
        del q, k, v
    print("\nSDPA backends of the dense baselines:\n" + "\n".join(f"- {line}" for line in BASELINES))
    longest = max(args.lengths)
    for phase, goal in (("prefill incl. selection", 12.0), ("decode", 3.3)):
        got = [r[5] for r in results if r[0] == phase and r[1] == longest and r[2] == 0.25 and "Triton" in r[3]]
        if got:
            print(f"goal {phase} at τ=0.25, ℓ={longest}: {got[0]:.2f}× (target ≥ {goal}×)"
                  + ("" if device.type == "cuda" else "  [CPU interpreter: not a speed measurement]"))


if __name__ == "__main__":
    main()
