"""Rollouts of the sparse policy: sparse prefill (Eq. 1-3), pruned KV cache, a readable sampling loop.

    inputs = batching.repeat_prompts(policy, processor_batch, n)   # each prompt n times, its media encoded once
    rollout = generate(policy, inputs, keep_p=torch.tensor([0.94, 0.945, ...]), sampling=SamplingConfig(...))
    logp = score_completions(policy, rollout)               # teacher-forced, same sparsity: == rollout.logprobs
    state = scoring_state(policy, rollout, relaxed_temperature=0.01)  # + the relaxed τ̃ per layer, with gradient
    logp = score_completions(policy, rollout, state=state); tau_soft = state.relaxed_token_ratio()   # (B,)
    ref_logp = score_completions(reference, rollout, sparse=False)   # frozen model, full attention
    groups = split_groups(policy, rollout, n)                 # one Rollout per question, e.g. as micro-batches

`inputs` is the processor's left-padded batch (input_ids, attention_mask, mm_token_type_ids, pixel_values,
image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts), or batching.repeat_prompts' form, where
encoded features (`mm_encoder_outputs`) replace the pixels. Each row has its own sparsity threshold `keep_p` — not
to be confused with nucleus sampling's `top_p` in SamplingConfig.
"""
from __future__ import annotations

import time
import inspect
import dataclasses
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from zipr1_support.batching import MEDIA_KEYS, VISION, check_vision_tokens, media_per_sample, take_rows
from grpo import completion_mask, token_logprobs
from zipr1_support.mrope import continuation_positions, prompt_positions
from sparse_qwen import (ATTN_NAME, PrunedKVCache, SparseState, make_state, sparse_kwargs, text_config,
                         token_kv_bytes)


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
    keep_p: torch.Tensor  # (B,) sparsity threshold p_n of each row (1 in a dense rollout)
    kept: torch.Tensor  # (B, n_layers) tokens kept per layer, k_j
    lengths: torch.Tensor  # (B,) prompt length ℓ (padding excluded)
    token_ratio: torch.Tensor  # (B,) τ = mean_j k_j / ℓ
    kv_bytes: torch.Tensor  # (B,) KV cache bytes each row holds after prefill
    selection: torch.Tensor  # (B, n_layers, P) bool: the prompt tokens each layer kept (m_Q = m_K)
    temperature: float
    seed: int
    step_logits: torch.Tensor | None = None  # (B, T, V) raw logits of each step, when asked for
    timing: Timing | None = None  # prefill and decode seconds, when asked for
    truncated: torch.Tensor | None = None  # (B,) bool: the answer hit max_new_tokens without an EOS


@dataclass
class Timing:
    """Wall-clock seconds of one `generate` call, read with `clock` (after the device's queued work)."""

    prefill_s: float  # the prompt forward (sparse: with its per-layer selection and cache pruning)
    decode_s: float  # the one-token forwards after it, with sampling
    decode_tokens: int  # B × the number of those forwards


def clock(device) -> float:
    """time.perf_counter() once the device has finished its queued work (CUDA kernels run asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator=None) -> torch.Tensor:
    """Next token per row from logits (B, V): greedy, or temperature → top-k → top-p (nucleus) → sample.  (B,)

    generator: one torch.Generator for the batch, or a list of one per row (a row's samples then do not depend on
    which other rows share its batch)."""
    if not cfg.do_sample:
        return logits.argmax(-1)  # (B,)
    logits = logits.float() / cfg.temperature  # (B, V)
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (B, V)
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)  # (B, V), descending
        drop = probs.cumsum(-1) - probs > cfg.top_p  # (B, V): mass before a token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))  # (B, V)
    probs = logits.softmax(-1)  # (B, V)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(row[None], 1, generator=g)[0] for row, g in zip(probs, generator)])  # (B,)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def without_placeholders(model, logits: torch.Tensor) -> torch.Tensor:
    """Forbid the image/video placeholder tokens: a sampled one would be read as a visual slot when the completion
    is scored teacher-forced. The policy's distribution is over the rest of the vocabulary, in rollout and scoring."""
    ids = torch.tensor([model.config.image_token_id, model.config.video_token_id], device=logits.device)  # (2,)
    return logits.index_fill(-1, ids, float("-inf"))  # (..., V)


def sampling_generators(device, seed: int, row_seeds: list[int] | None = None):
    """One torch.Generator for the batch, or one per row when row_seeds are given (see sample_next)."""
    if row_seeds is None:
        return torch.Generator(device=device).manual_seed(seed)
    return [torch.Generator(device=device).manual_seed(s) for s in row_seeds]


def eos_ids_of(model) -> list[int]:
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else text_config(model).eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def pad_id_of(model) -> int:
    pad = model.generation_config.pad_token_id
    return pad if pad is not None else eos_ids_of(model)[0]


def cache_kwarg(model, cache) -> dict:
    """The KV cache under the keyword this transformers' forward takes: `cache` from 5.24 (`past_key_values` is
    deprecated there and goes in 5.40), `past_key_values` before (5.23; the GPU machine's 5.17)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


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
    logits = model(**inputs, position_ids=positions, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1,
                   **sparse_kwargs(state)).logits[:, -1]  # (B, V)
    return logits, state, next_pos


@torch.no_grad()
def dense_prefill(model, inputs):
    """Full attention, the model's own (e.g. stock "sdpa"), over the prompt into a full DynamicCache.

    Returns the last-position logits (B, V), the cache and the next text position per row (B,), as `prefill`.
    """
    if text_config(model)._attn_implementation == ATTN_NAME:
        raise ValueError("dense generation (keep_p=None) needs the model's stock attention: "
                         "model.set_attn_implementation('sdpa'), or pass keep_p=1.0 for sparse attention at p = 1")
    check_vision_tokens(model, inputs)
    cache = DynamicCache(config=text_config(model))
    positions, next_pos = prompt_positions(model, inputs)  # (3, B, P), (B,)
    logits = model(**inputs, position_ids=positions, **cache_kwarg(model, cache), use_cache=True,
                   logits_to_keep=1).logits[:, -1]  # (B, V)
    return logits, cache, next_pos


def sparse_record(state) -> dict:
    """The Rollout fields a sparse prefill determines: thresholds, k_j, ℓ, τ (§2.1), KV bytes, selections."""
    return dict(keep_p=state.keep_p, kept=state.kept(), lengths=state.lengths(), token_ratio=state.token_ratio(),
                kv_bytes=state.cache.kv_bytes(), selection=state.selection_masks())


def dense_record(cache, attention_mask) -> dict:
    """The same fields at full attention: every real prompt token kept in every layer (k_j = ℓ, τ = 1), and the
    bytes of the full cache per row, Σ_j ℓ·Hkv·d·(K bytes + V bytes) (left padding excluded)."""
    lengths, n_layers = attention_mask.sum(-1), len(cache.layers)  # (B,) ℓ
    per_token = sum(token_kv_bytes(layer) for layer in cache.layers)  # bytes of one token's K and V, all layers
    ones = torch.ones(len(lengths), device=lengths.device)  # (B,): keep_p and τ
    kept = lengths[:, None].expand(-1, n_layers)  # (B, n_layers): k_j = ℓ
    selection = attention_mask.bool()[:, None].expand(-1, n_layers, -1)  # (B, n_layers, P): every real token
    return dict(keep_p=ones, kept=kept, lengths=lengths, token_ratio=ones, kv_bytes=lengths * per_token,  # (B,)
                selection=selection)


@torch.no_grad()
def generate(model, inputs, keep_p, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             return_logits: bool = False, row_seeds: list[int] | None = None, timed: bool = False) -> Rollout:
    """Sample one completion per prompt row with Top-p sparse attention and a pruned KV cache, or densely.

    keep_p: float or (B,). Prefill selects per layer and sample (Eq. 3), prunes the cache to the selection; each new
    token then attends to its row's pruned cache. Rows stop at EOS; the loop stops when all rows have.
    keep_p=None: dense — the model's own attention over a full DynamicCache and the growing padding mask (eval.py's
    Full); the rollout records τ = 1, every prompt token kept and the full cache's bytes.
    seed: the probes' seed, and the sampling seed of the batch; row_seeds (B,): one sampling stream per row instead.
    timed: time the prefill and the decode loop apart (Rollout.timing, see `clock`).
    """
    device = inputs["input_ids"].device
    start = clock(device) if timed else 0.0
    state = None
    if keep_p is None:
        logits, cache, next_pos = dense_prefill(model, inputs)  # (B, V), DynamicCache, (B,)
    else:
        logits, state, next_pos = prefill(model, inputs, keep_p, seed)  # (B, V), SparseState, (B,)
        cache, state.mode = state.cache, "decode"
    prefill_s = clock(device) - start if timed else 0.0
    record = dense_record(cache, inputs["attention_mask"]) if state is None else sparse_record(state)
    mask = inputs["attention_mask"] if state is None else None  # (B, P) dense: the padding mask, grows per step
    bsz = logits.shape[0]
    eos, pad = torch.tensor(eos_ids_of(model), device=device), pad_id_of(model)  # (E,), int
    past = cache_kwarg(model, cache)  # the keyword looked up once, not per decoded token
    generator = sampling_generators(device, seed, row_seeds) if sampling.do_sample else None
    tokens, logps, raw = [], [], []
    done = torch.zeros(bsz, dtype=torch.bool, device=device)  # (B,)
    start = clock(device) if timed else 0.0
    for t in range(sampling.max_new_tokens):
        raw.append(logits.float()) if return_logits else None  # (B, V)
        logits = without_placeholders(model, logits)  # (B, V)
        token = sample_next(logits, sampling, generator).masked_fill(done, pad)  # (B,)
        logp = torch.log_softmax(logits.float() / sampling.temperature, -1)  # (B, V)
        logps.append(logp.gather(-1, token[:, None])[:, 0])  # (B,)
        tokens.append(token)
        done |= torch.isin(token, eos)  # (B,)
        if bool(done.all()) or t + 1 == sampling.max_new_tokens:
            break
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)  # (B, P+t+1)
        logits = model(input_ids=token[:, None], position_ids=continuation_positions(next_pos, 1, t),
                       attention_mask=mask, **past, use_cache=True,
                       **sparse_kwargs(state)).logits[:, -1]  # (B, V)
    timing = Timing(prefill_s, clock(device) - start, bsz * (len(tokens) - 1)) if timed else None
    completion = torch.stack(tokens, 1)  # (B, T)
    valid = completion_mask(completion, eos.tolist(), None)  # (B, T)
    return Rollout(inputs=dict(inputs), completion_ids=completion, completion_mask=valid,
                   logprobs=torch.stack(logps, 1) * valid, **record, temperature=sampling.temperature, seed=seed,
                   step_logits=torch.stack(raw, 1) if return_logits else None, timing=timing, truncated=~done)


def full_sequence(model, rollout: Rollout) -> dict:
    """Prompt + completion as one batch for a teacher-forced forward: ids, masks, mRoPE positions, media."""
    inputs, completion = rollout.inputs, rollout.completion_ids
    positions, next_pos = prompt_positions(model, inputs)  # (3, B, P), (B,)
    steps = completion.shape[1]
    return dict(
        input_ids=torch.cat([inputs["input_ids"], completion], 1),  # (B, P+T)
        attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(completion)], 1),  # (B, P+T)
        mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion)], 1),  # (B, P+T)
        position_ids=torch.cat([positions, continuation_positions(next_pos, steps)], 2),  # (3, B, P+T)
        **{k: inputs[k] for k in MEDIA_KEYS if inputs.get(k) is not None})


def scoring_state(model, rollout: Rollout, keep_p=None, relaxed_temperature: float | None = None,
                  relaxed_grad: bool = True, straight_through: float | None = None) -> SparseState:
    """The SparseState of a teacher-forced scoring of `rollout`: its keep_p (or `keep_p`), probe seed, prompt length.

    Build it once and hand it to `score_completions`: the forward, the gradient-checkpoint recomputation in
    `.backward()` (which re-runs with the same call keywords) and the relaxed τ̃ (`relaxed_temperature`: sparse_qwen)
    then all read one state. After the forward it holds the selections and τ̃ per layer
    (`state.relaxed_token_ratio()`). `straight_through`: T of the selection's straight-through gradient
    (learned_sparsity.straight_through_mask; None: the selection has none, as in the paper).
    """
    return make_state(model, rollout.keep_p if keep_p is None else keep_p, mode="teacher",
                      batch_size=len(rollout.keep_p), prompt_len=rollout.inputs["input_ids"].shape[1],
                      seed=rollout.seed, relaxed_temperature=relaxed_temperature, relaxed_grad=relaxed_grad,
                      straight_through=straight_through)


def score_completions(model, rollout: Rollout, sparse: bool = True, keep_p=None,
                      state: SparseState | None = None) -> torch.Tensor:
    """Teacher-forced log π(completion token) at the rollout's temperature.  (B, T), 0 after EOS.

    sparse=True: the policy under the same selection rule as the rollout (prompt selected per layer with the
    rollout's keep_p and probe seed, response tokens always kept) — equal to rollout.logprobs. `state`: the
    `scoring_state` to score under (built here when None).
    sparse=False: plain forward (the full-attention reference model). Gradients flow unless under no_grad.
    """
    batch, steps = full_sequence(model, rollout), rollout.completion_ids.shape[1]
    if sparse:
        state = scoring_state(model, rollout, keep_p) if state is None else state
    logits = model(**batch, use_cache=False, logits_to_keep=steps + 1,
                   **sparse_kwargs(state if sparse else None)).logits[:, :-1]  # (B, T, V): completion
    logits = without_placeholders(model, logits)
    return token_logprobs(logits, rollout.completion_ids, rollout.temperature) * rollout.completion_mask


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
            selection=rollout.selection[rows, :, first:], step_logits=logits,
            truncated=rollout.truncated[rows] if rollout.truncated is not None else None))
    return parts
