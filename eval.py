"""Accuracy against token ratio for Full / ZipVL / ZipR1, with KV memory, speed and pictures of what is kept.

    python eval.py                     # toy model + 40 toy questions, offline, CPU
    python eval.py --model Qwen/Qwen2.5-VL-3B-Instruct --zipr1 outputs/zipr1/checkpoint-1000 \
                   --dataset data/eval.jsonl --keep_p 0.975 --sweep 0.9,0.95,0.975,1

Methods, on the same encoded questions: Full = the base model with stock "sdpa" attention (τ = 1); ZipVL = the same
weights with Top-p sparse attention at keep_p (Eq. 1-3) and a pruned KV cache; ZipR1 = the RL-trained checkpoint
(--zipr1, else the newest train.py wrote) with the same sparse attention. Per method: accuracy (rewards.py, greedy
answers), τ = mean_j k_j / ℓ (§2.1), KV bytes per question after prefill (Σ_j k_j·2·Hkv·d·bytes, k_j = ℓ for Full,
read from the caches), prefill ms per batch and decode tokens/s (medians over batches), also as ratios to Full.
Timing is HF-`generate`-free and one loop for all methods, rollout.generate's (timed=True): a prefill forward over
the batch, timed alone, then greedy one-token forwards against the cache, timed alone; ZipVL and ZipR1 decode from
the pruned cache, Full (keep_p=None, dense mode) from a DynamicCache; one untimed warm-up batch first.
Writes to --out: results.json, results.md (the table), pareto.png (accuracy vs τ over --sweep, one line per model,
Full as a star), kept_tokens_<method>_<image|video>.png (the visual tokens each layer keeps, for one question);
both drawn by pictures.py.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.hf_argparser import HfArg

from zipr1_support import cli
from zipr1_support import data
from zipr1_support import media
import rewards
from zipr1_support import run_dir  # checkpoint-<step> folders of a training run, train.py's default folder
import toy  # the offline default: toy model, questions, train.py's toy run folder
from zipr1_support.media_files import (FPS, FPS_MAX_FRAMES, FPS_MIN_FRAMES, MAX_PIXELS, MIN_PIXELS,
                                       VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, input_sizes)
from zipr1_support.pictures import kept_token_picture, pareto_plot
from rollout import SamplingConfig, generate
from sparse_attention import check_keep_p
from sparse_qwen import check_transformers, make_sparse

DEFAULT_SWEEP = "0.8,0.9,0.95,0.975,1.0"
TOY_QUESTIONS = 40
NOT_TRAINED = "not trained yet — run `python train.py`"


# ------------------------------------------------------------------------------------------------ loading
def set_attention(model, sparse: bool):
    """Text decoder on Top-p sparse attention, or back on stock "sdpa" (same weights; the vision tower: sdpa)."""
    if sparse:
        return make_sparse(model)
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    return model


def load_model(path, device, dtype, sparse: bool):
    model = AutoModelForImageTextToText.from_pretrained(media.resolve_model_dir(str(path)), dtype=dtype)
    return set_attention(model, sparse).to(device).eval()


def zipr1_checkpoint(args):
    """--zipr1 (must hold a saved model), else the newest checkpoint-<step> of train.py's default run, else None."""
    if args.zipr1 is None:
        root = toy.TOY_PRESET["output_dir"] if args.model == "toy" else run_dir.DEFAULT_OUTPUT_DIR
        found = run_dir.checkpoints(Path(root))
        return found[-1] if found else None
    path = media.resolve_model_dir(args.zipr1)  # ModelNotAvailable (an OSError) when it is not there
    if not (path / "config.json").is_file():
        raise ValueError(f"ZipR1 checkpoint {path} holds no config.json: pass a folder written by save_pretrained")
    return path


ARCHITECTURE_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "vocab_size")


def text_architecture(path) -> dict:
    """model_type and the text decoder's sizes: what a checkpoint must share with the base it was trained from."""
    config = AutoConfig.from_pretrained(path)
    text = config.get_text_config()
    return {"model_type": config.model_type, **{k: getattr(text, k, None) for k in ARCHITECTURE_KEYS}}


def matching_checkpoint(zipr1, base, explicit: bool):
    """(checkpoint, table status): a checkpoint whose model type or text decoder (layers, heads, kv heads, hidden
    size, vocabulary) differs from the base is an error when given with --zipr1, and reported in the table when found
    in train.py's default folder (e.g. trained on an older toy)."""
    if zipr1 is None:
        return None, NOT_TRAINED
    ours, theirs = text_architecture(zipr1), text_architecture(base)
    differs = [f"{k} {ours[k]} vs {theirs[k]}" for k in ours if ours[k] != theirs[k]]
    if not differs:
        return zipr1, ""
    if explicit:
        raise ValueError(f"ZipR1 checkpoint {zipr1} was not trained from {base} ({', '.join(differs)}): pass its "
                         f"base with --model")
    return None, f"{zipr1} was trained from another base model — rerun `python train.py`"


def load_questions(args, out: Path):
    """Validated rows (data.py) in batches; the toy default first writes its questions (unseen in training)."""
    source = args.dataset
    if source == "toy":
        n = args.limit or TOY_QUESTIONS
        source = str(toy.write_toy_dataset(out / "toy_questions", n, seed=777_777 + args.seed))
    if Path(source).is_file() and not any(line.strip() for line in open(source)):
        raise ValueError(f"dataset {source} is empty")
    table = data.load_dataset_rows(source, media_root=args.media_root,
                                   on_bad_row="skip" if args.skip_bad_rows else "error",
                                   accuracy=accuracy_of(args))
    if table.skipped:
        print(f"data: {table.summary()}", file=sys.stderr)
    rows = table.rows[:args.limit]
    return rows, [rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)]


def eval_sizes(args) -> media.InputSizes:
    """The input sizes of the settings; --model toy keeps its processor's pixel limits (toy.TOY_INPUT_SIZES)."""
    sizes = input_sizes(args)
    if args.model != "toy":
        return sizes
    pixels = ("min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels")
    return dataclasses.replace(sizes, **{k: toy.TOY_INPUT_SIZES[k] for k in pixels})


def encode_batches(processor, rows, args):
    """(rows, batches, encoded batches): each row's media read now; with --skip_bad_rows a row whose media fails here
    (past the load-time check, e.g. a truncated JPEG) is dropped with one line, else it is the error."""
    items, kept = [], []
    for row in rows:
        try:
            items.append(data.prompt_item(row, template=prompt_template_of(args), sizes=eval_sizes(args)))
            kept.append(row)
        except data.DatasetError as err:
            if not args.skip_bad_rows:
                raise
            print(f"skipped {err}", file=sys.stderr)
    if not kept:
        raise ValueError(f"no readable questions left ({len(rows)} skipped)")
    size = args.batch_size
    batches = [kept[i:i + size] for i in range(0, len(kept), size)]
    encoded = [media.encode_prompts(processor, items[i:i + size]).to(args.device) for i in range(0, len(kept), size)]
    return kept, batches, encoded


# ------------------------------------------------------------------------------------------------ generation
def greedy(model, inputs, keep_p, max_new_tokens: int, seed: int = 0):
    """rollout.generate's greedy answers, timed, on the model's stock attention (keep_p None: Full) or sparse."""
    return generate(set_attention(model, keep_p is not None), inputs, keep_p,
                    SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False), seed=seed, timed=True)


def evaluate_methods(methods: dict, processor, batches, encoded, max_new_tokens, seed=0, warmup=True,
                     accuracy="binary") -> dict:
    """Greedy answers to every question under each method {name: (model, keep_p or None = dense)}, scored and timed.

    Round robin: each batch runs under every method in turn, so a slow spell of a shared machine hits all alike.
    """
    records, timings = {name: [] for name in methods}, {name: [] for name in methods}
    for name, (model, keep_p) in methods.items() if warmup else ():
        greedy(model, encoded[0], keep_p, 2, seed)
    for rows, inputs in zip(batches, encoded):
        for name, (model, keep_p) in methods.items():
            out = greedy(model, inputs, keep_p, max_new_tokens, seed)
            texts = processor.batch_decode(out.completion_ids, skip_special_tokens=True)
            records[name] += score(rows, texts, out.token_ratio.tolist(), out.kv_bytes.tolist(), accuracy)
            timings[name].append(dataclasses.asdict(out.timing))
    return {name: summarize(records[name], timings[name], keep_p) for name, (_, keep_p) in methods.items()}


# ------------------------------------------------------------------------------------------------ metrics
def score(rows, texts, tau, kv_bytes, accuracy="binary") -> list[dict]:
    """One record per question: its answer, r_acc (rewards.py, per problem_type; `accuracy` "binary" or "graded",
    train.py's reward function), τ and KV bytes."""
    acc = rewards.accuracy_rewards(texts, [r["solution"] for r in rows], [r["problem_type"] for r in rows], accuracy)
    return [dict(row=r["row"], completion=t, correct=float(a), tau=float(ta), kv_bytes=int(kv))
            for r, t, a, ta, kv in zip(rows, texts, acc, tau, kv_bytes)]


def rate(timing: dict) -> float:
    """Decode tokens per second of one batch (0 when it decoded nothing)."""
    return timing["decode_tokens"] / timing["decode_s"] if timing["decode_tokens"] else 0.0


def summarize(records, timings: list[dict], keep_p) -> dict:
    """accuracy, mean τ, mean KV bytes per question; median over batches of the prefill ms and the decode tokens/s
    (medians: a batch slowed by another process on a shared machine does not move them)."""
    mean = lambda key: sum(r[key] for r in records) / len(records)  # noqa: E731
    rates = [rate(t) for t in timings if t["decode_tokens"]]
    return dict(keep_p=keep_p, accuracy=mean("correct"), token_ratio=mean("tau"), kv_bytes=mean("kv_bytes"),
                prefill_ms=1000 * statistics.median(t["prefill_s"] for t in timings),
                decode_tokens_per_s=statistics.median(rates) if rates else float("nan"),
                questions=len(records), records=records, timings=timings)


def add_ratios(methods: dict) -> dict:
    """KV bytes / Full's; prefill speed-up = median over batches of Full's latency / latency; decode speed-up =
    median over batches of tokens/s / Full's tokens/s (the batches ran back to back, see evaluate_methods)."""
    full = methods["Full"]
    for m in methods.values():
        if "accuracy" in m:
            pairs = list(zip(full["timings"], m["timings"]))
            m.update(kv_vs_full=m["kv_bytes"] / full["kv_bytes"],
                     prefill_speedup=statistics.median(f["prefill_s"] / t["prefill_s"] for f, t in pairs),
                     decode_speedup=statistics.median([rate(t) / rate(f) for f, t in pairs if rate(f) and rate(t)]
                                                      or [float("nan")]))
    return methods


def markdown_table(methods: dict, batch_size: int) -> str:
    head = (f"| Method | keep_p | Accuracy | τ | KV cache / question | KV vs Full | Prefill ms / batch of {batch_size} "
            "| Prefill speed-up | Decode tok/s | Decode speed-up |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, m in methods.items():
        lines.append(f"| {name} | {m['status']} |" + " |" * 8 if "accuracy" not in m else
                     f"| {name} | {m['keep_p'] or '—'} | {m['accuracy']:.3f} | {m['token_ratio']:.3f} | "
                     f"{m['kv_bytes'] / 2**10:,.1f} KiB | {m['kv_vs_full']:.3f} | {m['prefill_ms']:.1f} | "
                     f"{m['prefill_speedup']:.2f}× | {m['decode_tokens_per_s']:.1f} | {m['decode_speedup']:.2f}× |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ command line
@dataclass
class EvalConfig:
    """Every setting of an evaluation; one flag per field (`python eval.py --help`), in train.py's style."""

    model: str = HfArg(default="toy", help="base model folder or hub id; 'toy': the offline tiny model")
    zipr1: str | None = HfArg(default=None, help="ZipR1 checkpoint folder (default: the newest train.py wrote)")
    dataset: str = HfArg(default="toy", help="Video-R1-style .json/.jsonl/folder/cached hub id; 'toy': 40 rendered "
                                              "questions unseen in training")
    media_root: str | None = HfArg(default=None, help="folder the rows' 'path' is relative to (default: the "
                                                      "dataset's folder)")
    skip_bad_rows: bool = HfArg(default=False, help="drop and count bad rows")
    keep_p: float = HfArg(default=0.975, help="Top-p threshold of ZipVL and ZipR1, in (0, 1]")
    sweep: str = HfArg(default=DEFAULT_SWEEP, help="comma-separated keep_p values for pareto.png ('' = none)")
    limit: int | None = HfArg(default=None, help="evaluate the first N questions only")
    batch_size: int = HfArg(default=8, help="questions per forward")
    max_completion_length: int | None = HfArg(default=None, help="new tokens per answer (default: 8 for the toy "
                                                                 "model, else Video-R1's 768)")
    prompt_template: Literal["video_r1", "answer_only"] | None = HfArg(
        default=None, help="the question's prompt, as train.py's (default: answer_only for the toy model, else "
                           "video_r1)")
    accuracy_reward: Literal["graded", "binary"] | None = HfArg(
        default=None, help="how answers are scored, as train.py's reward (default: binary for the toy model, else "
                           "graded)")
    # input sizes: as train.py's (media_files.InputSizes, Video-R1's defaults); --model toy keeps the toy's pixels
    min_pixels: int = HfArg(default=MIN_PIXELS, help="fewest pixels per image (4*28*28)")
    max_pixels: int = HfArg(default=MAX_PIXELS, help="most pixels per image (256*28*28)")
    video_min_pixels: int = HfArg(default=VIDEO_MIN_PIXELS, help="fewest pixels per video frame (128*28*28)")
    video_max_pixels: int = HfArg(default=VIDEO_MAX_PIXELS, help="most pixels per video frame (128*28*28)")
    fps: float = HfArg(default=FPS, help="video frames kept per second of video")
    min_frames: int = HfArg(default=FPS_MIN_FRAMES, help="fewest frames kept per video (rounded up to even)")
    max_frames: int = HfArg(default=FPS_MAX_FRAMES, help="most frames kept per video (rounded down to even)")
    device: str = HfArg(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    dtype: Literal["bfloat16", "float16", "float32"] | None = HfArg(default=None, help="default: bf16 on GPU, fp32 "
                                                                                        "on CPU")
    seed: int = HfArg(default=0, help="seed of the random probe queries and the toy questions")
    out: str = HfArg(default="outputs/eval", help="folder for results.json/.md and the pictures")


def parse_args(argv=None) -> EvalConfig:
    """The command line (HfArgumentParser over EvalConfig, see cli.py); --max_new_tokens is the old name."""
    return cli.parse(EvalConfig, argv, renamed={"max_new_tokens": "max_completion_length"},
                     description="Accuracy, token ratio, KV memory and speed of Full / ZipVL / ZipR1.")


def prompt_template_of(args) -> str:
    """--prompt_template, by default the toy's short prompt for the toy model and Video-R1's for any other."""
    return args.prompt_template or ("answer_only" if args.model == "toy" else "video_r1")


def accuracy_of(args) -> str:
    """--accuracy_reward, by default binary for the toy model (its training reward) and graded for any other."""
    return args.accuracy_reward or ("binary" if args.model == "toy" else "graded")


def check_args(args) -> list[float]:
    """The cheap checks, before anything is loaded: thresholds in (0, 1], sizes; returns the sweep values."""
    sweep = [float(v) for v in args.sweep.split(",") if v.strip()]
    check_keep_p([args.keep_p, *sweep], 1 + len(sweep))  # ValueError naming the values unless all lie in (0, 1]
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1) or (args.max_completion_length or 2) < 2:
        raise ValueError("--batch_size and --limit must be >= 1, --max_completion_length >= 2")
    input_sizes(args)  # ValueError naming the first size setting outside its range
    return sweep


def compare(args, base, zipr1, zipr1_status, batches, processor, encoded, sweep):
    """Every method's metrics at --keep_p, the sparse models, and their (keep_p, accuracy, τ) sweep curves."""
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    max_new = args.max_completion_length or (8 if args.model == "toy" else 768)
    models = {"ZipVL": load_model(base, args.device, dtype, sparse=True)}  # Full: the same model, stock attention
    if zipr1 is not None:
        models["ZipR1"] = load_model(zipr1, args.device, dtype, sparse=True)
    at = lambda p: {name: (model, p) for name, model in models.items()}  # noqa: E731
    methods = evaluate_methods({"Full": (models["ZipVL"], None), **at(args.keep_p)}, processor, batches, encoded,
                               max_new, args.seed, accuracy=accuracy_of(args))
    methods.setdefault("ZipR1", {"status": zipr1_status})
    points = {p: methods if p == args.keep_p else evaluate_methods(at(p), processor, batches, encoded, max_new,
                                                                   args.seed, False, accuracy_of(args)) for p in sweep}
    curves = {name: [points[p][name] for p in sweep] for name in models}
    return add_ratios(methods), models, curves


def run(args) -> dict:
    sweep, zipr1 = check_args(args), zipr1_checkpoint(args)
    args = dataclasses.replace(args, prompt_template=prompt_template_of(args), accuracy_reward=accuracy_of(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, batches = load_questions(args, out)
    if args.model == "toy":
        base = toy.ensure_toy_model(toy.TOY_CACHE / "toy-model")
    else:
        base = media.resolve_model_dir(args.model)
    processor = media.load_processor(base)
    rows, batches, encoded = encode_batches(processor, rows, args)
    zipr1, status = matching_checkpoint(zipr1, base, explicit=args.zipr1 is not None)
    methods, models, curves = compare(args, base, zipr1, status, batches, processor, encoded, sweep)
    files = {"table": out / "results.md", "json": out / "results.json"}
    if sweep:
        files["pareto"] = out / "pareto.png"
        pareto_plot(curves, methods["Full"], files["pareto"])
    for kind in ("image", "video"):  # the first image question and the first video question
        row = next((r for r in rows if r["data_type"] == kind), None)
        for name, model in models.items() if row else ():
            files[f"kept_{name}_{kind}"] = out / f"kept_tokens_{name}_{kind}.png"
            kept_token_picture(model, processor, row, args.keep_p, files[f"kept_{name}_{kind}"],
                               f"{name}, question {row['row']}", template=prompt_template_of(args),
                               sizes=eval_sizes(args))
    table = markdown_table(methods, args.batch_size)
    results = dict(config=dict(vars(args), base=str(base), zipr1=str(zipr1) if zipr1 else None, questions=len(rows)),
                   methods=methods, files={k: str(v) for k, v in files.items()},
                   sweep={name: [{k: p[k] for k in ("keep_p", "accuracy", "token_ratio", "kv_bytes")} for p in ps]
                          for name, ps in curves.items()})
    files["table"].write_text(table)
    files["json"].write_text(json.dumps(results, indent=1))
    print(table + "\n" + "\n".join(f"wrote {f}" for f in files.values()))
    return results


def main(argv=None) -> dict:
    try:
        args = parse_args(argv)
        check_transformers()  # one line and exit where transformers lacks a feature we rely on
        return run(args)
    except (ValueError, OSError) as err:  # bad threshold, missing model/checkpoint/dataset, bad row: one line
        raise SystemExit(f"eval.py: error: {err}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
