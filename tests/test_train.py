"""train.py on a tiny random Qwen2.5-VL and a few toy rows read back through data.py.

Checks: a 3-step run updates the language model (not the frozen vision tower), logs finite losses and the rollouts'
token ratios, and writes a checkpoint plain transformers loads; the group gate (an all-wrong group earns no efficiency
reward, so nothing is learned from it); gradients with gradient checkpointing equal those without; --resume after an
interruption reproduces the next step's metrics; a model missing offline is one line, no traceback.
"""
import dataclasses
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from zipr1_support import data
import grpo
from zipr1_support import media
from zipr1_support import run_dir
import learned_sparsity
import sparse_qwen
import toy
import train
from rollout import eos_ids_of, score_completions

REPO = Path(__file__).resolve().parents[1]
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             vision_hidden_size=32, vision_depth=1, vision_heads=1)
TIMING_KEYS = ("tokens_per_s", "seconds")


def assert_close_to_scale(got, want, atol, rtol, **kw):
    """assert_close with `atol` per unit of magnitude (times max(1, max|want|)): fp32 sums carry rounding that grows
    with their size and differs between CPUs, so a bare atol on large sums fails on some machines."""
    scale = max(1.0, float(want.detach().abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, atol=atol * scale, rtol=rtol, **kw)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model_dir = toy.build_tiny_model_dir(root / "model", seed=0, **SIZES)
    jsonl = toy.write_toy_dataset(root / "data", 4, seed=3, kinds=("color", "video"))
    return model_dir, jsonl


def config(sources, out, **kw):
    model_dir, jsonl = sources
    base = dict(model=str(model_dir), dataset=str(jsonl), num_generations=4, per_step_questions=1, max_completion_length=3,
                learning_rate=1e-2, max_steps=3, save_steps=2, output_dir=str(out), disable_tqdm=True, max_frames=4)
    return train.check_config(train.Config(**{**base, **kw}))


def weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


def test_three_step_run_updates_the_policy_and_logs_tau(sources, tmp_path):
    cfg = config(sources, tmp_path / "run", gate_efficiency=False)  # v1 reward: advantages from tau alone
    metrics = train.train(cfg)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == metrics
    assert all(torch.isfinite(torch.tensor(m["loss"])) and m["kl"] >= 0 for m in metrics)
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 0
    before, after = weights(sources[0]), weights(tmp_path / "run" / "checkpoint-3")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.layers.") for k in changed)  # the text decoder learned
    assert changed and not any("visual" in k for k in changed)  # freeze_vision

    # the logged tau is the step-1 rollout's: regenerate it from the initial weights and the same seed
    table = data.load_dataset_rows(cfg.dataset)
    rows = [table.rows[i] for i in data.question_indices(len(table), 0, 1, cfg.seed)]
    policy, processor = train.load_policy(sources[0], cfg, "cpu"), media.load_processor(sources[0])
    rollout, _ = train.sample_rollout(policy, processor, rows, cfg, 0, "cpu", train.contextlib.nullcontext())
    tau = (rollout.kept.float() / rollout.lengths[:, None]).mean(1)  # τ (§2.1) by hand: mean_j k_j / l
    assert torch.allclose(rollout.token_ratio, tau)
    assert metrics[0]["tau"] == pytest.approx(tau.mean().item(), rel=1e-5)
    assert rollout.keep_p.tolist() == pytest.approx(list(train.PAPER_KEEP_P_GRID[:4]))
    assert metrics[0]["tau_by_keep_p"] == pytest.approx({f"{p:.3f}": t for p, t in zip(train.PAPER_KEEP_P_GRID,
                                                                                      tau.tolist())}, rel=1e-5)
    assert metrics[0]["reward"] == pytest.approx(1 - tau.mean().item(), rel=1e-5)  # all wrong, no gate: 1 - tau

    # the checkpoint loads with plain transformers (stock attention) in a fresh process
    code = ("import sys; from transformers import AutoModelForImageTextToText as M; "
            "m = M.from_pretrained(sys.argv[1]); assert 'sparse_qwen' not in sys.modules; "
            "print(m.config.text_config._attn_implementation)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run" / "checkpoint-3")], capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    assert out.stdout.strip() == "sdpa"


def test_all_wrong_group_earns_no_efficiency_reward(sources, tmp_path):
    gated = train.train(config(sources, tmp_path / "gated", max_steps=1, beta=0.0))[0]
    assert gated["accuracy"] == 0.0  # the untrained model answers nothing right
    assert gated["reward"] == 0.0 and gated["gate"] == 0.0 and gated["zero_std_groups"] == 1.0
    assert gated["kl"] is None  # beta = 0: no reference model
    assert all(torch.equal(weights(sources[0])[k], v) for k, v in weights(tmp_path / "gated" / "checkpoint-1").items())
    ungated = train.train(config(sources, tmp_path / "v1", max_steps=1, beta=0.0, gate_efficiency=False))[0]
    assert ungated["reward"] == pytest.approx(1 - ungated["tau"]) and ungated["zero_std_groups"] == 0.0
    assert not all(torch.equal(weights(sources[0])[k], v) for k, v in weights(tmp_path / "v1" / "checkpoint-1").items())


def test_media_encoded_once_per_group_give_the_rollout_of_per_row_copies(sources, tmp_path):
    """Frozen vision: one vision pass per question (batching.repeat_prompts). Trained vision: pixels per row, and the
    vision tower learns. Both give the same first rollout from the same weights."""
    frozen, trained = config(sources, tmp_path / "a"), config(sources, tmp_path / "b", freeze_vision=False, max_steps=1)
    table = data.load_dataset_rows(frozen.dataset)
    rows = [table.rows[i] for i in data.question_indices(len(table), 0, 1, frozen.seed)]
    processor, none = media.load_processor(sources[0]), train.contextlib.nullcontext()
    shared, _ = train.sample_rollout(train.load_policy(sources[0], frozen, "cpu"), processor, rows, frozen, 0, "cpu",
                                     none)
    copied, _ = train.sample_rollout(train.load_policy(sources[0], trained, "cpu"), processor, rows, trained, 0,
                                     "cpu", none)
    assert "mm_encoder_outputs" in shared.inputs and "mm_encoder_outputs" not in copied.inputs
    assert torch.equal(shared.completion_ids, copied.completion_ids)
    torch.testing.assert_close(shared.token_ratio, copied.token_ratio)
    assert_close_to_scale(shared.logprobs, copied.logprobs, atol=1e-5, rtol=0)
    train.train(trained)
    before, after = weights(sources[0]), weights(tmp_path / "b" / "checkpoint-1")
    assert any("visual" in k and not torch.equal(before[k], after[k]) for k in before)


def _gradients(policy, reference, rollout, advantages, cfg, gates=None, targets=None):
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)  # keeps the weights: gradients stay in .grad
    train.policy_update(policy, reference, optimizer, rollout, advantages, cfg, train.contextlib.nullcontext(),
                        gates=gates, targets=targets)
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sparsity_coef, entry", [(0.0, "activation"), (2.0, "activation"), (2.0, "gradient")])
@pytest.mark.filterwarnings("ignore:.gradient_checkpointing_enable. is deprecated:FutureWarning")  # the fallback
def test_gradient_checkpointing_gives_the_same_gradients(sources, tmp_path, sparsity_coef, entry, monkeypatch):
    """Also with the relaxed τ̃ term: one scoring state serves the forward and the recomputation in backward.
    entry "gradient": transformers < 5.23 has no activation_checkpointing_enable, and sparse_qwen.enable_checkpointing
    falls back to gradient_checkpointing_enable(use_reentrant=False): the same gradients too."""
    if entry == "gradient":
        monkeypatch.setattr(sparse_qwen, "ACTIVATION_CHECKPOINTING", "a_method_transformers_5_17_lacks")
    cfg = config(sources, tmp_path, gradient_checkpointing=False, keep_p_grid=(0.5, 0.7, 0.9, 1.0),
                 sparsity_coef=sparsity_coef, sparsity_temperature=0.05)
    table = data.load_dataset_rows(cfg.dataset)
    processor = media.load_processor(sources[0])
    plain = train.load_policy(sources[0], cfg, "cpu")
    checkpointed = train.load_policy(sources[0], dataclasses.replace(cfg, gradient_checkpointing=True), "cpu")
    reference = train.load_reference(sources[0], cfg, "cpu")
    rollout, _ = train.sample_rollout(plain, processor, table.rows[1:2], cfg, 0, "cpu", train.contextlib.nullcontext())
    assert rollout.token_ratio.min() < 1  # real sparsity, so a dense recomputation would differ
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    want = _gradients(plain, reference, rollout, advantages, cfg)
    got = _gradients(checkpointed, reference, rollout, advantages, cfg)
    assert checkpointed.model.language_model.layers[0].gradient_checkpointing and want.keys() == got.keys()
    for name in want:
        assert_close_to_scale(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)

    # the state travels as a call keyword (sparse_kwargs), so a backward outside any block recomputes the layers
    # sparse too: the same gradients as without checkpointing (a dense recomputation is a CheckpointError)
    for model in (plain, checkpointed):
        model.zero_grad(set_to_none=True)
        logp = score_completions(model, rollout)
        grpo.grpo_loss(logp, None, None, advantages, rollout.completion_mask, beta=0.0)[0].backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        if p.grad is not None:
            assert_close_to_scale(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_mask_truncated_completions_leaves_truncated_answers_out_of_the_loss(sources, tmp_path, monkeypatch):
    """TRL's mask_truncated_completions: a truncated answer adds nothing, exactly as if its advantage were 0 (β = 0,
    loss_type grpo keeps the row in the mean). Also: epsilon_high and scale_rewards reach grpo.py."""
    cfg = config(sources, tmp_path, beta=0.0, keep_p_grid=(0.5, 0.7, 0.9, 1.0), max_completion_length=4)
    processor, table = media.load_processor(sources[0]), data.load_dataset_rows(cfg.dataset)
    policy = train.load_policy(sources[0], cfg, "cpu")
    rollout, _ = train.sample_rollout(policy, processor, table.rows[:1], cfg, 0, "cpu", train.contextlib.nullcontext())
    eos = torch.tensor(eos_ids_of(policy))
    assert torch.equal(rollout.truncated, ~torch.isin(rollout.completion_ids, eos).any(-1))  # no EOS: truncated
    rollout = dataclasses.replace(rollout, truncated=torch.tensor([True, False, True, False]))
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    masked = _gradients(policy, None, rollout, advantages, dataclasses.replace(cfg, mask_truncated_completions=True))
    zeroed = _gradients(policy, None, rollout, advantages * torch.tensor([0.0, 1.0, 0.0, 1.0]), cfg)
    plain = _gradients(policy, None, rollout, advantages, cfg)
    assert masked.keys() == zeroed.keys()
    for name in masked:
        assert_close_to_scale(masked[name], zeroed[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.allclose(masked[n], plain[n]) for n in masked)

    seen = {}
    def recording_loss(*args, **kwargs):
        seen.update(epsilon_high=args[6] if len(args) > 6 else kwargs.get("epsilon_high"))
        return grpo.grpo_loss.__wrapped__(*args, **kwargs)
    recording_loss.__wrapped__ = grpo.grpo_loss
    monkeypatch.setattr(grpo, "grpo_loss", recording_loss)
    _gradients(policy, None, rollout, advantages, dataclasses.replace(cfg, epsilon_high=0.28))
    assert seen["epsilon_high"] == 0.28
    monkeypatch.setattr(grpo, "group_advantages", lambda r, n, scale: seen.update(scale=scale) or torch.zeros_like(r))
    train.train(config(sources, tmp_path / "none", max_steps=1, scale_rewards="none"))
    assert seen["scale"] == "none"


def _rollout(sources, cfg, keep_p_grid=(0.5, 0.7, 0.9, 1.0)):
    cfg = dataclasses.replace(cfg, keep_p_grid=keep_p_grid)
    table, processor = data.load_dataset_rows(cfg.dataset), media.load_processor(sources[0])
    policy = train.load_policy(sources[0], cfg, "cpu")
    rollout, _ = train.sample_rollout(policy, processor, table.rows[1:2], cfg, 0, "cpu", train.contextlib.nullcontext())
    return policy, rollout


def test_lambda_zero_makes_the_update_of_the_objective_without_the_term(sources, tmp_path, monkeypatch):
    """λ = 0 (τ̃ still computed and logged) gives bit for bit the weights of the update with no relaxed count at
    all (the scoring state of the literal recipe); λ > 0 changes them."""
    base = dict(max_steps=1, gate_efficiency=False, keep_p_grid=(0.5, 0.7, 0.9, 1.0), sparsity_temperature=0.05)
    logged = train.train(config(sources, tmp_path / "zero", **base))[0]
    pushed = train.train(config(sources, tmp_path / "pushed", sparsity_coef=1.0, **base))[0]
    plain_state = train.scoring_state
    monkeypatch.setattr(train, "scoring_state", lambda model, rollout, **kw: plain_state(model, rollout))
    literal = train.train(config(sources, tmp_path / "literal", **base))[0]
    assert "tau_relaxed" not in literal and 0 < logged["tau_relaxed"] < 1 and logged["sparsity_loss"] == 0
    assert pushed["sparsity_loss"] > 0 and logged["tau_relaxed"] == pytest.approx(pushed["tau_relaxed"], rel=1e-6)
    zero, plain, moved = (weights(tmp_path / r / "checkpoint-1") for r in ("zero", "literal", "pushed"))
    assert all(torch.equal(zero[k], plain[k]) for k in plain)
    assert any(not torch.equal(moved[k], plain[k]) for k in plain)


def test_sparsity_term_is_exactly_zero_at_p_one_and_with_the_gate_off(sources, tmp_path):
    cfg = config(sources, tmp_path, sparsity_temperature=0.05, beta=0.0)
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    policy, dense = _rollout(sources, cfg, keep_p_grid=(1.0,))
    without = _gradients(policy, None, dense, advantages, cfg)
    with_term = _gradients(policy, None, dense, advantages, dataclasses.replace(cfg, sparsity_coef=5.0))
    assert all(torch.equal(without[k], with_term[k]) for k in without)  # p = 1 rows: nothing to sparsify
    policy, sparse = _rollout(sources, cfg)
    without = _gradients(policy, None, sparse, advantages, cfg)
    strong = dataclasses.replace(cfg, sparsity_coef=5.0)
    gated_off = _gradients(policy, None, sparse, advantages, strong, gates=torch.zeros(4))
    assert all(torch.equal(without[k], gated_off[k]) for k in without)  # C = 0: no push
    gated_on = _gradients(policy, None, sparse, advantages, strong, gates=torch.ones(4))
    assert any(not torch.equal(without[k], gated_on[k]) for k in without)


def test_gradual_targets_reach_the_loss_and_the_log(sources, tmp_path):
    """sparsity_target_steps: each step's loss hinges τ̃ at that step's scheduled targets (the same gradients as a
    config holding those targets), and metrics.jsonl logs them."""
    cfg = config(sources, tmp_path / "run", sparsity_temperature=0.05, beta=0.0, sparsity_coef=1.0,
                 sparsity_gate="none", sparsity_target=0.1, sparsity_target_steps=30)
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    policy, rollout = _rollout(sources, cfg, keep_p_grid=(0.5, 0.6, 0.7, 0.8))
    targets = train.sparsity_targets_at(0.1, [], 30, 0)  # step 1 of 30: τ* = 0.1 + 0.9 (29/30)³ = 0.91
    state = train.scoring_state(policy, rollout, relaxed_temperature=0.05)
    with torch.no_grad():
        score_completions(policy, rollout, state=state)
    assert 0.1 < state.relaxed_token_ratio().min() and state.relaxed_token_ratio().max() < targets[0]
    scheduled = _gradients(policy, None, rollout, advantages, cfg, targets=targets)
    held = _gradients(policy, None, rollout, advantages, dataclasses.replace(cfg, sparsity_target=targets[0]))
    literal = _gradients(policy, None, rollout, advantages, dataclasses.replace(cfg, sparsity_coef=0.0))
    unscheduled = _gradients(policy, None, rollout, advantages, cfg)
    assert all(torch.equal(scheduled[k], held[k]) and torch.equal(scheduled[k], literal[k]) for k in held)
    assert any(not torch.equal(scheduled[k], unscheduled[k]) for k in held)  # at τ* 0.1 the term pushes
    layered = config(sources, tmp_path / "layers", sparsity_coef=1.0, sparsity_layer_targets=[0.6, 0.2],
                     sparsity_target_steps=2, max_steps=3)
    logged = [m["sparsity_target"] for m in train.train(layered)]
    assert logged == pytest.approx([0.4 + 0.6 / 8, 0.4, 0.4])  # the mean of the layers' scheduled targets


def ema_reference(accuracies, decay):
    """Each step's running mean in closed form: m_t = d^t a_0 + sum_{i=1..t} (1 - d) d^(t-i) a_i."""
    a = np.asarray(accuracies, dtype=float)
    return [decay ** t * a[0] + sum((1 - decay) * decay ** (t - i) * a[i] for i in range(1, t + 1))
            for t in range(len(a))]


def test_compression_clock_counts_the_steps_at_which_the_accuracy_held():
    # by hand, decay 0.5: running means 0.5, 0.7, 0.6, 0.75; best 0.5, 0.7, 0.7, 0.75; 0.6 < 0.7 - 0.05 waits
    assert [train.compression_clock([0.5, 0.9, 0.5, 0.9][:t], 0.05, decay=0.5) for t in range(5)] == [0, 1, 2, 2, 3]
    assert train.compression_clock([0.5, 0.9, 0.5, 0.9], 0.0) == 4  # 0: every step
    rng = np.random.default_rng(0)
    for _ in range(20):  # against the closed-form running mean and a best-so-far brute force
        accs, hold = rng.uniform(0.5, 1.0, size=int(rng.integers(1, 40))).round(3), float(rng.uniform(0.005, 0.1))
        means = ema_reference(accs, 0.9)
        want = sum(means[t] >= max(means[:t + 1]) - hold for t in range(len(accs)))
        assert train.compression_clock(list(accs), hold, decay=0.9) == want


def test_cycles_alternate_compression_and_recovery_and_the_clock_waits_in_recovery():
    # cycles of 4 steps ending with 1 recovery step: steps 3, 7, 11 recover
    assert [train.compressing(s, 4, 1) for s in range(9)] == [True] * 3 + [False] + [True] * 3 + [False, True]
    assert all(train.compressing(s, 0, 0) for s in range(9))  # 0: λ on every step
    rng = np.random.default_rng(1)
    for _ in range(20):  # the clock counts the steps that compressed and held, brute force
        accs, hold = rng.uniform(0.5, 1.0, size=int(rng.integers(1, 40))).round(3), float(rng.uniform(0.0, 0.1))
        on = list(rng.random(len(accs)) < 0.7)
        means = ema_reference(accs, 0.9)
        want = sum(bool(on[t]) and (hold == 0 or means[t] >= max(means[:t + 1]) - hold) for t in range(len(accs)))
        assert train.compression_clock(list(accs), hold, decay=0.9, compressed=on) == want


def test_cycles_switch_the_term_off_in_recovery_and_resume_exactly(sources, tmp_path):
    """--sparsity_cycle_steps 2 --sparsity_recovery_steps 1: λ on at steps 0, 2 and off at 1, 3 (Eq. 5 alone);
    the targets' clock counts only the compressing steps; a resumed run rebuilds it."""
    out = tmp_path / "run"
    cfg = config(sources, out, max_steps=4, sparsity_coef=1.0, sparsity_layer_targets=[0.6, 0.2],
                 sparsity_target_steps=4, sparsity_cycle_steps=2, sparsity_recovery_steps=1, beta=0.0)
    full = train.train(cfg)
    assert [m["sparsity_coef"] for m in full] == [1.0, 0.0, 1.0, 0.0]
    assert [m["sparsity_clock"] for m in full] == [0, 1, 1, 2]
    assert [m["sparsity_loss"] for m in full][1::2] == [0.0, 0.0]
    assert [m["sparsity_target"] for m in full] == pytest.approx(
        [sum(train.sparsity_targets_at(0.0, [0.6, 0.2], 4, c)[1]) / 2 for c in (0, 1, 1, 2)])
    shutil.rmtree(out / "checkpoint-4")
    resumed = train.train(dataclasses.replace(cfg, resume_from_checkpoint="last"))
    assert (resumed[3]["sparsity_coef"], resumed[3]["sparsity_clock"]) == (0.0, 2)


def test_accuracy_hold_paces_the_targets_and_resumes_exactly(sources, tmp_path, monkeypatch):
    """--sparsity_accuracy_hold: a step's targets are sparsity_targets_at the clock of the steps before it, which
    stops on a step whose running accuracy fell more than the hold below its best; a resumed run rebuilds it from
    metrics.jsonl."""
    scripted = iter([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # steps 1-3, then step 3 again on resume
    monkeypatch.setattr(train.rewards, "accuracy_rewards", lambda texts, *a: torch.full((len(texts),), next(scripted)))
    out = tmp_path / "run"
    cfg = config(sources, out, sparsity_coef=1.0, sparsity_layer_targets=[0.6, 0.2], sparsity_target_steps=4,
                 sparsity_accuracy_hold=0.01, beta=0.0)
    full = train.train(cfg)
    # running means 1, 0.98, 0.9604: step 1 held (clock 1 at step 2), step 2 did not (clock 1 at step 3 too)
    assert [m["sparsity_clock"] for m in full] == [0, 1, 1]
    assert [m["sparsity_target"] for m in full] == pytest.approx(
        [sum(train.sparsity_targets_at(0.0, [0.6, 0.2], 4, c)[1]) / 2 for c in (0, 1, 1)])
    shutil.rmtree(out / "checkpoint-3")
    scripted = iter([0.0])
    resumed = train.train(dataclasses.replace(cfg, resume_from_checkpoint="last"))
    assert resumed[2]["sparsity_clock"] == 1
    assert resumed[2]["sparsity_target"] == pytest.approx(full[2]["sparsity_target"])
    scripted = iter([1.0, 0.0, 0.0])
    unpaced = train.train(config(sources, tmp_path / "unpaced", sparsity_coef=1.0, sparsity_layer_targets=[0.6, 0.2],
                                 sparsity_target_steps=4, beta=0.0))
    assert "sparsity_clock" not in unpaced[2] and unpaced[2]["sparsity_target"] < full[2]["sparsity_target"]


def test_straight_through_selection_keeps_the_log_probs_and_adds_a_gradient(sources, tmp_path):
    """selection_straight_through: the teacher forward gives the rollout's log-probs (the hard selection), and Eq. 5's
    gradient now also reaches the probe scores that chose the tokens: the update differs from the literal one."""
    cfg = config(sources, tmp_path, beta=0.0)
    policy, rollout = _rollout(sources, cfg, keep_p_grid=(0.5, 0.6, 0.7, 1.0))
    with torch.no_grad():
        plain = score_completions(policy, rollout, state=train.scoring_state(policy, rollout))
        through = score_completions(policy, rollout, state=train.scoring_state(policy, rollout, straight_through=1.0))
    assert torch.allclose(through, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())
    assert torch.allclose(through, rollout.logprobs, rtol=1e-4, atol=1e-4 * plain.abs().max().item())
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    literal = _gradients(policy, None, rollout, advantages, cfg)
    straight = _gradients(policy, None, rollout, advantages, dataclasses.replace(cfg, selection_straight_through=1.0))
    differs = {k for k in literal
               if not torch.allclose(literal[k], straight[k], rtol=1e-4, atol=1e-6 * literal[k].abs().max().item())}
    assert any("q_proj" in k or "k_proj" in k for k in differs), differs  # the probe scores' weights


def test_a_zero_probe_scorer_is_zipvls_selection_and_weights_move_which_tokens_not_how_many(sources, tmp_path):
    """--probe_scorer: zeros reproduce the rollout of the model without one (same tokens, same log-probs); scorer
    weights reorder layer 0's kept tokens while it keeps as many (later layers see other hidden states)."""
    cfg = config(sources, tmp_path, beta=0.0)
    plain_policy, plain = _rollout(sources, cfg)
    scored = dataclasses.replace(cfg, probe_scorer=True, selection_straight_through=1.0)
    policy, zero = _rollout(sources, scored)
    assert torch.equal(zero.completion_ids, plain.completion_ids) and torch.equal(zero.logprobs, plain.logprobs)
    with torch.no_grad():
        for attn in learned_sparsity.decoder_attentions(policy):
            attn.zipr1_probe_scorer.normal_(0, 3, generator=torch.Generator().manual_seed(attn.layer_idx))
        before = train.scoring_state(plain_policy, zero)
        after = train.scoring_state(policy, zero)
        score_completions(plain_policy, zero, state=before)
        score_completions(policy, zero, state=after)
    assert torch.equal(after.kept()[:, 0], before.kept()[:, 0])  # Eq. 3's count of layer 0 (same inputs): unchanged
    assert not torch.equal(after.selection_masks()[:, 0], before.selection_masks()[:, 0])  # which tokens: moved


def test_probe_scorer_learns_through_the_straight_through_selection_saves_beside_the_weights_and_resumes(
        sources, tmp_path):
    """The scorer gets Eq. 5's gradient only through the straight-through selection; checkpoints keep it in
    probe_scorer.safetensors (model.safetensors stays plain transformers'), make_sparse loads it, and a resumed run
    takes the same step."""
    with pytest.raises(train.ConfigError, match="selection_straight_through > 0, got 0.0"):
        config(sources, tmp_path / "bad", probe_scorer=True)
    cfg = config(sources, tmp_path / "run", probe_scorer=True, selection_straight_through=1.0, beta=0.0,
                 keep_p_grid=(0.5, 0.6, 0.7, 1.0), gate_efficiency=False)  # v1 reward: nonzero advantages
    policy, rollout = _rollout(sources, cfg)
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    scorer = lambda grads: {k: g for k, g in grads.items() if "zipr1_probe_scorer" in k}  # noqa: E731
    assert all(g.abs().max() > 0 for g in scorer(_gradients(policy, None, rollout, advantages, cfg)).values())
    assert len(scorer(_gradients(policy, None, rollout, advantages, cfg))) == 2  # every layer's
    literal = dataclasses.replace(cfg, selection_straight_through=0.0)  # the hard selection alone: no gradient
    assert not scorer(_gradients(policy, None, rollout, advantages, literal))
    full = train.train(cfg)
    saved = load_file(str(tmp_path / "run" / "checkpoint-3" / sparse_qwen.SCORER_FILE))
    assert sorted(saved) == ["layers.0", "layers.1"] and all(w.shape == (1, 16) and w.abs().max() > 0
                                                              for w in saved.values())  # trained from zeros
    assert not any("zipr1" in k for k in weights(tmp_path / "run" / "checkpoint-3"))
    from transformers import AutoModelForImageTextToText
    loaded = sparse_qwen.make_sparse(AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "checkpoint-3"))
    for j, attn in enumerate(learned_sparsity.decoder_attentions(loaded)):
        assert torch.equal(attn.zipr1_probe_scorer.detach(), saved[f"layers.{j}"])
    shutil.rmtree(tmp_path / "run" / "checkpoint-3")
    resumed = train.train(dataclasses.replace(cfg, resume_from_checkpoint="last"))
    assert resumed[2]["loss"] == pytest.approx(full[2]["loss"], rel=1e-4)
    again = load_file(str(tmp_path / "run" / "checkpoint-3" / sparse_qwen.SCORER_FILE))
    for name in saved:
        assert_close_to_scale(again[name], saved[name], atol=1e-5, rtol=1e-4)
    still = train.train(dataclasses.replace(cfg, output_dir=str(tmp_path / "still"), max_steps=1, save_steps=1,
                                            probe_scorer_learning_rate=0.0))  # its own rate: here 0, the model 1e-2
    assert still[0]["loss"] == pytest.approx(full[0]["loss"], rel=1e-4)  # the same first step otherwise
    assert all(w.abs().max() == 0 for w in load_file(str(tmp_path / "still" / "checkpoint-1" /
                                                          sparse_qwen.SCORER_FILE)).values())
    assert any(not torch.equal(w, weights(sources[0])[k]) for k, w in weights(tmp_path / "still" / "checkpoint-1").items())


def test_a_probe_scorer_file_that_does_not_fit_the_model_is_one_line(sources, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText
    shutil.copytree(sources[0], tmp_path / "model")
    save_file({"layers.0": torch.zeros(1, 16), "layers.1": torch.zeros(2, 8)},
              str(tmp_path / "model" / sparse_qwen.SCORER_FILE))
    with pytest.raises(ValueError, match=r"probe_scorer.safetensors: expected 2 probe scorers layers.0..1 of shape "
                                         r"\(1, 16\), got \[\('layers.0', \(1, 16\)\), \('layers.1', \(2, 8\)\)\]"):
        sparse_qwen.make_sparse(AutoModelForImageTextToText.from_pretrained(tmp_path / "model"))


def test_the_relaxed_term_alone_lowers_the_token_ratio(sources, tmp_path):
    """Zero advantages and no KL: the update is λ·∇τ̃ only. A few steps lower τ̃ and the hard τ of the same
    selection rule (the term pulls attention onto fewer keys)."""
    cfg = config(sources, tmp_path, sparsity_coef=1.0, sparsity_temperature=0.05, beta=0.0, learning_rate=3e-2,
                 sparsity_gate="none")
    policy, rollout = _rollout(sources, cfg, keep_p_grid=(0.6, 0.7, 0.8, 0.9))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate)
    history = [train.policy_update(policy, None, optimizer, rollout, torch.zeros(4), cfg,
                                   train.contextlib.nullcontext()) for _ in range(6)]
    state = train.scoring_state(policy, rollout, relaxed_temperature=0.05)
    with torch.no_grad():
        score_completions(policy, rollout, state=state)
    assert history[-1]["tau_relaxed"] < history[0]["tau_relaxed"] - 0.02
    assert state.token_ratio().mean() < rollout.token_ratio.mean() - 0.02  # the hard count fell too


def test_sparsity_gates_and_warmup():
    assert [train.sparsity_coef_at(0.4, 4, s) for s in (0, 1, 3, 10)] == pytest.approx([0.1, 0.2, 0.4, 0.4])
    assert train.sparsity_coef_at(0.4, 0, 0) == 0.4  # no warm-up: λ from the first step
    # gradual targets, by hand: τ*_t = τ* + (1 − τ*)(1 − (t+1)/S)³ with S = 4
    schedule = [train.sparsity_targets_at(0.3, [0.9, 0.2], 4, s) for s in (0, 1, 3, 10)]
    assert [t for t, _ in schedule] == pytest.approx([0.3 + 0.7 * 27 / 64, 0.3 + 0.7 / 8, 0.3, 0.3])
    assert schedule[1][1] == pytest.approx([0.9 + 0.1 / 8, 0.2 + 0.8 / 8]) and schedule[2][1] == [0.9, 0.2]
    assert train.sparsity_targets_at(0.3, [0.5], 0, 0) == (0.3, [0.5])  # 0 steps: the targets from the first step
    acc, parts = torch.tensor([1.0, 0.0, 0.0, 0.0]), {"gate": torch.tensor([1.0, 1.0, 0.0, 0.0])}
    assert train.sparsity_gates("group", parts, acc).tolist() == [1, 1, 0, 0]
    assert train.sparsity_gates("answer", parts, acc).tolist() == [1, 0, 0, 0]
    assert train.sparsity_gates("none", parts, acc).tolist() == [1, 1, 1, 1]
    acc6 = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.6, 0.9, 0.7])  # three groups of 3; graded from 0.5
    assert train.sparsity_gates("all", {}, acc6, 1.0, 3).tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert train.sparsity_gates("all", {}, acc6, 0.5, 3).tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 1]
    tau, p = torch.tensor([[0.5], [0.3], [0.5], [0.9]]), torch.tensor([0.9, 0.9, 1.0, 0.9])  # (N, 1 layer)
    assert train.sparsity_term(tau, torch.ones(4), p, 0.4).tolist() == pytest.approx([0.1, 0.0, 0.0, 0.5])


def test_sparsity_term_per_layer_hinge_and_skipped_layers():
    """Hand-computed: layers (0.8, 0.1, 0.3), target 0.25. The mean hinge pushes 0.4 − 0.25; the per-layer hinge
    averages (0.55, 0, 0.05); skipping layer 0 leaves (0.1, 0.3): mean 0.2 (no push) or per layer (0 + 0.05) / 2."""
    tau, gate, p = torch.tensor([[0.8, 0.1, 0.3]]), torch.ones(1), torch.tensor([0.95])
    term = lambda **kw: train.sparsity_term(tau, gate, p, 0.25, **kw).item()  # noqa: E731
    assert term() == pytest.approx(0.15) and term(per_layer=True) == pytest.approx(0.2)
    assert term(skip_layers=[0]) == 0.0 and term(per_layer=True, skip_layers=[0]) == pytest.approx(0.025)
    grad = torch.autograd.grad(train.sparsity_term(tau.requires_grad_(), gate, p, 0.25, per_layer=True,
                                                   skip_layers=[0]).sum(), tau)[0]
    assert grad.tolist() == [[0.0, 0.0, 0.5]]  # only the skipped-in layer above the target is pushed
    # a target per layer (0.5, 0.2, 0.2): hinges (0.3, 0, 0.1) averaged; skipping layer 0 leaves (0 + 0.1) / 2
    assert term(layer_targets=[0.5, 0.2, 0.2]) == pytest.approx(0.4 / 3)
    assert term(layer_targets=[0.5, 0.2, 0.2], skip_layers=[0]) == pytest.approx(0.05)
    grad = torch.autograd.grad(train.sparsity_term(tau, gate, p, 0.25, layer_targets=[0.5, 0.2, 0.2]).sum(), tau)[0]
    assert grad[0].tolist() == pytest.approx([1 / 3, 0.0, 1 / 3])


def test_sparsity_term_layer_floors_pull_a_layer_back_up():
    """Hand-computed: layers (0.8, 0.1, 0.3), targets (0.5, 0.2, 0.2) give hinges (0.3, 0, 0.1); floors (0, 0.15, 0)
    add (0, 0.05, 0), so the term is 0.45 / 3 and layer 1's gradient is −1/3: the loss falls as τ̃_1 rises."""
    tau, gate, p = torch.tensor([[0.8, 0.1, 0.3]], requires_grad=True), torch.ones(1), torch.tensor([0.95])
    band = train.sparsity_term(tau, gate, p, 0.25, layer_targets=[0.5, 0.2, 0.2], layer_floors=[0.0, 0.15, 0.0])
    assert band.item() == pytest.approx(0.45 / 3)
    assert torch.autograd.grad(band.sum(), tau)[0][0].tolist() == pytest.approx([1 / 3, -1 / 3, 1 / 3])
    above = train.sparsity_term(tau, gate, p, 0.25, layer_targets=[0.5, 0.2, 0.2], layer_floors=[0.0, 0.05, 0.0])
    assert above.item() == pytest.approx(0.4 / 3)  # τ̃_1 = 0.1 is above a floor of 0.05: no pull
    dense = train.sparsity_term(tau, gate, torch.tensor([1.0]), 0.25, layer_floors=[0.0, 0.15, 0.0])
    assert dense.item() == 0.0  # p = 1 rows carry no term, floors included


def test_sparsity_layer_floors_are_checked(sources, tmp_path):
    with pytest.raises(train.ConfigError, match="sparsity_layer_floors must each be in \\[0, 1\\)"):
        train.check_config(train.Config(sparsity_layer_floors=[0.0, -0.1]))
    with pytest.raises(train.ConfigError, match="must each be at most the layer's target"):
        train.check_config(train.Config(sparsity_layer_targets=[0.5, 0.2], sparsity_layer_floors=[0.0, 0.3]))
    with pytest.raises(train.ConfigError, match="sparsity_layer_floors has 3 values; the model has 2 decoder layers"):
        train.train(config(sources, tmp_path, sparsity_coef=1.0, sparsity_layer_floors=[0.0, 0.1, 0.1]))


def test_sparsity_skip_layers_are_checked_against_the_model(sources, tmp_path):
    with pytest.raises(train.ConfigError, match="sparsity_skip_layers=\\[9\\] must name some, not all"):
        train.train(config(sources, tmp_path, sparsity_coef=1.0, sparsity_skip_layers=[9]))
    with pytest.raises(train.ConfigError, match="layer indices >= 0"):
        train.check_config(train.Config(sparsity_skip_layers=[-1]))
    with pytest.raises(train.ConfigError, match="sparsity_layer_targets has 3 values; the model has 2 decoder layers"):
        train.train(config(sources, tmp_path, sparsity_coef=1.0, sparsity_layer_targets=[0.5, 0.2, 0.2]))
    with pytest.raises(train.ConfigError, match="sparsity_layer_targets must each be in \\[0, 1\\)"):
        train.check_config(train.Config(sparsity_layer_targets=[0.5, 1.0, 0.2, 0.2]))


def test_questions_rolled_out_together_or_apart_make_the_same_step(sources, tmp_path):
    """Batching a step's questions into one rollout (row-seeded sampling, split per group for the update) changes
    nothing: metrics and the updated weights equal those of one question per rollout batch."""
    base = dict(max_steps=1, per_step_questions=2, gate_efficiency=False, keep_p_grid=(0.5, 0.7, 0.9, 1.0))
    apart = train.train(config(sources, tmp_path / "apart", rollout_questions=1, **base))[0]
    together = train.train(config(sources, tmp_path / "together", **base))[0]  # 0: both questions in one batch
    for key in apart:
        if key not in TIMING_KEYS:
            assert together[key] == pytest.approx(apart[key], rel=1e-4, abs=1e-6), key
    one, two = weights(tmp_path / "apart" / "checkpoint-1"), weights(tmp_path / "together" / "checkpoint-1")
    assert any(not torch.equal(one[k], v) for k, v in weights(sources[0]).items())  # the step changed the policy
    for name in one:
        assert_close_to_scale(two[name], one[name], atol=1e-6, rtol=1e-4, msg=name)


def test_cuda_defaults_bf16_autocast_and_checkpointing_run_a_step(sources, tmp_path):
    """The CUDA defaults (bf16 autocast over fp32 master weights, gradient checkpointing), exercised on CPU."""
    cfg = config(sources, tmp_path / "bf16", max_steps=1, bf16=True, gradient_checkpointing=True, gate_efficiency=False)
    metrics = train.train(cfg)[0]
    assert all(torch.isfinite(torch.tensor(float(metrics[k]))) for k in ("loss", "kl", "grad_norm", "tau"))
    before, after = weights(sources[0]), weights(tmp_path / "bf16" / "checkpoint-1")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step updated the policy
    assert {v.dtype for v in after.values()} == {v.dtype for v in before.values()}  # saved in the master dtype


def test_resume_reproduces_the_next_metrics(sources, tmp_path):
    out = tmp_path / "run"
    cfg = config(sources, out, gate_efficiency=False, keep_p_grid=(0.9, 0.95),  # checkpoints at steps 2 and 3
                 sparsity_coef=1.0, sparsity_warmup_steps=3, sparsity_temperature=0.05)  # λ depends on the step
    full = train.train(cfg)
    shutil.rmtree(out / "checkpoint-3")  # interrupted after logging step 3, before saving it
    with pytest.raises(FileExistsError, match="--resume"):
        train.train(cfg)
    resumed = train.train(dataclasses.replace(cfg, resume_from_checkpoint="last"))
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for key in full[2]:
        if key not in TIMING_KEYS:
            assert resumed[2][key] == pytest.approx(full[2][key], rel=1e-5), key
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3  # step 3 logged once
    assert train.train(dataclasses.replace(cfg, resume_from_checkpoint="last")) == resumed  # finished run: nothing more to do


def test_cosine_learning_rate_follows_the_formula_and_resumes_exactly(sources, tmp_path):
    """lr_scheduler_type cosine with warm-up: the logged rate is base·s/w during warm-up, then
    base·½(1 + cos(π (s − w)/(S − w))); a resumed run sets the same rates and reproduces the metrics."""
    out = tmp_path / "run"
    cfg = config(sources, out, gate_efficiency=False, keep_p_grid=(0.9, 0.95), max_steps=4, save_steps=2,
                 lr_scheduler_type="cosine", warmup_steps=1)
    full = train.train(cfg)
    want = [0.0] + [0.5 * (1 + math.cos(math.pi * (s - 1) / 3)) for s in (1, 2, 3)]
    assert [m["learning_rate"] for m in full] == pytest.approx([cfg.learning_rate * w for w in want], rel=1e-6)
    shutil.rmtree(out / "checkpoint-4")
    resumed = train.train(dataclasses.replace(cfg, resume_from_checkpoint="last"))
    for key in full[3]:
        if key not in TIMING_KEYS:
            assert resumed[3][key] == pytest.approx(full[3][key], rel=1e-5), key
    constant = train.train(config(sources, tmp_path / "constant", max_steps=2))
    assert [m["learning_rate"] for m in constant] == [constant[0]["learning_rate"]] * 2 == [1e-2] * 2


def test_config_from_the_command_line():
    toy_cfg = train.parse_config([])
    assert toy_cfg.model == "toy" and toy_cfg.learning_rate == toy.TOY_PRESET["learning_rate"]
    real = train.parse_config(["--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--gate_efficiency", "false", "--bf16",
                               "--keep_p_grid", "0.9,0.975", "--max_steps", "7"])
    assert real.learning_rate == train.Config.learning_rate
    assert real.max_completion_length == train.Config.max_completion_length
    assert (real.gate_efficiency, real.bf16, real.keep_p_grid, real.max_steps) == (False, True, [0.9, 0.975], 7)
    assert train.parse_config(["--keep_p_grid", "0.9", "0.975"]).keep_p_grid == [0.9, 0.975]  # space-separated too
    assert train.parse_config(["--learning_rate", "0.5"]).learning_rate == 0.5  # an explicit value beats the preset
    assert train.PAPER_KEEP_P_GRID == pytest.approx([0.94, 0.945, 0.95, 0.955, 0.96, 0.965, 0.97, 0.975])
    bad_settings = (["--keep_p_grid", "0.9,1.2"], ["--keep_p_low", "1"], ["--num_generations", "1"],
                    ["--rollout_questions", "-1"], ["--sparsity_coef", "-1"], ["--sparsity_temperature", "0"],
                    ["--sparsity_target", "1"], ["--warmup_steps", "-1"], ["--sparsity_skip_layers", "-1"])
    for bad in bad_settings:
        with pytest.raises(train.ConfigError):
            train.parse_config(bad)
    with pytest.raises(train.ConfigError, match="loss_type"):  # what the parser's choices catch on the command line
        train.check_config(train.Config(loss_type="ppo"))
    with pytest.raises(train.ConfigError, match="lr_scheduler_type"):
        train.check_config(train.Config(lr_scheduler_type="polynomial"))


def test_trl_names_old_aliases_and_one_flag_style(capsys):
    """TRL's names; the old ones still work with one deprecation line each; --name-with-dashes equals --name."""
    new = train.parse_config(["--max_completion_length", "5", "--max_steps", "3", "--save_steps", "2",
                              "--resume_from_checkpoint", "--disable_tqdm"])
    assert capsys.readouterr().err == ""
    old = train.parse_config(["--max_new_tokens", "5", "--steps", "3", "--save_every", "2", "--resume",
                              "--progress", "false"])
    warnings = capsys.readouterr().err.strip().splitlines()
    assert new == old and len(warnings) == 5 and all("deprecated" in w for w in warnings)
    assert (new.max_completion_length, new.max_steps, new.save_steps) == (5, 3, 2)
    assert new.resume_from_checkpoint == "last" and new.disable_tqdm  # the bare flag: the newest checkpoint
    assert train.parse_config(["--max-completion-length", "5", "--disable-tqdm", "true"]).max_completion_length == 5
    for value, meant in (("true", "last"), ("last", "last"), ("false", None), ("runs/x/checkpoint-4", "runs/x/checkpoint-4")):
        assert train.parse_config(["--resume_from_checkpoint", value]).resume_from_checkpoint == meant
    assert train.parse_config(["--progress"]).disable_tqdm is False


def test_command_line_errors_are_one_line(capsys):
    for argv, says in ((["--loss_type", "ppo"], "invalid choice: 'ppo'"), (["--max_steps", "x"], "invalid int"),
                       (["--no_such_flag"], "unrecognized arguments: --no_such_flag")):
        with pytest.raises(SystemExit):
            train.parse_config(argv)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err


def test_generation_batch_size_counts_completions():
    cfg = train.parse_config(["--generation_batch_size", "16", "--num_generations", "4"])
    assert cfg.per_step_questions == 4  # TRL counts completions: 16 = G * N with N = 4
    with pytest.raises(train.ConfigError, match="multiple of num_generations=4"):
        train.parse_config(["--generation_batch_size", "10", "--num_generations", "4"])


def test_help_lists_the_trl_names():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for flag in ("--max_completion_length", "--max_steps", "--save_steps", "--resume_from_checkpoint",
                 "--disable_tqdm", "--epsilon_high", "--scale_rewards", "--mask_truncated_completions",
                 "--generation_batch_size"):
        assert flag in result.stdout, flag
    assert "{group,batch,none}" in result.stdout and "KL weight" in result.stdout


def test_keep_p_per_row():
    cfg = train.Config(num_generations=3, keep_p_grid=(0.9, 0.95))
    assert train.keep_p_for_rows(cfg, 2, 0).tolist() == pytest.approx([0.9, 0.95, 0.9] * 2)  # cycled per group
    uniform = dataclasses.replace(cfg, keep_p_uniform=True, keep_p_low=0.6)
    p = train.keep_p_for_rows(uniform, 200, 5)
    assert bool(((p > 0.6) & (p <= 1)).all()) and p.std() > 0.1
    assert torch.equal(p, train.keep_p_for_rows(uniform, 200, 5))  # seeded by (seed, step)
    assert not torch.equal(p, train.keep_p_for_rows(uniform, 200, 6))
    assert run_dir.keep_p_bucket(uniform, 0.934) == "0.9" and run_dir.keep_p_bucket(cfg, 0.95) == "0.950"


def test_model_missing_offline_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "train.py", "--model", "Qwen/Qwen2.5-VL-3B-Instruct",
                          "--output_dir", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in lines[0] and "huggingface-cli download" in lines[0]
    assert not (tmp_path / "out").exists()


def broken_model_dirs(root):
    (root / "empty").mkdir()
    (root / "torn").mkdir()
    (root / "torn" / "config.json").write_text('{"model_type": "qwen2_5_vl", "text_con')  # a copy cut short
    return {"empty": root / "empty", "torn": root / "torn"}


BAD_SETTINGS = {  # argv -> words of the one-line error
    "max_completion_length 0": (["--max_completion_length", "0"], "max_completion_length must be >= 1"),
    "learning_rate -1": (["--learning_rate", "-1"], "learning_rate must be >= 0"),
    "save_steps 0": (["--save_steps", "0"], "save_steps must be >= 1"),
    "save_total_limit 0": (["--save_total_limit", "0"], "save_total_limit must be >= 1"),
    "temperature -1": (["--temperature", "-1"], "temperature must be >= 0"),
    "more questions than rows": (["--per_step_questions", "5"], "per_step_questions=5 exceeds the 4 usable rows"),
    "empty model dir": (["--model", "{empty}"], "is empty"),
    "empty reference dir": (["--ref_model", "{empty}"], "is empty"),
    "torn config.json": (["--model", "{torn}"], "config.json is not valid JSON"),
    "accuracy hold without a schedule": (["--sparsity_accuracy_hold", "0.01"], "needs sparsity_target_steps >= 1"),
    "recovery without a cycle": (["--sparsity_recovery_steps", "3"], "it needs sparsity_cycle_steps > 3, got 0"),
    "a cycle without recovery": (["--sparsity_cycle_steps", "4"],
                                 "sparsity_recovery_steps=0 must be in [1, sparsity_cycle_steps - 1 = 3]"),
    "recovery as long as the cycle": (["--sparsity_cycle_steps", "4", "--sparsity_recovery_steps", "4"],
                                      "sparsity_recovery_steps=4 must be in [1, sparsity_cycle_steps - 1 = 3]"),
    "negative cycle": (["--sparsity_cycle_steps", "-2"], "sparsity_cycle_steps must be >= 0"),
    "accuracy hold 1": (["--sparsity_accuracy_hold", "1", "--sparsity_target_steps", "9"],
                        "sparsity_accuracy_hold must be in [0, 1)"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_bad_settings_are_one_line_errors_before_the_model_loads(sources, tmp_path, monkeypatch, case):
    argv, words = BAD_SETTINGS[case]
    dirs = broken_model_dirs(tmp_path)
    argv = [a.format(**dirs) for a in argv]
    monkeypatch.setattr(train, "load_policy", lambda *a, **k: pytest.fail("the model loaded"))
    out = tmp_path / "out"
    base = ["--model", str(sources[0]), "--dataset", str(sources[1]), "--output_dir", str(out), "--disable_tqdm", "true",
            "--max_steps", "2", "--num_generations", "2"]
    with pytest.raises(SystemExit) as err:
        train.main(base + argv)
    message = str(err.value.code)
    assert message.startswith("error: ") and words in message and "\n" not in message
    assert not (out / "metrics.jsonl").exists()  # nothing left behind that blocks the next run


def test_ref_model_is_the_kl_anchor_and_defaults_to_the_model(sources, tmp_path):
    """--ref_model changes only pi_ref: the rollout (the policy's) is the same, and the logged KL is the masked mean
    of k3 against the named model under full attention, recomputed here by hand; naming the model's own folder
    makes the default step exactly."""
    def untimed(m):
        return {k: v for k, v in m.items() if k not in TIMING_KEYS}
    default = train.train(config(sources, tmp_path / "default", max_steps=1))[0]
    named = train.train(config(sources, tmp_path / "named", max_steps=1, ref_model=str(sources[0])))[0]
    assert untimed(named) == untimed(default)

    other_dir = toy.build_tiny_model_dir(tmp_path / "other", seed=1, **SIZES)  # other weights, same tokenizer
    cfg = config(sources, tmp_path / "other_run", max_steps=1, ref_model=str(other_dir))
    got = train.train(cfg)[0]
    assert {k: got[k] for k in ("reward", "accuracy", "tau")} == {k: default[k] for k in ("reward", "accuracy", "tau")}
    assert got["kl"] != pytest.approx(default["kl"], rel=1e-3)

    table = data.load_dataset_rows(cfg.dataset)  # the step-1 rollout again, from the same seed
    rows = [table.rows[i] for i in data.question_indices(len(table), 0, 1, cfg.seed)]
    policy, processor = train.load_policy(sources[0], cfg, "cpu"), media.load_processor(sources[0])
    rollout, _ = train.sample_rollout(policy, processor, rows, cfg, 0, "cpu", train.contextlib.nullcontext())
    with torch.no_grad():
        logp = score_completions(policy, rollout)  # (N, T) the policy under the rollout's sparsity
        ref_logp = score_completions(train.load_reference(other_dir, cfg, "cpu"), rollout, sparse=False)  # (N, T)
    d = ref_logp - logp
    k3 = d.exp() - d - 1  # (N, T) the k3 estimator of KL(pi || pi_ref), by hand
    mask = rollout.completion_mask.float()
    assert got["kl"] == pytest.approx(((k3 * mask).sum() / mask.sum()).item(), rel=1e-4)


def test_ref_model_with_another_vocabulary_is_one_line(sources, tmp_path, monkeypatch):
    other = tmp_path / "other_vocab"
    shutil.copytree(sources[0], other)
    config_json = json.loads((other / "config.json").read_text())
    for part in (config_json, config_json.get("text_config", {})):
        if "vocab_size" in part:
            part["vocab_size"] += 7
    (other / "config.json").write_text(json.dumps(config_json))
    monkeypatch.setattr(train, "load_policy", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as err:
        train.main(["--model", str(sources[0]), "--dataset", str(sources[1]), "--ref_model", str(other),
                    "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true", "--num_generations", "2"])
    message = str(err.value.code)
    assert message.startswith("error: ") and "--ref_model" in message and "vocabulary" in message
    assert "\n" not in message


@pytest.mark.parametrize("role", ["model", "ref_model"])
def test_overwrite_would_not_delete_the_start_model_or_the_reference(sources, tmp_path, monkeypatch, role):
    out = tmp_path / "run"
    train.train(config(sources, out, max_steps=1))
    checkpoint = str(out / "checkpoint-1")
    monkeypatch.setattr(train, "load_policy", lambda *a, **k: pytest.fail("the model loaded"))
    argv = ["--model", str(sources[0]), "--dataset", str(sources[1]), "--output_dir", str(out),
            "--overwrite_output_dir", "true", "--disable_tqdm", "true", "--num_generations", "2", f"--{role}", checkpoint]
    with pytest.raises(SystemExit) as err:
        train.main(argv)
    words = "the model it starts from" if role == "model" else "the reference model"
    assert f"--overwrite_output_dir would delete {words}" in str(err.value.code)
    assert (out / "checkpoint-1" / "model.safetensors").exists()


def test_temperature_zero_decodes_greedily(sources, tmp_path):
    cfg = config(sources, tmp_path, temperature=0.0, max_completion_length=4)
    table = data.load_dataset_rows(cfg.dataset)
    processor, policy = media.load_processor(sources[0]), train.load_policy(sources[0], cfg, "cpu")
    rollout, _ = train.sample_rollout(policy, processor, table.rows[:1], cfg, 0, "cpu", train.contextlib.nullcontext())
    inputs = train.repeat_prompts(policy, media.encode_prompts(processor, [data.prompt_item(table.rows[0], 4)]), 4)
    greedy = train.generate(policy, inputs, rollout.keep_p, train.SamplingConfig(4, do_sample=False),
                            seed=train.step_seed(cfg, 0))
    assert torch.equal(rollout.completion_ids, greedy.completion_ids) and bool(rollout.logprobs.isfinite().all())
    assert rollout.temperature == 1.0  # log-probs of the policy's own distribution


def test_ctrl_c_is_one_line_saying_how_to_resume(sources, tmp_path, monkeypatch):
    real_step = train.train_step

    def interrupted_at_step_3(*args, **kwargs):
        if args[6] == 2:  # 0-based step 2: after checkpoint-2 was written
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", interrupted_at_step_3)
    out = tmp_path / "run"
    argv = ["--model", str(sources[0]), "--dataset", str(sources[1]), "--output_dir", str(out), "--disable_tqdm", "true",
            "--max_steps", "3", "--save_steps", "2", "--num_generations", "2", "--max_completion_length", "2"]
    with pytest.raises(SystemExit) as err:
        train.main(argv)
    message = str(err.value.code)
    assert "\n" not in message and str(out / "checkpoint-2") in message and "--resume" in message
    monkeypatch.setattr(train, "train_step", real_step)
    assert [m["step"] for m in train.train(train.parse_config(argv + ["--resume_from_checkpoint"]))] == [1, 2, 3]


def truncate_to_a_broken_jpeg(path):
    """Bytes that pass the load-time header check but fail when the pixels are read."""
    buffer = io.BytesIO()  # noise: the JPEG's pixel data is long, so its header survives the cut
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])


def test_media_failing_mid_run_is_recorded_and_never_fails_again(sources, tmp_path):
    """A row that breaks while sampling step 2: --skip_bad_rows replaces it and goes on; without it the run stops
    naming the row, and --resume continues without it, exactly as the skipping run did."""
    folder = tmp_path / "data"
    shutil.copytree(Path(sources[1]).parent, folder)
    rows = [json.loads(line) for line in (folder / "toy.jsonl").read_text().splitlines()]
    step2 = data.question_indices(len(rows), 1, 1, 0)[0]  # the row step 2 samples
    images = [i for i, r in enumerate(rows) if r["data_type"] == "image"]
    if step2 not in images:  # make it an image row sharing another image row's question
        rows[step2] = {**rows[images[0]], "path": f"images/bad-{step2}.png"}
        shutil.copy(folder / rows[images[0]]["path"], folder / rows[step2]["path"])
        (folder / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    truncate_to_a_broken_jpeg(folder / rows[step2]["path"])
    dataset = str(folder / "toy.jsonl")
    kw = dict(dataset=dataset, max_steps=3, save_steps=1, gate_efficiency=False, keep_p_grid=(0.9, 0.95))
    skipped = train.train(config(sources, tmp_path / "skip", skip_bad_rows=True, **kw))
    assert [m["step"] for m in skipped] == [1, 2, 3]
    assert list(run_dir.read_bad_rows(tmp_path / "skip")) == [step2]

    with pytest.raises(data.DatasetError, match=f"step 2: row {step2}: cannot read image .*--resume") as err:
        train.train(config(sources, tmp_path / "stop", **kw))
    assert "\n" not in str(err.value)
    resumed = train.train(config(sources, tmp_path / "stop", resume_from_checkpoint="last", **kw))
    for got, want in zip(resumed, skipped):
        for key in want:
            if key not in TIMING_KEYS:
                assert got[key] == pytest.approx(want[key], rel=1e-5), key


def test_skipped_layers_leave_the_term_and_the_rest_average(sources, tmp_path):
    """Zero advantages, no KL, target 0: the update is λ·∇ mean_j∈J τ̃_j. Over L layers, L·g(all) = (L − 1)·g(skip 0)
    + g(layer 0 only), and layer 0 alone pushes differently from all layers (the skip reaches the loss)."""
    cfg = config(sources, tmp_path, sparsity_coef=1.0, sparsity_temperature=0.05, beta=0.0, sparsity_gate="none")
    policy, rollout = _rollout(sources, cfg, keep_p_grid=(0.6, 0.7, 0.8, 0.9))
    n = policy.config.get_text_config().num_hidden_layers
    grads = {name: _gradients(policy, None, rollout, torch.zeros(4), dataclasses.replace(cfg, sparsity_skip_layers=s))
             for name, s in (("all", []), ("skip0", [0]), ("only0", list(range(1, n))))}
    for k in grads["all"]:
        assert_close_to_scale(n * grads["all"][k], (n - 1) * grads["skip0"][k] + grads["only0"][k], atol=1e-5,
                              rtol=1e-4)
    assert any(not torch.allclose(grads["only0"][k], grads["all"][k]) for k in grads["all"])


def test_layer_targets_reach_the_loss_per_layer(sources, tmp_path):
    """Zero advantages, no KL: with targets (0, 0.99) layer 1 (τ̃_1 < 0.99 at p <= 0.9) is never pushed, so the
    update is half the per-layer hinge at 0 over layer 0 alone (the mean runs over both layers)."""
    cfg = config(sources, tmp_path, sparsity_coef=1.0, sparsity_temperature=0.05, beta=0.0, sparsity_gate="none")
    policy, rollout = _rollout(sources, cfg, keep_p_grid=(0.6, 0.7, 0.8, 0.9))
    grad = lambda **kw: _gradients(policy, None, rollout, torch.zeros(4), dataclasses.replace(cfg, **kw))  # noqa: E731
    targets, only0 = grad(sparsity_layer_targets=[0.0, 0.99]), grad(sparsity_per_layer=True, sparsity_skip_layers=[1])
    for k in only0:
        assert_close_to_scale(2 * targets[k], only0[k], atol=1e-5, rtol=1e-4)
    assert any(only0[k].abs().max() > 0 for k in only0)


def test_layer_floors_reach_the_loss_against_the_target_push(sources, tmp_path):
    """Zero advantages, no KL: a floor of 0.99 on layer 1 (τ̃_1 < 0.99) pulls it up with the target push's gradient
    reversed, so the update equals a target of 0 on layer 0 alone minus layer 1's hinge at 0 (each half: the mean
    runs over both layers)."""
    cfg = config(sources, tmp_path, sparsity_coef=1.0, sparsity_temperature=0.05, beta=0.0, sparsity_gate="none")
    policy, rollout = _rollout(sources, cfg, keep_p_grid=(0.6, 0.7, 0.8, 0.9))
    grad = lambda **kw: _gradients(policy, None, rollout, torch.zeros(4), dataclasses.replace(cfg, **kw))  # noqa: E731
    band = grad(sparsity_layer_targets=[0.0, 0.99], sparsity_layer_floors=[0.0, 0.99])
    only0, only1 = grad(sparsity_layer_targets=[0.0, 0.99]), grad(sparsity_layer_targets=[0.99, 0.0])
    for k in band:
        assert_close_to_scale(band[k], only0[k] - only1[k], atol=1e-5, rtol=1e-4)
    assert any(only1[k].abs().max() > 0 for k in only1)


def transformers_5_17_forward(monkeypatch):
    """The old-transformers stand-in: Qwen2.5-VL's forward swallows `mm_encoder_outputs` in **kwargs, as
    transformers 5.17 does (the argument arrived in 5.18), and embeds the image tokens as text."""
    from transformers import Qwen2_5_VLModel
    forward = Qwen2_5_VLModel.forward

    def old_forward(self, *args, mm_encoder_outputs=None, **kwargs):
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(Qwen2_5_VLModel, "forward", old_forward)


def test_transformers_without_mm_encoder_outputs_stops_the_run_with_one_line(sources, tmp_path, monkeypatch):
    """Where encoded images would be dropped (wrong visual features, no error), train.py stops before loading."""
    sparse_qwen.check_transformers()  # the installed transformers has every feature: silent
    assert sparse_qwen.mm_encoder_outputs_reach_vision_path()
    transformers_5_17_forward(monkeypatch)
    assert not sparse_qwen.mm_encoder_outputs_reach_vision_path()
    monkeypatch.setattr(train, "load_policy", lambda *a, **k: pytest.fail("the model loaded"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        train.main(["--model", str(sources[0]), "--dataset", str(sources[1]), "--output_dir", str(out),
                    "--disable_tqdm", "true", "--max_steps", "1"])
    message = str(err.value.code)
    assert "transformers >= 5.18" in message and "mm_encoder_outputs" in message and "\n" not in message
    assert not out.exists()


def test_the_stand_in_gives_wrong_visual_features_without_the_check(sources, monkeypatch):
    """What the check prevents: under the stand-in, a prompt carrying encoded images (frozen vision) and the same
    prompt carrying pixels give different prompt log-probs; with transformers >= 5.18 they agree."""
    processor = media.load_processor(sources[0])
    table = data.load_dataset_rows(sources[1])
    inputs = media.encode_prompts(processor, [data.prompt_item(table.rows[0], 4)])  # (1, P) + pixels
    model = train.load_policy(sources[0], config(sources, "unused"), "cpu").eval()
    encoded = train.repeat_prompts(model, inputs, 1)  # pixels replaced by mm_encoder_outputs

    def logits(batch):
        with torch.no_grad():
            return model(**{k: v for k, v in batch.items()}).logits  # (1, P, V)
    pixels = logits(inputs)
    assert_close_to_scale(logits(encoded), pixels, atol=1e-5, rtol=1e-4)
    transformers_5_17_forward(monkeypatch)
    assert (logits(encoded) - pixels).abs().max() > 1e-2


def test_transformers_without_attention_interfaces_is_one_line_at_import():
    """A transformers without AttentionMaskInterface (stand-in: the name deleted before sparse_qwen is imported)."""
    code = ("import transformers.masking_utils as m; del m.AttentionMaskInterface; import sys; sys.path.insert(0, "
            f"{str(Path(train.__file__).parent)!r}); import sparse_qwen")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    line, = done.stderr.strip().splitlines()
    assert line.startswith("ZipR1 needs transformers >= 5.23 with AttentionInterface and AttentionMaskInterface")
    assert "AttentionMaskInterface" in line.split("the import failed: ")[1]
