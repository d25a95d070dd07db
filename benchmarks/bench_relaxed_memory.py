"""Memory the relaxed token ratio τ̃ (the learned-sparsity loss term) keeps alive until backward, per layer.

    python benchmarks/bench_relaxed_memory.py                       # Qwen2.5-VL-3B heads, ℓ = 32k, 1 row, CPU
    python benchmarks/bench_relaxed_memory.py --rows 8 --device cuda

Counts the bytes of new storage autograd saves for backward (saved-tensor hooks; q and k themselves are not counted:
the attention saves them anyway) for `sparse_attention.relaxed_token_ratio` with recompute=True (train.py: the probe
probabilities are recomputed in backward) and recompute=False (they are kept). Saved sizes are linear in the rows
and the same for every layer, so the script also prints them for `--scale_rows` rows × `--layers` layers.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sparse_attention import relaxed_token_ratio  # noqa: E402


def saved_bytes(q, k, keep_p, recompute: bool) -> tuple[int, float]:
    """(bytes of new storage saved for backward by one layer's τ̃, seconds of forward + backward)."""
    inputs, saved = {q.untyped_storage().data_ptr(), k.untyped_storage().data_ptr()}, {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tau = relaxed_token_ratio(q, k, keep_p, 0.01, recompute=recompute)  # 128 probes
    tau.sum().backward()
    return sum(saved.values()), time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--rows", type=int, default=1, help="rows measured")
    p.add_argument("--scale_rows", type=int, default=8, help="rows of the extrapolation (a group of N = 8)")
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    g = torch.Generator(args.device).manual_seed(0)
    shape = lambda h: (args.rows, h, args.length, args.head_dim)  # noqa: E731
    q = torch.randn(shape(args.heads), generator=g, device=args.device).requires_grad_()
    k = torch.randn(shape(args.kv_heads), generator=g, device=args.device).requires_grad_()
    keep_p = torch.full((args.rows,), 0.975, device=args.device)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} ℓ={args.length} "
          f"H={args.heads} Hkv={args.kv_heads} d={args.head_dim} fp32, 128 probes, {args.rows} row(s) measured")
    print(f"| τ̃ path | saved per layer, {args.rows} row(s) | × {args.scale_rows} rows × {args.layers} layers | "
          f"fwd+bwd s (one layer) |\n|---|---|---|---|")
    for recompute in (True, False):
        nbytes, seconds = saved_bytes(q, k, keep_p, recompute)
        total = nbytes * args.scale_rows / args.rows * args.layers
        name = "recomputed in backward (train.py)" if recompute else "kept until backward"
        print(f"| {name} | {nbytes / 2**20:.1f} MiB | {total / 2**30:.2f} GiB | {seconds:.1f} |")
        q.grad = k.grad = None


if __name__ == "__main__":
    main()
