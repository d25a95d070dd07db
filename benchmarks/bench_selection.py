"""Cost of the Top-p selection (Eq. 3) as a fraction of dense causal attention on the same inputs.

    python benchmarks/bench_selection.py            # ℓ = 4096, Qwen2.5-VL-3B head layout (16 q heads, 2 kv, d=128)

Both are timed in one run on the same q, k, v (median of repeats, after a warm-up), so the ratio is what matters.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparse_attention import gathered_sparse_attention, top_p_select


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--keep-p", type=float, default=0.975)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    shape = lambda h: (1, h, args.length, args.head_dim)  # noqa: E731
    q = torch.randn(shape(args.heads), generator=g).to(args.device)  # (B, H, L, D)
    k, v = (torch.randn(shape(args.kv_heads), generator=g).to(args.device) for _ in range(2))  # (B, Hkv, L, D)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def dense():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        sync()

    def select():
        top_p_select(q, k, args.keep_p)
        sync()

    sel = top_p_select(q, k, args.keep_p)

    def sparse():
        gathered_sparse_attention(q, k, v, sel.mask)
        sync()

    t_dense, t_select, t_sparse = (median_time(f, args.repeats) for f in (dense, select, sparse))
    tau = float(sel.count[0]) / args.length
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} ℓ={args.length} "
          f"H={args.heads} Hkv={args.kv_heads} d={args.head_dim} fp32 keep_p={args.keep_p} (random q, k: τ={tau:.3f})")
    print("| what | median ms | ratio to dense attention |\n|---|---|---|")
    for name, t in (("dense causal SDPA", t_dense), ("Top-p selection (Eq. 3, 128 probes)", t_select),
                    (f"gathered sparse attention at τ={tau:.2f}", t_sparse)):
        print(f"| {name} | {1e3 * t:.1f} | {t / t_dense:.3f} |")


if __name__ == "__main__":
    main()
