"""Sparse Qwen2.5-VL / Qwen2-VL inside transformers: rollouts against HF `generate` and an independent masked reference.

Tiny random models are built offline, saved, and re-loaded with `from_pretrained(local_dir)` so the real loading
path runs.
"""
import inspect
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface, AutoModelForImageTextToText
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from zipr1_support import data
from zipr1_support import media
import rollout
import toy
from zipr1_support.batching import repeat_prompts
from rollout import SamplingConfig, generate, prefill, score_completions, scoring_state
from sparse_attention import sparse_attention
from sparse_qwen import make_sparse

ARCHS = ["qwen2_5_vl", "qwen2_vl"]
STEPS = 6


def assert_close_to_scale(got, want, atol, rtol, **kw):
    """assert_close with `atol` per unit of magnitude (times max(1, max|want|)): fp32 sums carry rounding that grows
    with their size and differs between CPUs, so a bare atol on large sums fails on some machines."""
    scale = max(1.0, float(want.detach().abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, atol=atol * scale, rtol=rtol, **kw)


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    path = toy.build_tiny_model_dir(tmp_path_factory.mktemp(request.param), arch=request.param, seed=1)
    load = lambda: AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval()  # noqa: E731
    return load, media.load_processor(path)


def items(kind):
    """Prompt batches for the cases of the issue: one image, a video, two images, a left-padded mixed batch."""
    rows = {r["kind"]: r for r in toy.toy_examples(8, seed=3)}
    image, video = data.prompt_item(rows["color"]), data.prompt_item(rows["video"])
    extra = rows["shape"]["image"]
    two = media.chat_item(media.question_text("Which picture has more red? " * 2, ["A. first", "B. second"]),
                            [image["images"][0], extra])
    return {"image": [image], "video": [video], "two_images": [two], "padded_batch": [image, two, video]}[kind]


def hf_greedy(model, inputs):
    placeholders = [model.config.image_token_id, model.config.video_token_id]  # never sampled (rollout.py)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, suppress_tokens=placeholders)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)  # (B, T), (B, T, V)


@pytest.mark.parametrize("kind", ["image", "video", "two_images", "padded_batch"])
def test_keep_p_one_equals_hf_generate(tiny, kind):
    load, processor = tiny
    inputs = media.encode_prompts(processor, items(kind))
    stock = load()
    tokens, logits = hf_greedy(stock, inputs)
    ours = generate(make_sparse(load()), inputs, 1.0, SamplingConfig(STEPS, do_sample=False), return_logits=True)
    assert torch.equal(ours.completion_ids, tokens)
    torch.testing.assert_close(ours.step_logits, logits.float(), atol=1e-4, rtol=1e-4)
    assert bool((ours.token_ratio == 1).all())
    dense = generate(stock, inputs, None, SamplingConfig(STEPS, do_sample=False), return_logits=True)  # dense mode
    assert torch.equal(dense.completion_ids, tokens)
    torch.testing.assert_close(dense.step_logits, logits.float(), atol=1e-4, rtol=1e-4)
    assert torch.equal(dense.selection, ours.selection) and torch.equal(dense.kv_bytes, ours.kv_bytes)
    assert torch.equal(dense.kept, ours.kept) and bool((dense.token_ratio == 1).all())


def test_timings_and_the_clock(tiny, monkeypatch):
    """timed=True: prefill and decode seconds, B × the one-token forwards; the clock waits for CUDA's queue."""
    load, processor = tiny
    inputs = media.encode_prompts(processor, items("padded_batch"))
    model = make_sparse(load())
    untimed = generate(model, inputs, 0.6, SamplingConfig(4, do_sample=False))
    timed = generate(model, inputs, 0.6, SamplingConfig(4, do_sample=False), timed=True)
    assert untimed.timing is None and torch.equal(timed.completion_ids, untimed.completion_ids)
    assert timed.timing.prefill_s > 0 and timed.timing.decode_s > 0
    assert timed.timing.decode_tokens == 3 * (timed.completion_ids.shape[1] - 1) == 3 * 3  # 4 tokens: 3 forwards
    with pytest.raises(ValueError, match="stock attention"):
        generate(model, inputs, None)  # dense mode on a sparse model: one clear error
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(torch.device(device).type))
    rollout.clock("cpu"), rollout.clock(torch.device("cuda", 0))
    assert synced == ["cuda"]


def test_the_cache_goes_under_the_keyword_this_transformers_takes(tiny):
    """transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns, and goes in 5.40):
    sparse and dense rollouts pass the cache under the name of the installed version, without the warning."""
    load, processor = tiny
    inputs = media.encode_prompts(processor, items("image"))
    stock = load()
    tokens, _ = hf_greedy(stock, inputs)  # (B, STEPS)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values", category=FutureWarning)
        dense = generate(stock, inputs, None, SamplingConfig(STEPS, do_sample=False))
        sparse = generate(make_sparse(load()), inputs, 1.0, SamplingConfig(STEPS, do_sample=False))
    assert torch.equal(dense.completion_ids, tokens) and torch.equal(sparse.completion_ids, tokens)  # cache carried
    cache, takes = object(), inspect.signature(stock.forward).parameters
    assert rollout.cache_kwarg(stock, cache) == {"cache" if "cache" in takes else "past_key_values": cache}
    def old_forward(input_ids=None, past_key_values=None, use_cache=None): ...
    def new_forward(input_ids=None, cache=None, use_cache=None): ...
    assert rollout.cache_kwarg(SimpleNamespace(forward=old_forward), cache) == {"past_key_values": cache}
    assert rollout.cache_kwarg(SimpleNamespace(forward=new_forward), cache) == {"cache": cache}


def register_reference(selection):
    """An independent pipeline: HF's full DynamicCache and generate loop; eager Eq. 2 with the recorded selection."""
    prompt_len = selection.shape[-1]

    def attention(module, q, k, v, mask, scaling=None, **kwargs):
        padding = mask[:, 0, -1, :]  # (B, Lk) from the materialised 4-D mask: the last query sees every real key
        chosen = selection[:, module.layer_idx]  # (B, P)
        if q.shape[2] == prompt_len:  # prefill: m_Q = m_K = the selection
            out = sparse_attention(q, k, v, chosen, chosen, scale=scaling)
        else:  # decode: the new query sees the selected prompt keys + every generated key, full cache kept
            m_k = torch.cat([chosen, padding[:, prompt_len:]], 1)
            out = sparse_attention(q, k, v, torch.ones_like(m_k[:, -q.shape[2]:]), m_k, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("zipr1_test_reference", attention)
    AttentionMaskInterface.register("zipr1_test_reference",
                                    lambda *a, **kw: sdpa_mask(*a, **{**kw, "allow_is_causal_skip": False}))


@pytest.mark.parametrize("keep_p", [[0.5, 0.7, 0.9], [0.3, 0.3, 0.3]])
def test_pruned_cache_equals_full_cache_with_boolean_mask(tiny, keep_p):
    load, processor = tiny
    inputs = media.encode_prompts(processor, items("padded_batch"))
    ours = generate(make_sparse(load()), inputs, torch.tensor(keep_p), SamplingConfig(STEPS, do_sample=False),
                    return_logits=True)
    assert bool((ours.token_ratio < 1).all())
    register_reference(ours.selection)
    reference = load()
    reference.set_attn_implementation({"text_config": "zipr1_test_reference", "vision_config": "sdpa"})
    tokens, logits = hf_greedy(reference, inputs)
    assert torch.equal(ours.completion_ids, tokens)
    torch.testing.assert_close(ours.step_logits, logits.float(), atol=1e-4, rtol=1e-4)


def test_kv_bytes_read_from_the_cache_tensors(tiny):
    load, processor = tiny
    model = make_sparse(load())
    inputs = media.encode_prompts(processor, items("padded_batch"))
    _, state, _ = prefill(model, inputs, torch.tensor([0.4, 0.8, 1.0]))
    cfg = model.config.get_text_config(decoder=True)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kept = state.kept()  # (B, n_layers)
    expect = (kept * 2 * cfg.num_key_value_heads * head_dim * 4).sum(-1)  # Σ_j k_j·2·H_kv·d·bytes (fp32)
    from_tensors = torch.zeros_like(expect)
    for j, layer in enumerate(state.cache.layers):
        assert layer.keys.shape[2] == int(kept[:, j].max()) and layer.values.shape == layer.keys.shape
        from_tensors += state.cache.key_valid[j].sum(-1) * layer.keys.shape[1] * layer.keys.shape[3] * \
            layer.keys.element_size() * 2
    assert torch.equal(from_tensors, expect) and torch.equal(state.cache.kv_bytes(), expect)
    dense = inputs["attention_mask"].sum(-1) * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4
    assert int(expect[-1]) == int(dense[-1]) and bool((expect[:2] < dense[:2]).all())


def test_token_ratio_recomputed_from_recorded_selections(tiny):
    load, processor = tiny
    inputs = media.encode_prompts(processor, items("padded_batch"))
    out = generate(make_sparse(load()), inputs, torch.tensor([0.5, 0.9, 0.975]), SamplingConfig(2, do_sample=False))
    lengths = inputs["attention_mask"].sum(-1)  # ℓ: real prompt tokens
    assert not bool((out.selection & ~inputs["attention_mask"].bool()[:, None, :]).any())  # padding never kept
    tau = (out.selection.sum(-1).float() / lengths[:, None]).mean(-1)
    torch.testing.assert_close(out.token_ratio, tau)
    assert torch.equal(out.kept, out.selection.sum(-1))


def test_teacher_forced_logprobs_equal_rollout_logprobs(tiny):
    load, processor = tiny
    model = make_sparse(load())
    inputs = media.encode_prompts(processor, items("padded_batch"))
    sampling = SamplingConfig(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=50, top_p=0.95)
    out = generate(model, inputs, torch.tensor([0.6, 0.94, 0.975]), sampling, seed=5)
    assert_close_to_scale(score_completions(model, out), out.logprobs, atol=1e-5, rtol=0)
    placeholders = torch.tensor([model.config.image_token_id, model.config.video_token_id])
    assert not bool(torch.isin(out.completion_ids, placeholders).any())  # never sampled: scoring stays well-formed
    dense = score_completions(load(), out, sparse=False)  # the full-attention reference sees something else
    assert not torch.allclose(dense, out.logprobs, atol=1e-3)


def test_scoring_state_records_the_relaxed_ratio_of_the_rollouts_selection(tiny):
    """One scoring state: the teacher forward's log-probs are the rollout's (the relaxed count changes nothing of
    the selection), and its τ̃ per layer is the hard k_j / ℓ of the rollout as T → 0, with a gradient."""
    load, processor = tiny
    model = make_sparse(load())
    inputs = media.encode_prompts(processor, items("padded_batch"))
    out = generate(model, inputs, torch.tensor([0.6, 0.94, 1.0]), SamplingConfig(4, do_sample=False))
    state = scoring_state(model, out, relaxed_temperature=1e-5)
    torch.testing.assert_close(score_completions(model, out, state=state), out.logprobs, atol=1e-5, rtol=0)
    hard = out.kept.float() / out.lengths[:, None]  # (B, n_layers)
    torch.testing.assert_close(state.relaxed_by_layer(), hard, atol=2e-3, rtol=0)
    assert bool((state.kept() == out.kept).all()) and state.relaxed_token_ratio()[2] == 1.0  # p = 1: dense
    smooth = scoring_state(model, out, relaxed_temperature=0.05)
    score_completions(model, out, state=smooth)
    smooth.relaxed_token_ratio()[:2].sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "q_proj" in n or "k_proj" in n]
    assert grads and all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)


def test_repeated_prompts_encode_media_once_and_equal_row_copies(tiny):
    """A group's N rows from one vision pass (mm_encoder_outputs) roll out and score as N encoded copies do."""
    load, processor = tiny
    model, n = make_sparse(load()), 2
    prompts = items("padded_batch")  # image, two images, video
    copies = media.encode_prompts(processor, [p for p in prompts for _ in range(n)])
    calls = []
    model.model.visual.register_forward_hook(lambda *args: calls.append(1))
    shared = repeat_prompts(model, media.encode_prompts(processor, prompts), n)
    assert len(calls) == 2 and "pixel_values" not in shared  # one pass for the images, one for the video
    assert torch.equal(shared["input_ids"], copies["input_ids"])
    for key in ("image_grid_thw", "video_grid_thw"):
        assert torch.equal(shared[key], copies[key])
    keep_p, sampling = torch.tensor([0.5, 0.975, 0.7, 0.9, 0.6, 1.0]), SamplingConfig(STEPS, do_sample=False)
    ours, theirs = generate(model, shared, keep_p, sampling), generate(model, copies, keep_p, sampling)
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert torch.equal(ours.selection, theirs.selection)
    assert_close_to_scale(ours.logprobs, theirs.logprobs, atol=1e-5, rtol=0)
    calls.clear()
    assert_close_to_scale(score_completions(model, ours), theirs.logprobs, atol=1e-5, rtol=0)
    dense = score_completions(load(), ours, sparse=False)  # the reference reads the same features
    assert_close_to_scale(dense, score_completions(load(), theirs, sparse=False), atol=1e-5, rtol=0)
    assert not calls  # scoring reused the features: no second vision pass


@pytest.mark.parametrize("media_as", ["pixels", "features"])
def test_a_batch_of_groups_splits_into_the_rollouts_of_each_group_alone(tiny, media_as):
    """G questions rolled out in one batch (row-seeded sampling), split per group: each part equals its group rolled
    out alone, and scores to its own log-probs (the training micro-batches)."""
    load, processor = tiny
    model, n, prompts = make_sparse(load()), 2, items("padded_batch")  # image, two images, video

    def batch(questions):
        if media_as == "features":
            return repeat_prompts(model, media.encode_prompts(processor, questions), n)
        return media.encode_prompts(processor, [q for q in questions for _ in range(n)])

    keep_p, row_seeds = torch.tensor([0.5, 0.975, 0.7, 0.9, 0.6, 1.0]), [11, 12, 21, 22, 31, 32]
    sampling = SamplingConfig(max_new_tokens=5, temperature=0.8)
    whole = generate(model, batch(prompts), keep_p, sampling, seed=5, row_seeds=row_seeds)
    parts = rollout.split_groups(model, whole, n)
    assert len(parts) == len(prompts)
    for g, (part, question) in enumerate(zip(parts, prompts)):
        rows = slice(g * n, (g + 1) * n)
        alone = generate(model, batch([question]), keep_p[rows], sampling, seed=5, row_seeds=row_seeds[rows])
        assert torch.equal(part.completion_ids, alone.completion_ids)
        assert torch.equal(part.selection, alone.selection) and torch.equal(part.kept, alone.kept)
        for key in ("input_ids", "image_grid_thw", "video_grid_thw", "pixel_values", "pixel_values_videos"):
            assert (part.inputs.get(key) is None) == (alone.inputs.get(key) is None), key
            if alone.inputs.get(key) is not None:
                assert torch.equal(part.inputs[key], alone.inputs[key]), key
        assert_close_to_scale(part.logprobs, alone.logprobs, atol=1e-5, rtol=0)
        assert_close_to_scale(score_completions(model, part), part.logprobs, atol=1e-5, rtol=0)


def test_bf16_autocast_rollout_scores_within_bf16_noise(tiny):
    """train.py's CUDA default: fp32 weights under bf16 autocast, where Qwen's rope hands the attention fp32 q, k and
    a bf16 v. The sparse attention computes in bf16 as SDPA would, and teacher-forced scoring reproduces the rollout's
    log-probs up to bf16 rounding (far from the dense reference's)."""
    load, processor = tiny
    model = make_sparse(load())
    inputs = media.encode_prompts(processor, items("padded_batch"))
    with torch.autocast("cpu", torch.bfloat16):
        out = generate(model, inputs, torch.tensor([0.6, 0.9, 0.975]), SamplingConfig(8, temperature=0.8), seed=5)
        again = score_completions(model, out)
        dense = score_completions(load(), out, sparse=False)
    assert bool(out.logprobs.isfinite().all()) and float(out.token_ratio.min()) < 0.9
    cfg = model.config.text_config
    per_token = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2  # K and V in bf16
    assert torch.equal(out.kv_bytes, out.kept.sum(-1) * per_token)  # the cache holds bf16, not fp32 rope'd keys
    assert (again - out.logprobs).abs().max() < 0.1  # bf16: about 8 significant bits per activation
    assert (dense - out.logprobs).abs().max() > 0.5


def test_the_pipeline_on_the_triton_kernels_equals_the_torch_reference(tmp_path, monkeypatch):
    """What a GPU runs: ZIPR1_ATTN_BACKEND=triton puts the kernels (here through the interpreter) under the whole
    pipeline: fused probe selection, prefill, pruned-cache decode, teacher-forced scoring and its backward, on HF's
    strided q, k, v. (Qwen2.5-VL, 2 layers, two left-padded image prompts: the interpreter is slow.)"""
    path = toy.build_tiny_model_dir(tmp_path / "model", seed=1, num_hidden_layers=2)
    model = make_sparse(AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval())
    rows = {r["kind"]: r for r in toy.toy_examples(8, seed=3)}
    inputs = media.encode_prompts(media.load_processor(path), [data.prompt_item(rows[k]) for k in ("color", "shape")])
    assert not bool(inputs["attention_mask"].all())  # left padding
    keep_p, sampling = torch.tensor([0.5, 0.9]), SamplingConfig(3, do_sample=False)
    runs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("ZIPR1_ATTN_BACKEND", backend)
        out = generate(model, inputs, keep_p, sampling)
        model.zero_grad(set_to_none=True)
        logp = score_completions(model, out)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        runs[backend] = out, logp.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (ref, ref_logp, ref_grads), (got, got_logp, got_grads) = runs["torch"], runs["triton"]
    assert torch.equal(got.selection, ref.selection) and torch.equal(got.completion_ids, ref.completion_ids)
    assert bool((ref.token_ratio < 1).all())  # real sparsity
    assert_close_to_scale(got.logprobs, ref.logprobs, atol=1e-4, rtol=0)
    assert_close_to_scale(got_logp, ref_logp, atol=1e-4, rtol=0)
    assert got_grads.keys() == ref_grads.keys() and len(got_grads) > 0
    for name in ref_grads:
        assert_close_to_scale(got_grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_bad_inputs_give_one_clear_error(tiny, tmp_path):
    load, processor = tiny
    with pytest.raises(FileNotFoundError, match="missing.png"):
        media.load_image(tmp_path / "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.png"):
        media.load_image(broken)
    inputs = media.encode_prompts(processor, items("padded_batch"))
    model = make_sparse(load())
    ids = inputs["input_ids"].clone()
    ids[1, (ids[1] == model.config.image_token_id).nonzero()[0, 0]] = ids[1, -1]  # sample 1 loses an image token
    with pytest.raises(ValueError, match="sample 1"):
        generate(model, {**inputs, "input_ids": ids}, 0.9, SamplingConfig(2, do_sample=False))


def test_gradient_tolerance_scales_with_the_gradients_magnitude():
    """The case another CPU produced: one of 30,016 elements of embed_tokens.weight.grad off by 1.67e-5, in gradients
    up to 12.2 (a bare atol=1e-5 failed it); an error of 1e-3 in the same gradients must still fail."""
    grads = torch.linspace(-12.2, 12.2, 30_016).reshape(-1, 32)
    grads[7, 3] = 1e-4  # a sum that cancels to almost nothing: rtol alone does not cover its rounding
    rounded = grads.clone()
    rounded[7, 3] += 1.67e-5
    assert_close_to_scale(rounded, grads, atol=1e-5, rtol=1e-4)
    wrong = grads.clone()
    wrong[7, 3] += 1e-3
    with pytest.raises(AssertionError):
        assert_close_to_scale(wrong, grads, atol=1e-5, rtol=1e-4)
