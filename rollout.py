"""Rollouts of the sparse policy: sparse prefill (Eq. 1-3), pruned KV cache, a readable sampling loop.

    inputs = repeat_prompts(policy, processor_batch, n)      # each prompt n times, its media encoded once
    rollout = generate(policy, inputs, keep_p=torch.tensor([0.94, 0.945, ...]), sampling=SamplingConfig(...))
    logp = score_completions(policy, rollout)               # teacher-forced, same sparsity: == rollout.logprobs
    state = scoring_state(policy, rollout, relaxed_temperature=0.01)  # + the relaxed τ̃ per layer, with gradient
    logp = score_completions(policy, rollout, state=state); tau_soft = state.relaxed_token_ratio()   # (B,)
    ref_logp = score_completions(reference, rollout, sparse=False)   # frozen model, full attention
    groups = split_groups(policy, rollout, n)                # one Rollout per question, e.g. as micro-batches

`inputs` is the processor's left-padded batch (input_ids, attention_mask, mm_token_type_ids, pixel_values,
image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts), or repeat_prompts' form of it, where
encoded features (`mm_encoder_outputs`) replace the pixels. Each row has its own sparsity threshold `keep_p` — not
to be confused with nucleus sampling's `top_p` in SamplingConfig.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from grpo import completion_mask, token_logprobs
from sparse_qwen import (PrunedKVCache, SparseState, check_vision_tokens, continuation_positions, make_state,
                         media_per_sample, prompt_positions, sparse_forward, text_config)

MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
              "mm_encoder_outputs")
VISION = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    do_sample: bool = True  # False: greedy
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus sampling over the vocabulary (1.0 = off)
    top_k: int = 0  # 0 = off


@dataclass
class Rollout:
    """What the policy generated, and what the training step needs to score the same tokens the same way."""

    inputs: dict  # the prompt batch, (B, P) tensors + media
    completion_ids: torch.Tensor  # (B, T), pad after EOS
    completion_mask: torch.Tensor  # (B, T) 1 up to and including the first EOS
    logprobs: torch.Tensor  # (B, T) log π(token) at the sampling temperature, under the rollout's sparsity
    keep_p: torch.Tensor  # (B,) sparsity threshold p_n of each row
    kept: torch.Tensor  # (B, n_layers) tokens kept per layer, k_j
    lengths: torch.Tensor  # (B,) prompt length ℓ (padding excluded)
    token_ratio: torch.Tensor  # (B,) τ = mean_j k_j / ℓ
    kv_bytes: torch.Tensor  # (B,) KV cache bytes each row holds after prefill
    selection: torch.Tensor  # (B, n_layers, P) bool: the prompt tokens each layer kept (m_Q = m_K)
    temperature: float
    seed: int
    step_logits: torch.Tensor | None = None  # (B, T, V) raw logits of each step, when asked for


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator=None) -> torch.Tensor:
    """Next token per row from logits (B, V): greedy, or temperature → top-k → top-p (nucleus) → sample.  (B,)

    generator: one torch.Generator for the batch, or a list of one per row (a row's samples then do not depend on
    which other rows share its batch)."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > cfg.top_p  # mass before a token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)  # (B, V)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(row[None], 1, generator=g)[0] for row, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def without_placeholders(model, logits: torch.Tensor) -> torch.Tensor:
    """Forbid the image/video placeholder tokens: a sampled one would be read as a visual slot when the completion
    is scored teacher-forced. The policy's distribution is over the rest of the vocabulary, in rollout and scoring."""
    ids = torch.tensor([model.config.image_token_id, model.config.video_token_id], device=logits.device)
    return logits.index_fill(-1, ids, float("-inf"))


def sampling_generators(device, seed: int, row_seeds: list[int] | None = None):
    """One torch.Generator for the batch, or one per row when row_seeds are given (see sample_next)."""
    if row_seeds is None:
        return torch.Generator(device=device).manual_seed(seed)
    return [torch.Generator(device=device).manual_seed(s) for s in row_seeds]


@torch.no_grad()
def repeat_prompts(model, inputs, n: int) -> dict:
    """Each prompt of the batch n times in a row (a GRPO group: rows b·n … b·n+n-1), its media encoded once.

    The vision tower runs once per image/video; the decoder receives the features n times through transformers'
    `mm_encoder_outputs` instead of n copies of the pixels. The features carry no gradient, so this is for a frozen
    vision tower (train.py's default), whose features the full-attention reference shares.
    """
    out = {k: inputs[k].repeat_interleave(n, 0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    encoded = {}
    for kind, (pixels, grid_key) in VISION.items():
        if inputs.get(pixels) is None:
            continue
        per_sample = media_per_sample(model, inputs, kind)  # items per prompt
        starts = [sum(per_sample[:b]) for b in range(len(per_sample))]  # index of each prompt's first item
        order = [s + i for s, c in zip(starts, per_sample) for _ in range(n) for i in range(c)]  # items, n times
        features = getattr(model.model, f"get_{kind}_features")(inputs[pixels], inputs[grid_key]).pooler_output
        encoded[kind] = BaseModelOutputWithPooling(pooler_output=[features[i] for i in order])  # (tokens_i, hidden)
        out[grid_key] = inputs[grid_key][order]
        if kind == "video" and inputs.get("second_per_grid_ts") is not None:
            out["second_per_grid_ts"] = torch.as_tensor(inputs["second_per_grid_ts"])[order]
    return {**out, "mm_encoder_outputs": encoded} if encoded else out


def eos_ids_of(model) -> list[int]:
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else text_config(model).eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def pad_id_of(model) -> int:
    pad = model.generation_config.pad_token_id
    return pad if pad is not None else eos_ids_of(model)[0]


@torch.no_grad()
def prefill(model, inputs, keep_p, seed: int = 0):
    """Sparse prefill: select per layer and sample (Eq. 3), attend among the selection, prune the KV cache to it.

    Returns the last-position logits (B, V), the SparseState (selections, pruned cache) and the next text position
    per row (B,) from which generated tokens continue (mRoPE, original positions).
    """
    check_vision_tokens(model, inputs)
    cache = PrunedKVCache(text_config(model))
    state = make_state(model, keep_p, batch_size=inputs["input_ids"].shape[0], cache=cache, seed=seed)
    positions, next_pos = prompt_positions(model, inputs)  # (3, B, P), (B,)
    with sparse_forward(state):
        logits = model(**inputs, position_ids=positions, past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]  # (B, V)
    return logits, state, next_pos


@torch.no_grad()
def generate(model, inputs, keep_p, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             return_logits: bool = False, row_seeds: list[int] | None = None) -> Rollout:
    """Sample one completion per prompt row with Top-p sparse attention and a pruned KV cache.

    keep_p: float or (B,). Prefill selects per layer and sample (Eq. 3), prunes the cache to the selection; each new
    token then attends to its row's pruned cache. Rows stop at EOS; the loop stops when all rows have.
    seed: the probes' seed, and the sampling seed of the batch; row_seeds (B,): one sampling stream per row instead.
    """
    logits, state, next_pos = prefill(model, inputs, keep_p, seed)  # (B, V)
    cache, bsz, device = state.cache, logits.shape[0], logits.device
    kept, kv_bytes = state.kept(), cache.kv_bytes()
    selection = torch.stack([state.selections[j].mask for j in sorted(state.selections)], 1)  # (B, n_layers, P)
    eos, pad = torch.tensor(eos_ids_of(model), device=device), pad_id_of(model)
    generator = sampling_generators(device, seed, row_seeds) if sampling.do_sample else None
    tokens, logps, raw = [], [], []
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    state.mode = "decode"
    for t in range(sampling.max_new_tokens):
        raw.append(logits.float()) if return_logits else None
        logits = without_placeholders(model, logits)
        token = sample_next(logits, sampling, generator).masked_fill(done, pad)  # (B,)
        logps.append(torch.log_softmax(logits.float() / sampling.temperature, -1).gather(-1, token[:, None])[:, 0])
        tokens.append(token)
        done |= torch.isin(token, eos)
        if bool(done.all()) or t + 1 == sampling.max_new_tokens:
            break
        with sparse_forward(state):
            logits = model(input_ids=token[:, None], position_ids=continuation_positions(next_pos, 1, t),
                           past_key_values=cache, use_cache=True).logits[:, -1]  # (B, V)
    completion = torch.stack(tokens, 1)  # (B, T)
    mask = completion_mask(completion, eos.tolist(), None)
    return Rollout(inputs=dict(inputs), completion_ids=completion, completion_mask=mask,
                   logprobs=torch.stack(logps, 1) * mask, keep_p=state.keep_p, kept=kept, lengths=state.lengths(),
                   token_ratio=state.token_ratio(), kv_bytes=kv_bytes, selection=selection,
                   temperature=sampling.temperature, seed=seed,
                   step_logits=torch.stack(raw, 1) if return_logits else None)


def take_rows(inputs: dict, media_counts: dict, start: int, stop: int) -> dict:
    """Rows start … stop-1 of a left-padded prompt batch with their images/videos (pixels or encoded features);
    columns that are padding in every kept row are dropped. media_counts: {kind: media_per_sample(…, kind)}."""
    first = int(inputs["attention_mask"][start:stop].any(0).int().argmax())  # first column a kept row uses
    out = {k: inputs[k][start:stop, first:] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for kind, (pixels, grid_key) in VISION.items():
        if inputs.get(grid_key) is None:
            continue
        per_row = media_counts[kind]
        a, b = sum(per_row[:start]), sum(per_row[:stop])  # these rows' items
        if a == b:
            continue
        grids, encoded = inputs[grid_key], inputs.get("mm_encoder_outputs", {}).get(kind)
        out[grid_key] = grids[a:b]
        if kind == "video" and inputs.get("second_per_grid_ts") is not None:
            out["second_per_grid_ts"] = torch.as_tensor(inputs["second_per_grid_ts"])[a:b]
        if inputs.get(pixels) is not None:
            ends = grids.prod(-1).cumsum(0).tolist()  # the pixel rows (patches) of item i end at ends[i]
            out[pixels] = inputs[pixels][(ends[a - 1] if a else 0):ends[b - 1]]
        if encoded is not None:
            features = BaseModelOutputWithPooling(pooler_output=list(encoded.pooler_output[a:b]))
            out.setdefault("mm_encoder_outputs", {})[kind] = features
    return out


def split_groups(model, rollout: Rollout, n: int) -> list[Rollout]:
    """A rollout of G·n rows as G rollouts of n rows (one question's group each), e.g. as training micro-batches.
    Each keeps only its own media, prompt columns and completion steps; scoring one equals its part of the whole."""
    parts, prompt_len = [], rollout.inputs["input_ids"].shape[1]
    counts = {kind: media_per_sample(model, rollout.inputs, kind) for kind in VISION}  # once, not per group
    for start in range(0, len(rollout.keep_p), n):
        rows = slice(start, start + n)
        inputs = take_rows(rollout.inputs, counts, start, start + n)
        first = prompt_len - inputs["input_ids"].shape[1]  # dropped padding columns
        steps = max(int(rollout.completion_mask[rows].sum(-1).max()), 1)  # the group's longest completion
        logits = rollout.step_logits[rows, :steps] if rollout.step_logits is not None else None
        parts.append(dataclasses.replace(
            rollout, inputs=inputs, completion_ids=rollout.completion_ids[rows, :steps],
            completion_mask=rollout.completion_mask[rows, :steps], logprobs=rollout.logprobs[rows, :steps],
            keep_p=rollout.keep_p[rows], kept=rollout.kept[rows], lengths=rollout.lengths[rows],
            token_ratio=rollout.token_ratio[rows], kv_bytes=rollout.kv_bytes[rows],
            selection=rollout.selection[rows, :, first:], step_logits=logits))
    return parts


def full_sequence(model, rollout: Rollout) -> dict:
    """Prompt + completion as one batch for a teacher-forced forward: ids, masks, mRoPE positions, media."""
    inputs, completion = rollout.inputs, rollout.completion_ids
    positions, next_pos = prompt_positions(model, inputs)  # (3, B, P), (B,)
    steps = completion.shape[1]
    return dict(
        input_ids=torch.cat([inputs["input_ids"], completion], 1),  # (B, P+T)
        attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(completion)], 1),
        mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion)], 1),
        position_ids=torch.cat([positions, continuation_positions(next_pos, steps)], 2),  # (3, B, P+T)
        **{k: inputs[k] for k in MEDIA_KEYS if inputs.get(k) is not None})


def scoring_state(model, rollout: Rollout, keep_p=None, relaxed_temperature: float | None = None,
                  relaxed_grad: bool = True) -> SparseState:
    """The SparseState of a teacher-forced scoring of `rollout`: its keep_p (or `keep_p`), probe seed, prompt length.

    Build it once and hand the same one to `score_completions` and to `sparse_forward` around `.backward()`: the
    forward, the gradient-checkpoint recomputation and the relaxed τ̃ (`relaxed_temperature`: sparse_qwen) then all
    read one state. After the forward it holds the selections and τ̃ per layer (`state.relaxed_token_ratio()`).
    """
    return make_state(model, rollout.keep_p if keep_p is None else keep_p, mode="teacher",
                      batch_size=len(rollout.keep_p), prompt_len=rollout.inputs["input_ids"].shape[1],
                      seed=rollout.seed, relaxed_temperature=relaxed_temperature, relaxed_grad=relaxed_grad)


def score_completions(model, rollout: Rollout, sparse: bool = True, keep_p=None,
                      state: SparseState | None = None) -> torch.Tensor:
    """Teacher-forced log π(completion token) at the rollout's temperature.  (B, T), 0 after EOS.

    sparse=True: the policy under the same selection rule as the rollout (prompt selected per layer with the
    rollout's keep_p and probe seed, response tokens always kept) — equal to rollout.logprobs. `state`: the
    `scoring_state` to score under (built here when None).
    sparse=False: plain forward (the full-attention reference model). Gradients flow unless under no_grad.
    """
    batch, steps = full_sequence(model, rollout), rollout.completion_ids.shape[1]
    context = contextlib.nullcontext()
    if sparse:
        context = sparse_forward(scoring_state(model, rollout, keep_p) if state is None else state)
    with context:
        logits = model(**batch, use_cache=False, logits_to_keep=steps + 1).logits[:, :-1]  # (B, T, V): completion
    logits = without_placeholders(model, logits)
    return token_logprobs(logits, rollout.completion_ids, rollout.temperature) * rollout.completion_mask
