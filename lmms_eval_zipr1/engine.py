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
`token_ratios` records τ of every answered request.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from zipr1_support import media
from rollout import SamplingConfig, full_sequence, generate
from sparse_attention import check_keep_p
from sparse_qwen import make_sparse, make_state, sparse_kwargs

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".npy")


def split_visuals(visuals, max_frames: int):
    """(images, videos, fps) from doc_to_visual's output: PIL images, image paths, video paths or frame folders."""
    images, videos, fps = [], [], []
    for v in [] if visuals is None else visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        if isinstance(v, Image.Image):
            images.append(v.convert("RGB"))
        elif isinstance(v, (str, Path)) and (Path(v).is_dir() or str(v).lower().endswith(VIDEO_SUFFIXES)):
            frames, rate = media.load_video(v, max_frames=max_frames)
            videos.append(frames)
            fps.append(rate)
        elif isinstance(v, (str, Path)):
            images.append(media.load_image(v))
        else:
            raise ValueError(f"zipr1: unsupported visual of type {type(v).__name__}; expected a PIL image or a path")
    return images, videos, fps


def request_item(context: str, visuals, max_frames: int = 16) -> dict:
    """media.chat_item of a request: its media first, then the context without "<image>" placeholders."""
    return media.chat_item(context.replace("<image>", ""), *split_visuals(visuals, max_frames))


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

    def __init__(self, pretrained: str, keep_p: float = 0.975, batch_size: int = 1, max_new_tokens: int = 1024,
                 max_frames: int = 16, device: str | None = None, dtype: str | None = None, seed: int = 0):
        self.keep_p = float(check_keep_p(float(keep_p), 1)[0])
        self.batch_size, self.max_new_tokens, self.max_frames = int(batch_size), int(max_new_tokens), int(max_frames)
        self.seed, self.device = int(seed), device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, dtype or ("bfloat16" if self.device != "cpu" else "float32"))
        self.processor = media.load_processor(pretrained)
        model = AutoModelForImageTextToText.from_pretrained(media.resolve_model_dir(pretrained), dtype=dtype)
        self.model = make_sparse(model).to(self.device).eval()
        self.token_ratios: list[float] = []

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
        items = [request_item(context, to_visual(task_dict[task][split][doc_id]), self.max_frames)
                 for context, _, to_visual, doc_id, task, split in args]
        rollout = generate(self.model, self._encode(items), self.keep_p,
                           sampling_config(gen_kwargs, self.max_new_tokens), seed=self.seed)
        self.token_ratios += rollout.token_ratio.tolist()
        texts = self.processor.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        return [cut_at_stops(t, stop_strings(gen_kwargs)) for t in texts]

    @torch.no_grad()
    def loglikelihood(self, requests, task_dict) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding would produce it), teacher-forced under the same
        sparse selection as generation: the prompt is selected at keep_p, continuation tokens are all kept."""
        results = []
        for context, to_target, to_visual, doc_id, task, split in (r.args for r in requests):
            doc = task_dict[task][split][doc_id]
            target = to_target(doc) if callable(to_target) else to_target
            inputs = self._encode([request_item(context, to_visual(doc), self.max_frames)])
            ids = self.processor.tokenizer(target, add_special_tokens=False, return_tensors="pt")["input_ids"]
            batch = full_sequence(self.model, SimpleNamespace(inputs=inputs, completion_ids=ids.to(self.device)))
            state = make_state(self.model, self.keep_p, mode="teacher", batch_size=1,
                               prompt_len=inputs["input_ids"].shape[1], seed=self.seed)
            logits = self.model(**batch, logits_to_keep=ids.shape[1] + 1,
                                **sparse_kwargs(state)).logits[0, :-1].float()  # (T, V)
            target_ids = ids[0].to(logits.device)  # (T,)
            logp = torch.log_softmax(logits, -1).gather(-1, target_ids[:, None]).sum()
            results.append((float(logp), bool((logits.argmax(-1) == target_ids).all())))
        return results
