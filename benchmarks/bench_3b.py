"""Real-size figures on the Qwen2.5-VL-3B architecture: sparse vs dense prefill, KV bytes, decode, one ZipR1 step.

    python benchmarks/bench_3b.py          # GPU, bf16: ℓ 8k/16k/32k, τ ≈ 0.25, decode b = 1, 8, ZipR1 step
    python benchmarks/bench_3b.py --smoke  # tiny sizes on the CPU: checks that the script runs

The model is built from Qwen2.5-VL-3B-Instruct's published config.json with random weights (nothing downloaded):
LM 36 layers, hidden 2048, 16 query / 2 KV heads (d = 128), MLP 11008, vocabulary 151936, tied embeddings,
mRoPE sections [16, 24, 24], θ = 1e6; vision tower 32 blocks, hidden 1280, MLP 3420, 16 heads, patch 14, merge 2.
Sources: the config.json of Qwen/Qwen2.5-VL-3B-Instruct as mirrored on the hub (huggingface.co/zyoNoob/
Qwen2.5-VL-3B-Instruct-AWQ/blob/main/config.json, `_name_or_path` = the original's snapshot b318d09; also
huggingface.co/dahwinsingularity/vllm2/blob/main/config.json); the vision fields that file omits (depth, MLP, heads,
patch, window, full-attention blocks) are transformers' Qwen2_5_VLVisionConfig defaults. 7B (memory estimate only):
huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct-AWQ/blob/main/config.json (hidden 3584, 28 layers, 28 / 4 heads, MLP 18944,
vocabulary 152064, untied embeddings; vision out_hidden_size 3584).

Forcing τ ≈ 0.25: random weights give diffuse attention, so the paper's p = 0.975 keeps most tokens. By default
(`--tau 0.25`) keep_p is found per length by bisection on the real Top-p selection (τ is nondecreasing in p) and the
p used and the τ reached are printed in every row; `--keep-p X` fixes p instead. Selection is the real Eq. 3 path.
Anchors: ZipVL prefill 2.3×, decode 2.8×; ZipR1 (later version) decode 3.3×, memory 3×.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transformers import DynamicCache, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

from rollout import cache_kwarg, prefill  # noqa: E402
from zipr1_support.mrope import continuation_positions  # noqa: E402
from sparse_qwen import check_transformers, make_sparse, sparse_kwargs  # noqa: E402

QWEN_TOKEN_IDS = dict(bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652,
                      vision_end_token_id=151653, image_token_id=151655, video_token_id=151656)
TEXT = dict(max_position_embeddings=128000, rms_norm_eps=1e-6)  # + the per-size fields below
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
SIZES = {  # name: (text fields, vision fields, tie_word_embeddings); token ids are added by qwen25_vl_config
    "3b": (dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2), dict(out_hidden_size=2048), True),
    "7b": (dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4), dict(out_hidden_size=3584), False),
    "smoke": (dict(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2),
              dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1],
                   out_hidden_size=128), True),
}
ANCHORS = "anchors: ZipVL prefill 2.3x, decode 2.8x; ZipR1 later version decode 3.3x, memory 3x"
GB = 1e9


def qwen25_vl_config(size: str, token_ids: dict = QWEN_TOKEN_IDS) -> Qwen2_5_VLConfig:
    """The published architecture (module docstring) with mRoPE [16, 24, 24] (scaled down for "smoke"), θ = 1e6."""
    text, vision, tied = SIZES[size]
    half = text["hidden_size"] // text["num_attention_heads"] // 2  # 64 rotary frequencies at d = 128
    rest = half - half // 4
    section = [16, 24, 24] if half == 64 else [half // 4, rest // 2, rest - rest // 2]  # Qwen's 1 : 1.5 : 1.5
    text = {**TEXT, **text, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}}
    ids = {k: v for k, v in token_ids.items() if k in ("bos_token_id", "eos_token_id")}
    return Qwen2_5_VLConfig(text_config={**text, **ids}, vision_config={**VISION, **vision}, tie_word_embeddings=tied,
                            **{k: v for k, v in token_ids.items() if k not in ids})


def build_model(config, device, dtype):
    """Random-weight model built directly on `device` in `dtype` (HF's own initialisation)."""
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def use_dense(model):
    """Stock transformers attention (SDPA / flash) in the text decoder: the dense baseline, same weights."""
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    return model


# ----------------------------------------------------------------------------------------------- memory estimate
def parameter_counts(config) -> tuple[int, int]:
    """(all parameters, language-model parameters) counted on the meta device; vision is frozen in train.py."""
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    return total, total - vision


def state_memory(total: int, trainable: int, world: int) -> dict:
    """Bytes per GPU of what train.py keeps for a whole run (estimate; activations and KV cache excluded).

    fp32 master weights 4·P, fp32 grads 4·P_lm, AdamW moments 8·P_lm, bf16 reference 2·P — sharded 1/W by FSDP2,
    except the policy's frozen vision tower (4·P_vis), which every rank keeps whole (multi_gpu.shard_model's
    `replicate`); with W > 1 a rollout also holds one gathered bf16 copy of the language model, 2·P_lm
    (multi_gpu.gathered_weights).
    """
    vision = total - trainable
    sharded = (4 * trainable + 4 * trainable + 8 * trainable + 2 * total) / world + 4 * vision
    gathered = 2 * trainable if world > 1 else 0
    return {"sharded states": sharded, "gathered policy (rollout)": gathered, "total": sharded + gathered}


def print_memory_estimates():
    print("\n## Static memory per GPU (ESTIMATED from parameter counts; activations and KV cache not included)")
    print("| model | GPUs | parameters (LM) | weights+grads+AdamW+reference per GPU | + gathered policy in rollout |")
    print("|---|---|---|---|---|")
    for size, world in (("3b", 1), ("7b", 1), ("7b", 8)):
        total, lm = parameter_counts(qwen25_vl_config(size))
        mem = state_memory(total, lm, world)
        print(f"| {size.upper()} | {world} | {total / 1e9:.2f}B ({lm / 1e9:.2f}B) | "
              f"{mem['sharded states'] / GB:.1f} GB | {mem['total'] / GB:.1f} GB |")


# ----------------------------------------------------------------------------------------------- timing helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """(median seconds, last result) over `repeats` runs after one warm-up."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def text_inputs(length, batch, vocab, device):
    """Random text-token prompts (ids below every special token), no padding.  (B, ℓ)"""
    ids = torch.randint(0, min(vocab, 151_000) - 1000, (1, length), generator=torch.Generator().manual_seed(length))
    ids = ids.expand(batch, -1).to(device)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=torch.zeros_like(ids))


@torch.no_grad()
def dense_prefill(model, inputs):
    """Stock prefill into a full DynamicCache: (last logits (B, V), cache)."""
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    logits = model(**inputs, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
    return logits, cache


def cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@torch.no_grad()
def keep_p_for_tau(model, inputs, target, iters):
    """Bisection on p for τ(p) ≈ target (τ is nondecreasing in p): returns (p, τ) of the closest evaluated p."""
    lo, hi, best = 0.0, 1.0, (1.0, 1.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        tau = float(prefill(model, inputs, mid)[1].token_ratio().mean())
        best = min(best, (mid, tau), key=lambda pt: abs(pt[1] - target))
        lo, hi = (mid, hi) if tau < target else (lo, mid)
    return best


@torch.no_grad()
def decode_tokens_per_s(model, inputs, steps, keep_p, device):
    """Greedy decode of `steps` tokens after a prefill (dense cache, or sparse with the pruned cache): tokens/s."""
    if keep_p is None:
        logits, cache = dense_prefill(model, inputs)
        past = cache_kwarg(model, cache)  # looked up once, outside the timed loop
        def step(tok, t):
            return model(input_ids=tok[:, None], **past, use_cache=True).logits[:, -1]
    else:
        logits, state, next_pos = prefill(model, inputs, keep_p)
        state.mode = "decode"
        past = cache_kwarg(model, state.cache)  # looked up once, outside the timed loop

        def step(tok, t):
            return model(input_ids=tok[:, None], position_ids=continuation_positions(next_pos, 1, t),
                         **past, use_cache=True, **sparse_kwargs(state)).logits[:, -1]
    sync(device)
    start = time.perf_counter()
    for t in range(steps):
        logits = step(logits.argmax(-1), t)  # (B, V)
    sync(device)
    return inputs["input_ids"].shape[0] * steps / (time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------- benchmarks
def chosen_keep_p(model, length, args, device, chosen: dict) -> float:
    """keep_p for context length ℓ: --keep-p, or the bisection to --tau on a batch-1 prompt (cached in `chosen`)."""
    if length not in chosen:
        inputs = text_inputs(length, 1, model.config.text_config.vocab_size, device)
        chosen[length] = args.keep_p if args.keep_p is not None else \
            keep_p_for_tau(make_sparse(model), inputs, args.tau, args.bisect_iters)[0]
    return chosen[length]


def prefill_rows(model, args, device, chosen):
    """Per length: τ forcing, dense vs sparse prefill time (batch 1), KV bytes."""
    how = "fixed" if args.keep_p is not None else f"bisection to τ≈{args.tau}"
    print("\n## LM prefill, batch 1 (text tokens; dense = SDPA + full cache, sparse = rollout.prefill + pruned cache)")
    print("| ℓ | keep_p (how) | τ | dense s | sparse s | prefill speed-up | dense KV MB | sparse KV MB | KV ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        keep_p = chosen_keep_p(model, length, args, device, chosen)
        inputs = text_inputs(length, 1, model.config.text_config.vocab_size, device)
        t_dense, (_, cache) = timed(lambda: dense_prefill(use_dense(model), inputs), device, args.repeats)
        dense_kv = cache_bytes(cache)
        del cache
        t_sparse, (_, state, _) = timed(lambda: prefill(make_sparse(model), inputs, keep_p), device, args.repeats)
        sparse_kv, tau = float(state.cache.kv_bytes().sum()), float(state.token_ratio().mean())
        print(f"| {length} | {keep_p:.4f} ({how}) | {tau:.3f} | {t_dense:.3f} | {t_sparse:.3f} | "
              f"{t_dense / t_sparse:.2f}x | {dense_kv / 1e6:.1f} | {sparse_kv / 1e6:.1f} | "
              f"{dense_kv / sparse_kv:.2f}x |", flush=True)
        del state


def decode_rows(model, args, device, chosen):
    print(f"\n## Decode, {args.decode_steps} greedy tokens after the prefill (dense full cache vs sparse pruned cache)")
    print("| ℓ | batch | keep_p | dense tok/s | sparse tok/s | decode speed-up |")
    print("|---|---|---|---|---|---|")
    for length in args.decode_lengths:
        keep_p = chosen_keep_p(model, length, args, device, chosen)
        for batch in args.decode_batches:
            inputs = text_inputs(length, batch, model.config.text_config.vocab_size, device)
            dense = decode_tokens_per_s(use_dense(model), inputs, args.decode_steps, None, device)
            sparse = decode_tokens_per_s(make_sparse(model), inputs, args.decode_steps, keep_p, device)
            print(f"| {length} | {batch} | {keep_p:.4f} | {dense:.1f} | {sparse:.1f} | {sparse / dense:.2f}x |",
                  flush=True)


def write_step_sources(root: Path, size: str, device, frames: int, frame_size: int) -> tuple[Path, Path]:
    """A model folder train.py loads (random weights saved in bf16, the toy tokenizer, Qwen's default video sizes)
    and a one-row Video-R1 JSONL whose video is `frames` random frame_size² frames (.npy)."""
    from zipr1_support import media
    import toy
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tokenizer = toy.build_tokenizer()
    names = dict(bos_token_id="<|endoftext|>", eos_token_id="<|im_end|>", vision_start_token_id="<|vision_start|>",
                 vision_end_token_id="<|vision_end|>", image_token_id="<|image_pad|>", video_token_id="<|video_pad|>")
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(qwen25_vl_config(size, ids), device, dtype)
    model.save_pretrained(root / "model")
    del model
    processor = media.FallbackProcessor(tokenizer, Qwen2VLImageProcessorPil(), media.VIDEO_DEFAULTS)
    processor.save_pretrained(root / "model")
    (root / "data").mkdir()
    video = np.random.default_rng(0).integers(0, 256, (frames, frame_size, frame_size, 3), dtype=np.uint8)
    np.save(root / "data" / "video.npy", video)  # (T, H, W, 3)
    row = {"problem": "What happens in the video?", "options": ["A. a square moves", "B. nothing"],
           "solution": "<answer>A</answer>", "problem_type": "multiple choice", "data_type": "video",
           "path": "video.npy"}
    (root / "data" / "rows.jsonl").write_text(json.dumps(row) + "\n")
    return root / "model", root / "data" / "rows.jsonl"


def zipr1_step_rows(args, device, size):
    """Two train.train_step calls (the second is reported: kernels compiled, AdamW state allocated) with
    train.py's own loading: fp32 policy + bf16 autocast, bf16 reference, gradient checkpointing, N answers."""
    from zipr1_support import data
    from zipr1_support import media
    import train
    print(f"\n## One ZipR1 step (train.train_step): N={args.step_n}, {args.step_new_tokens} new tokens, "
          f"video {args.step_frames}x{args.step_frame_size}², paper keep_p grid, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, gradient checkpointing")
    print("| step | prompt tokens | completion tokens | τ | rollout + update s | peak GB | held before the step GB |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, jsonl = write_step_sources(Path(tmp), size, device, args.step_frames, args.step_frame_size)
        cfg = train.check_config(train.Config(
            model=str(model_dir), dataset=str(jsonl), num_generations=args.step_n, per_step_questions=1,
            max_completion_length=args.step_new_tokens, max_frames=args.step_frames, gradient_checkpointing=True,
            min_frames=2, video_min_pixels=args.step_frame_size ** 2, video_max_pixels=args.step_frame_size ** 2,
            output_dir=str(Path(tmp) / "out"), disable_tqdm=True))  # frames kept at the size and count asked for
        processor, rows = media.load_processor(model_dir), data.load_dataset_rows(str(jsonl)).rows
        item = data.prompt_item(rows[0], sizes=train.input_sizes(cfg))
        prompt = media.encode_prompts(processor, [item])["input_ids"].shape[1]
        policy = train.load_policy(model_dir, cfg, device)
        reference = train.load_reference(model_dir, cfg, device)
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
        autocast = torch.autocast(device.type, torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
        for step in range(2):
            held = torch.cuda.memory_allocated(device) / GB if device.type == "cuda" else float("nan")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            try:
                m = train.train_step(policy, reference, processor, optimizer, rows[:1], cfg, step, device, autocast)
            except torch.cuda.OutOfMemoryError:
                peak = torch.cuda.max_memory_allocated(device) / GB
                print(f"| {step + 1} | {prompt} | out of memory | | | {peak:.1f} | {held:.1f} |", flush=True)
                return
            sync(device)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else float("nan")
            print(f"| {step + 1} | {prompt} | {m['completion_length']:.0f} x {args.step_n} | {m['tau']:.3f} | "
                  f"{seconds:.2f} | {peak:.1f} | {held:.1f} |", flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--lengths", type=ints, default=[8192, 16384, 32768], help="prefill lengths ℓ")
    ap.add_argument("--tau", type=float, default=0.25, help="target token ratio, reached by bisection on keep_p")
    ap.add_argument("--keep-p", type=float, default=None, help="fix keep_p instead of the τ bisection")
    ap.add_argument("--bisect-iters", type=int, default=10)
    ap.add_argument("--decode-lengths", type=ints, default=None, help="context lengths for decode (default --lengths)")
    ap.add_argument("--decode-batches", type=ints, default=[1, 8])
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step-n", type=int, default=8, help="answers per question in the ZipR1 step")
    ap.add_argument("--step-new-tokens", type=int, default=256)
    ap.add_argument("--step-frames", type=int, default=16)
    ap.add_argument("--step-frame-size", type=int, default=336, help="pixels; 336² -> 144 tokens per 2 frames")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: prefill,decode,step,memory")
    ap.add_argument("--smoke", action="store_true", help="tiny model and lengths on the CPU")
    args = ap.parse_args(argv)
    if args.smoke:
        args.lengths, args.decode_batches, args.decode_steps, args.repeats = [256, 512], [1, 2], 4, 1
        args.bisect_iters = 4
        args.step_n, args.step_new_tokens, args.step_frames, args.step_frame_size = 4, 4, 4, 56
    args.decode_lengths = args.decode_lengths or args.lengths
    args.skip = set(filter(None, args.skip.split(",")))
    return args


def main(argv=None):
    args = parse_args(argv)
    check_transformers()  # one line and exit where transformers lacks a feature we rely on
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    size = "smoke" if args.smoke else "3b"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# bench_3b: {name}, torch {torch.__version__}, {dtype}, model {size} (random weights)")
    print(f"# command: python benchmarks/bench_3b.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# {ANCHORS}")
    if "memory" not in args.skip:
        print_memory_estimates()
    model = build_model(qwen25_vl_config(size), device, dtype)
    chosen = {}  # ℓ -> keep_p
    if "prefill" not in args.skip:
        prefill_rows(model, args, device, chosen)
    if "decode" not in args.skip:
        decode_rows(model, args, device, chosen)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "step" not in args.skip:
        zipr1_step_rows(args, device, size)


if __name__ == "__main__":
    main()
