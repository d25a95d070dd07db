"""LM prefill time and KV-cache bytes, Top-p sparse (pruned cache) vs dense, measured in one run on the same prompt.

    python benchmarks/bench_prefill.py                       # ℓ ∈ {1k, 4k, 16k}, small-but-not-tiny Qwen2.5-VL
    python benchmarks/bench_prefill.py --lengths 1024 --keep-p 0.975

Random weights, random text tokens (the LM part of prefill; the vision tower is the same for both). Dense = the same
weights with transformers' stock "sdpa" attention and a DynamicCache; sparse = rollout.prefill (selection + sparse
attention + pruned cache). With random weights attention is diffuse, so τ at a given keep_p is high; the τ each run
reached is printed next to its ratios.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transformers import DynamicCache, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

from rollout import cache_kwarg, prefill  # noqa: E402
from sparse_qwen import make_sparse  # noqa: E402


def small_config(layers, hidden, heads, kv_heads):
    head_dim = hidden // heads
    half = head_dim // 2
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]  # Qwen's 1:1.5:1.5
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=65536,
                         rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e6}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden),
        image_token_id=4000, video_token_id=4001, vision_start_token_id=4002)


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def dense_prefill(model, inputs):
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    with torch.no_grad():
        model(**inputs, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument("--keep-p", default="0.975,0.5")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    dense = Qwen2_5_VLForConditionalGeneration(small_config(args.layers, args.hidden, args.heads, args.kv_heads))
    dense = dense.eval().requires_grad_(False)
    dense.set_attn_implementation("sdpa")
    sparse = make_sparse(copy.deepcopy(dense))
    print(f"device=cpu threads={torch.get_num_threads()} torch={torch.__version__} | LM: {args.layers} layers, "
          f"hidden {args.hidden}, {args.heads} q heads / {args.kv_heads} kv heads, fp32, batch 1")
    print("| ℓ | keep_p | τ | dense prefill s | sparse prefill s | time ratio sparse/dense | KV bytes ratio |")
    print("|---|---|---|---|---|---|---|")
    for length in map(int, args.lengths.split(",")):
        ids = torch.randint(0, 3900, (1, length))
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=torch.zeros_like(ids))
        t_dense, dense_bytes = timed(lambda: dense_prefill(dense, inputs), args.repeats)
        for keep_p in map(float, args.keep_p.split(",")):
            t_sparse, (_, state, _) = timed(lambda: prefill(sparse, inputs, keep_p), args.repeats)
            tau = float(state.token_ratio()[0])
            kv = float(state.cache.kv_bytes()[0])
            print(f"| {length} | {keep_p} | {tau:.3f} | {t_dense:.3f} | {t_sparse:.3f} | {t_sparse / t_dense:.3f} | "
                  f"{kv / dense_bytes:.3f} |", flush=True)


if __name__ == "__main__":
    main()
