"""Answer lmms-eval requests with a Top-p sparse Qwen2(.5)-VL — no lmms-eval import here, so it is testable offline.

A request is anything with `.args` (lmms-eval's Instance):
  generate_until  (context, gen_kwargs, doc_to_visual, doc_id, task, split)
  loglikelihood   (context, doc_to_target, doc_to_visual, doc_id, task, split)
and its document is task_dict[task][split][doc_id]. doc_to_visual(doc) gives a list of PIL images and/or media
paths (videos: .mp4/.avi/.mov/.mkv/.webm/.npy or a folder of frames; other paths: images).

Prompts follow lmms-eval's own Qwen2.5-VL model: media first, then the context with "<image>" placeholders removed,
in the model's chat template. Generation: greedy unless gen_kwargs["temperature"] > 0, max_new_tokens from
gen_kwargs, the answer cut at the first `until` string ("\\n\\n" ignored, as lmms-eval's Qwen2.5-VL does).
Each batch is prefilled with sparse attention at keep_p and decoded against the pruned cache (rollout.generate);
with a stock attn_implementation ("sdpa", "eager", ...) it runs dense (Full, τ = 1). `stats` records τ and the KV
bytes after prefill of every answered request, per task; `write_stats` writes their means as JSON.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from zipr1_support import media
from zipr1_support.run_dir import write_text_atomically
from rollout import SamplingConfig, full_sequence, generate
from sparse_attention import check_keep_p
from sparse_qwen import make_sparse, make_state, sparse_kwargs

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".npy")
SIZE_DEFAULTS = dataclasses.asdict(media.InputSizes())  # model_args min_pixels, ..., max_frames: Video-R1's values


def split_visuals(visuals, sizes: media.InputSizes):
    """(images, videos, fps) from doc_to_visual's output: PIL images, image paths, video paths or frame folders;
    video frames kept by Video-R1's rule at `sizes`."""
    images, videos, fps = [], [], []
    for v in [] if visuals is None else visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        if isinstance(v, Image.Image):
            images.append(v.convert("RGB"))
        elif isinstance(v, (str, Path)) and (Path(v).is_dir() or str(v).lower().endswith(VIDEO_SUFFIXES)):
            frames, rate = media.load_video(v, sizes=sizes)
            videos.append(frames)
            fps.append(rate)
        elif isinstance(v, (str, Path)):
            images.append(media.load_image(v))
        else:
            raise ValueError(f"zipr1: unsupported visual of type {type(v).__name__}; expected a PIL image or a path")
    return images, videos, fps


def request_item(context: str, visuals, sizes: media.InputSizes = media.InputSizes()) -> dict:
    """media.chat_item of a request: its media first, then the context without "<image>" placeholders."""
    return media.chat_item(context.replace("<image>", ""), *split_visuals(visuals, sizes), sizes=sizes)


def sampling_config(gen_kwargs: dict, default_max_new_tokens: int) -> SamplingConfig:
    """lmms-eval gen_kwargs -> SamplingConfig: temperature 0 (the default) is greedy."""
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    return SamplingConfig(max_new_tokens=int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
                          do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                          top_p=float(gen_kwargs.get("top_p") or 1.0))


def stop_strings(gen_kwargs: dict) -> list[str]:
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise ValueError(f"zipr1: gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
    return [u for u in until if u and u != "\n\n"]


def cut_at_stops(text: str, stops: list[str]) -> str:
    for stop in stops:
        text = text.split(stop)[0]
    return text


class SparseQwen:
    """A Qwen2(.5)-VL with Top-p sparse attention (keep_p = 1: dense) answering lmms-eval requests in batches."""

    def __init__(self, pretrained: str, keep_p: float | None = 0.975, batch_size: int = 1, max_new_tokens: int = 1024,
                 device: str | None = None, dtype: str | None = None, seed: int = 0,
                 attn_implementation: str = "zipr1",
                 min_pixels: int = media.InputSizes.min_pixels, max_pixels: int = media.InputSizes.max_pixels,
                 video_min_pixels: int = media.InputSizes.video_min_pixels,
                 video_max_pixels: int = media.InputSizes.video_max_pixels, fps: float = media.InputSizes.fps,
                 min_frames: int = media.InputSizes.min_frames, max_frames: int = media.InputSizes.max_frames):
        self.sparse = attn_implementation == "zipr1"
        if not self.sparse and keep_p is not None:
            raise ValueError(f"zipr1: keep_p={keep_p} needs attn_implementation=zipr1; attn_implementation="
                             f"{attn_implementation} is Full attention (drop keep_p)")
        self.attn_implementation = attn_implementation
        self.keep_p = float(0.975 if keep_p is None else keep_p) if self.sparse else None
        if self.sparse:
            check_keep_p(self.keep_p, 1)  # (0, 1], else one ValueError
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        # input sizes (model_args, as train.py / eval.py flags; Video-R1's defaults): ValueError naming a bad one
        self.sizes = media.InputSizes(int(min_pixels), int(max_pixels), int(video_min_pixels), int(video_max_pixels),
                                      float(fps), int(min_frames), int(max_frames))
        self.seed, self.device = int(seed), device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, dtype or ("bfloat16" if self.device != "cpu" else "float32"))
        self.processor = media.load_processor(pretrained)
        model = AutoModelForImageTextToText.from_pretrained(media.resolve_model_dir(pretrained), dtype=dtype,
                                                            **({} if self.sparse else
                                                               {"attn_implementation": attn_implementation}))
        self.model = (make_sparse(model) if self.sparse else model).to(self.device).eval()
        self.stats = defaultdict(lambda: {"token_ratio": [], "kv_bytes": []})  # task -> per-request lists

    def record(self, task: str, token_ratio: float, kv_bytes: float | None = None) -> None:
        self.stats[task]["token_ratio"].append(float(token_ratio))
        if kv_bytes is not None:
            self.stats[task]["kv_bytes"].append(float(kv_bytes))

    def stats_summary(self) -> dict:
        """task -> requests, mean τ, mean KV bytes after prefill (None where no request decoded, e.g. loglikelihood)."""
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return {task: {"requests": len(s["token_ratio"]), "token_ratio": mean(s["token_ratio"]),
                       "kv_bytes": mean(s["kv_bytes"]), "keep_p": self.keep_p,
                       "attn_implementation": self.attn_implementation} for task, s in sorted(self.stats.items())}

    def write_stats(self, path: str | os.PathLike) -> None:
        """The stats_summary as JSON at path (atomically replaced; the folder is created)."""
        write_text_atomically(Path(path), json.dumps(self.stats_summary(), indent=1))

    def _encode(self, items, completions=None):
        return media.encode_prompts(self.processor, items, completions).to(self.device)

    def generate_until(self, requests, task_dict) -> list[str]:
        """One answer per request, in request order; consecutive requests with equal gen_kwargs share a batch."""
        answers, start = [], 0
        while start < len(requests):
            key = json.dumps(requests[start].args[1], sort_keys=True, default=str)
            end = start + 1
            while end < len(requests) and end - start < self.batch_size and \
                    json.dumps(requests[end].args[1], sort_keys=True, default=str) == key:
                end += 1
            answers += self._generate_batch([r.args for r in requests[start:end]], task_dict)
            start = end
        return answers

    def _generate_batch(self, args, task_dict) -> list[str]:
        gen_kwargs = dict(args[0][1])
        items = [request_item(context, to_visual(task_dict[task][split][doc_id]), self.sizes)
                 for context, _, to_visual, doc_id, task, split in args]
        rollout = generate(self.model, self._encode(items), self.keep_p,
                           sampling_config(gen_kwargs, self.max_new_tokens), seed=self.seed)
        for (*_, task, _split), tau, kv in zip(args, rollout.token_ratio.tolist(), rollout.kv_bytes.tolist()):
            self.record(task, tau, kv)
        texts = self.processor.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        return [cut_at_stops(t, stop_strings(gen_kwargs)) for t in texts]

    @torch.no_grad()
    def loglikelihood(self, requests, task_dict) -> list[tuple[float, bool]]:
        """(−log P(continuation | context), whether greedy decoding would produce it): a loss, lower is likelier, as
        lmms-eval's own models return (see models/zipr1.py). Teacher-forced under the same sparse selection as
        generation: the prompt is selected at keep_p, continuation tokens are all kept."""
        results = []
        for context, to_target, to_visual, doc_id, task, split in (r.args for r in requests):
            doc = task_dict[task][split][doc_id]
            target = to_target(doc) if callable(to_target) else to_target
            inputs = self._encode([request_item(context, to_visual(doc), self.sizes)])
            ids = self.processor.tokenizer(target, add_special_tokens=False, return_tensors="pt")["input_ids"]
            batch = full_sequence(self.model, SimpleNamespace(inputs=inputs, completion_ids=ids.to(self.device)))
            logits, tau = self._teacher_logits(batch, inputs["input_ids"].shape[1], ids.shape[1])  # (T, V)
            self.record(task, tau)
            target_ids = ids[0].to(logits.device)  # (T,)
            logp = torch.log_softmax(logits, -1).gather(-1, target_ids[:, None]).sum()
            results.append((-float(logp), bool((logits.argmax(-1) == target_ids).all())))
        return results

    def _teacher_logits(self, batch, prompt_len: int, n_target: int):
        """Logits predicting the n_target continuation tokens (T, V) and the prompt's τ (1 under Full attention)."""
        if not self.sparse:
            return self.model(**batch, logits_to_keep=n_target + 1).logits[0, :-1].float(), 1.0
        state = make_state(self.model, self.keep_p, mode="teacher", batch_size=1, prompt_len=prompt_len, seed=self.seed)
        logits = self.model(**batch, logits_to_keep=n_target + 1, **sparse_kwargs(state)).logits[0, :-1].float()  # (T, V)
        return logits, float(state.token_ratio()[0])
