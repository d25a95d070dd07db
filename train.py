"""ZipR1 training: GRPO on a Top-p sparse policy, rewarded for right answers and for the tokens it drops.

    python train.py                                            # offline default: tiny Qwen2.5-VL + toy task, CPU
    python train.py --model Qwen/Qwen2.5-VL-3B-Instruct --dataset ./Video-R1-data/Video-R1-260k.json
    torchrun --nproc_per_node 8 train.py --model Qwen/Qwen2.5-VL-7B-Instruct ...   # FSDP2, docs/multi_gpu.md

One step (`train_step`) for G = per_step_questions questions with N = num_generations answers each, rows
group-contiguous, reads as the paper's algorithm:
  1. sample a threshold p_n per answer: the paper's grid, cycled, or p ~ U(keep_p_low, 1]
  2. sparse rollout: Top-p selection per layer (Eq. 1-3), record the token ratio τ_n = b/(2ℓ) (§2.1)
  3. rewards r = r_acc + C·(1 − τ), C = 1 iff some answer of the group scores >= gate_threshold      (rewards.py;
     r_acc graded as Video-R1 scores it, or binary; + w_f·r_format, w_f = 0 by default)
  4. advantages A = (r − mean) / std within each group                                          (Eq. 4)
  5. loss: the clipped surrogate − β·KL(π_θ ‖ π_ref), the policy scored under the rollout's sparsity, the frozen
     reference under dense attention (Eq. 5); + λ·C·max(τ̃ − τ*, 0), τ̃ the relaxed Eq. 3 count of the same
     forward (learned_sparsity.py; λ = 0 is the paper's literal objective)
  6. num_iterations (μ) AdamW updates
Settings: zipr1_support/train_config.py (`python train.py --help`, docs/settings.md). Everything random is seeded
by (seed, step), so --resume_from_checkpoint continues exactly where the last checkpoint left off.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import grpo
import rewards
from learned_sparsity import (SCORER, add_probe_scorers, compressing, compression_clock, sparsity_coef_at,
                              sparsity_gates, sparsity_targets_at, sparsity_term)
from rollout import SamplingConfig, generate, score_completions, scoring_state, split_groups
from sparse_qwen import check_transformers, enable_checkpointing, make_sparse
from zipr1_support import data, media, multi_gpu, run_dir
from zipr1_support.batching import repeat_prompts
from zipr1_support.train_config import (  # noqa: F401 (LR_SCHEDULES, PAPER_KEEP_P_GRID, check_config: train.X)
    LR_SCHEDULES, PAPER_KEEP_P_GRID, Config, ConfigError, check_config, check_sources, input_sizes, parse_config,
    resolve_sources)


# ----------------------------------------------------------------------------------------------- setup
def load_policy(path, cfg: Config, device, dist=multi_gpu.SINGLE):
    """The trainable policy: fp32 weights (bf16 runs autocast), Top-p sparse attention in the text decoder;
    sharded over the ranks with FSDP2 under torchrun (bf16 runs gather and compute in bf16)."""
    from transformers import AutoModelForImageTextToText
    policy = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).to(device)
    make_sparse(policy)  # with the probe scorers saved in `path`, if any
    if cfg.probe_scorer:
        add_probe_scorers(policy)  # zeros where `path` has none: ZipVL's selection until trained
    if cfg.freeze_vision:
        policy.model.visual.requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable_checkpointing(policy)  # non-reentrant; recomputes with the same zipr1_state
    frozen = policy.model.visual if cfg.freeze_vision else None  # whole on every rank: called once per group
    return multi_gpu.shard_model(policy, dist, torch.bfloat16 if cfg.bf16 else None, replicate=frozen)


def load_reference(path, cfg: Config, device, dist=multi_gpu.SINGLE):
    """The frozen full-attention reference pi_ref (stock SDPA), or None when beta = 0; sharded under torchrun."""
    if cfg.beta == 0:
        return None
    from transformers import AutoModelForImageTextToText
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    reference = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return multi_gpu.shard_model(reference.to(device).eval().requires_grad_(False), dist)


# ----------------------------------------------------------------------------------------------- one step
def step_seed(cfg: Config, step: int) -> int:
    return (cfg.seed * 1_000_003 + step) % 2**64  # any seed torch.manual_seed takes


def keep_p_for_rows(cfg: Config, groups: int, step: int) -> torch.Tensor:
    """Threshold p_n per rollout row: the grid cycled within each group, or p = 1 - u (1 - low).  (G*N,)"""
    if cfg.keep_p_uniform:
        u = torch.rand(groups * cfg.num_generations, generator=torch.Generator().manual_seed(step_seed(cfg, step)))
        return 1 - u * (1 - cfg.keep_p_low)  # (G*N,) in (low, 1]
    grid = [cfg.keep_p_grid[n % len(cfg.keep_p_grid)] for n in range(cfg.num_generations)]
    return torch.tensor(grid * groups, dtype=torch.float32)  # (G*N,)


def sample_rollout(policy, processor, rows, cfg: Config, step: int, device, autocast, position: int = 0):
    """Rollout of N answers per question with the sparse policy, all `rows` in one batch; (rollout, texts).

    `rows` start at `position` in the step's global question list. Each answer's threshold and sampling stream
    (row seed) are those of its place in the global batch, and the probes take the step's seed, so the result does
    not depend on how questions are spread over ranks and batches.
    """
    items = [data.prompt_item(row, template=cfg.prompt_template, sizes=input_sizes(cfg)) for row in rows]
    n, seed = cfg.num_generations, step_seed(cfg, step)
    keep_p = keep_p_for_rows(cfg, position + len(rows), step)[position * n:].to(device)  # (G*N,)
    row_seeds = [multi_gpu.question_seed(seed, position + g) + j for g in range(len(rows)) for j in range(n)]
    sampling = SamplingConfig(max_new_tokens=cfg.max_completion_length, do_sample=cfg.temperature > 0,
                              temperature=cfg.temperature or 1.0)  # temperature 0: greedy
    policy.eval()  # HF turns the KV cache off for checkpointed layers in train mode
    with autocast:
        if cfg.freeze_vision:  # each image/video through the vision tower once, for rollout and both scorings
            inputs = data.checked_prompts(media.encode_prompts(processor, items), rows, cfg.max_prompt_length)
            inputs = repeat_prompts(policy, inputs.to(device), n)  # (G*N, P) + media
        else:  # a trained vision tower needs its pixels in the policy's training forward
            inputs = media.encode_prompts(processor, [item for item in items for _ in range(n)])  # (G*N, P)
            inputs = data.checked_prompts(inputs, rows, cfg.max_prompt_length, n).to(device)
        rollout = generate(policy, inputs, keep_p, sampling, seed=seed, row_seeds=row_seeds)  # (G*N, T) completions
    texts = processor.batch_decode(rollout.completion_ids.cpu(), skip_special_tokens=True)
    return rollout, texts


def sample_groups(policy, processor, rows, cfg: Config, step: int, device, autocast, first: int = 0):
    """This rank's questions rolled out `rollout_questions` at a time; one Rollout per question group, and texts."""
    chunk = cfg.rollout_questions or len(rows)
    groups, texts = [], []
    for start in range(0, len(rows), chunk):
        rollout, part = sample_rollout(policy, processor, rows[start:start + chunk], cfg, step, device, autocast,
                                       first + start)
        groups += split_groups(policy, rollout, cfg.num_generations)  # the update's micro-batches
        texts += part
    return groups, texts


def learning_rate_schedule(cfg: Config, base: float | None = None):
    """step -> learning rate: transformers' `lr_scheduler_type` schedule over max_steps from `base` (default
    learning_rate), as a pure function of the step, so a resumed run sets the same rate with no scheduler state."""
    from transformers import get_scheduler
    base = cfg.learning_rate if base is None else base
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)  # holds the schedule only
    factor = get_scheduler(cfg.lr_scheduler_type, probe, num_warmup_steps=cfg.warmup_steps,
                           num_training_steps=cfg.max_steps).lr_lambdas[0]
    return lambda step: base * factor(step)


def parameter_groups(policy, cfg: Config) -> list[tuple[list, float]]:
    """AdamW's groups and base rates: the model, then the learned probe scorers (if any) at their own rate."""
    params = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    scorers = [p for n, p in params if n.endswith("." + SCORER)]
    groups = [([p for n, p in params if not n.endswith("." + SCORER)], cfg.learning_rate)]
    rate = cfg.learning_rate if cfg.probe_scorer_learning_rate is None else cfg.probe_scorer_learning_rate
    return groups + ([(scorers, rate)] if scorers else [])


def loss_mask(rollout, cfg: Config) -> torch.Tensor:
    """The completion tokens the loss sees: all up to EOS, or none of a truncated answer with
    mask_truncated_completions (TRL's DAPO option).  (N, T)"""
    if not cfg.mask_truncated_completions or rollout.truncated is None:
        return rollout.completion_mask
    return rollout.completion_mask * ~rollout.truncated[:, None]  # (N, T)


def policy_update(policy, reference, optimizer, rollouts, advantages, cfg: Config, autocast,
                  dist=multi_gpu.SINGLE, gates=None, sparsity_coef: float | None = None, targets=None) -> dict:
    """num_iterations AdamW steps on Eq. 5 (+ λ·C·τ̃ when sparsity_coef > 0), one micro-batch per answer group
    (a Rollout, or lists of Rollouts, advantages and gates C (N,)). Each micro-batch loss is weighted so the step's
    gradient is that of the loss over the global batch on all ranks (multi_gpu.loss_weight: the GRPO part by its
    count, the sparsity part, a mean over rows, by its rows). One `scoring_state` per micro-batch serves the forward,
    the gradient-checkpoint recomputation in backward and τ̃. targets: this step's (τ*, [τ*_j]), default the cfg's."""
    if not isinstance(rollouts, list):
        rollouts, advantages, gates = [rollouts], [advantages], None if gates is None else [gates]
    coef = cfg.sparsity_coef if sparsity_coef is None else sparsity_coef
    target, layer_targets = (cfg.sparsity_target, cfg.sparsity_layer_targets) if targets is None else targets
    gates = gates or [torch.ones_like(r.keep_p) for r in rollouts]
    ref_logps = [None] * len(rollouts)
    if reference is not None:
        with torch.no_grad(), autocast:
            ref_logps = [score_completions(reference, r, sparse=False) for r in rollouts]  # (N, T) full attention
    states = [scoring_state(policy, r, relaxed_temperature=cfg.sparsity_temperature, relaxed_grad=coef > 0,
                            straight_through=cfg.selection_straight_through or None)
              for r in rollouts]  # one per micro-batch: forward, recomputation in backward, and τ̃
    masks = [loss_mask(r, cfg) for r in rollouts]  # (N, T) each: the tokens the loss averages over
    counts = [grpo.loss_normalizer(m, cfg.loss_type, cfg.max_completion_length) for m in masks]
    total = multi_gpu.all_sum(sum(counts), dist)  # the global batch's normaliser
    total_rows = multi_gpu.all_sum(sum(len(r.keep_p) for r in rollouts), dist)  # the sparsity mean's
    policy.train()
    history = []
    for _ in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        parts = []
        for rollout, adv, ref_logp, state, count, mask, gate in zip(rollouts, advantages, ref_logps, states, counts,
                                                                    masks, gates):
            with autocast:
                logp = score_completions(policy, rollout, state=state)  # (N, T) under the rollout's sparsity
            old_logp = rollout.logprobs if cfg.num_iterations > 1 else None  # mu = 1: logp.detach()
            loss, stats = grpo.grpo_loss(logp, old_logp, ref_logp, adv, mask, cfg.epsilon, cfg.epsilon_high,
                                         beta=cfg.beta, loss_type=cfg.loss_type,
                                         max_completion_length=cfg.max_completion_length)  # Eq. 5
            weight = multi_gpu.loss_weight(count, total, dist)
            objective, relaxed = weight * loss, {}
            if state.relaxed:  # τ̃ (N,), relaxed Eq. 3 from this same forward
                tau_layers = state.relaxed_by_layer()  # (N, n_layers)
                tau_soft = tau_layers.mean(-1)  # (N,) τ̃, logged
                term = sparsity_term(tau_layers, gate.to(tau_soft), rollout.keep_p, target, cfg.sparsity_per_layer,
                                     cfg.sparsity_skip_layers, layer_targets, cfg.sparsity_layer_floors).mean()
                relaxed = {"tau_relaxed": tau_soft.mean().item(), "sparsity_loss": coef * term.item(),
                           "sparsity_target": sum(layer_targets) / len(layer_targets) if layer_targets else target}
                if coef > 0:  # λ = 0 backpropagates exactly the GRPO loss
                    objective = objective + coef * multi_gpu.loss_weight(len(rollout.keep_p), total_rows,
                                                                         dist) * term
            objective.backward()
            parts.append({**stats, **relaxed, "loss": weight * loss.item()})  # mean over ranks of Σ: the global loss
        grad_norm = multi_gpu.clip_grad_norm(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
        merged = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0] if k != "loss"}  # mean over groups
        history.append({**merged, "loss": sum(p["loss"] for p in parts), "grad_norm": grad_norm})
    return {k: sum(h[k] for h in history) / len(history) for k in history[0]}


def train_step(policy, reference, processor, optimizer, rows, cfg: Config, step: int, device, autocast,
               dist=multi_gpu.SINGLE, first: int = 0, clock: int | None = None) -> dict:
    """One ZipR1 step on this rank's questions `rows` (from place `first` of the step's global list); returns the
    step's metrics over all ranks. clock: where the target schedule stands (default: the step)."""
    start, n = time.perf_counter(), cfg.num_generations
    # 1-2. a threshold p_n per answer, and the sparse rollout under it: answers, log-probs, token ratios τ_n
    with multi_gpu.gathered_weights(policy, dist):  # ranks stop decoding at different lengths
        rollouts, texts = sample_groups(policy, processor, rows, cfg, step, device, autocast, first)
    tau = torch.cat([r.token_ratio for r in rollouts]).float().cpu()  # (G*N,)
    # 3. rewards r = r_acc + C·(1 − τ), C the group's gate
    solutions = [row["solution"] for row in rows for _ in range(n)]
    types = [row["problem_type"] for row in rows for _ in range(n)]
    acc = rewards.accuracy_rewards(texts, solutions, types, cfg.accuracy_reward)  # (G*N,) binary or graded
    parts = rewards.zipr1_rewards(acc, tau, n, cfg.gate_efficiency, cfg.gate_threshold, rewards.format_rewards(texts),
                                  cfg.format_reward_weight)  # r = r_acc + w_f r_format + C (1 - tau), each (G*N,)
    # 4. Eq. 4: advantages normalised within each group
    advantages = grpo.group_advantages(parts["reward"], n, scale=cfg.scale_rewards).to(device)  # (G*N,)
    # 5-6. Eq. 5 loss with KL to the dense reference (+ the learned-sparsity term), num_iterations updates
    gates = list(sparsity_gates(cfg.sparsity_gate, parts, acc, cfg.gate_threshold, n).to(device).split(n))  # C, λ
    coef = sparsity_coef_at(cfg.sparsity_coef, cfg.sparsity_warmup_steps, step) \
        if compressing(step, cfg.sparsity_cycle_steps, cfg.sparsity_recovery_steps) else 0.0  # λ; 0 in recovery
    paced, clock = clock is not None, step if clock is None else clock
    targets = sparsity_targets_at(cfg.sparsity_target, cfg.sparsity_layer_targets, cfg.sparsity_target_steps, clock)
    stats = policy_update(policy, reference, optimizer, rollouts, list(advantages.split(n)), cfg, autocast, dist,
                          gates, coef, targets)
    metrics = run_dir.step_metrics(cfg, step, rollouts, texts, acc, tau, parts, stats, coef, optimizer, reference,
                                   start)
    if paced:  # the loop passes a clock only when the targets follow accuracy or cycles
        metrics["sparsity_clock"] = clock
    return multi_gpu.reduce_metrics(metrics, dist)  # the same dict, over every rank's groups


# ----------------------------------------------------------------------------------------------- loop
def train(cfg: Config) -> list[dict]:
    """Run (or resume) ZipR1 training; returns the metrics of every step.

    Everything is checked and loaded (settings, model folder, data and its media, what --resume_from_checkpoint
    would continue) before anything in output_dir is deleted or written. SIGTERM / SIGINT: run_dir.StopOnSignal."""
    stop = run_dir.StopOnSignal().install()
    try:
        return run_training(cfg, stop)
    finally:
        stop.uninstall()


def run_training(cfg: Config, stop: run_dir.StopOnSignal) -> list[dict]:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    dist = multi_gpu.init_distributed()  # torchrun: join the process group; plain python: one process
    torch.manual_seed(cfg.seed)
    device = dist.device
    with multi_gpu.main_first(dist):  # rank 0 builds the toy model / data caches first
        model_dir, dataset, reference_dir = resolve_sources(cfg)
        processor = media.load_processor(model_dir)
        table = data.load_dataset_rows(dataset, cfg.media_root, "skip" if cfg.skip_bad_rows else "error",
                                       progress=not cfg.disable_tqdm and dist.is_main, accuracy=cfg.accuracy_reward)
    check_sources(cfg, model_dir, len(table), reference_dir)
    if dist.is_main:
        print(f"data: {table.summary()}", file=sys.stderr)
        for message in table.skipped[:5]:
            print(f"  skipped {message}", file=sys.stderr)
    if dist.is_main:  # before output_dir is read or the model loads; a failed start above leaves no folder
        run_dir.lock_output_dir(cfg.output_dir)  # a second run in the same output_dir stops here, one line
    resume_from, metrics, bad = multi_gpu.broadcast(
        (*run_dir.prepare_output_dir(cfg), run_dir.read_bad_rows(Path(cfg.output_dir))) if dist.is_main else None,
        dist)
    policy = load_policy(resume_from or model_dir, cfg, device, dist)
    reference = load_reference(reference_dir, cfg, device, dist)  # pi_ref: --ref_model, default the start model
    groups = parameter_groups(policy, cfg)  # the model; the probe scorers at probe_scorer_learning_rate
    optimizer = torch.optim.AdamW([{"params": ps, "lr": rate} for ps, rate in groups], weight_decay=cfg.weight_decay)
    schedules = [learning_rate_schedule(cfg, rate) for _, rate in groups]  # the same schedule from each base rate
    start = 0 if resume_from is None else run_dir.load_trainer_state(resume_from, policy, optimizer, cfg, dist)
    if dist.is_main:
        run_dir.start_output_dir(cfg, resume_from, metrics)  # only now: deletes an overwritten run, trims metrics
    multi_gpu.barrier(dist)
    autocast = torch.autocast(device.type, torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
    metrics_path = Path(cfg.output_dir) / "metrics.jsonl"
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="ZipR1",
               disable=cfg.disable_tqdm or not dist.is_main)
    known_bad = len(bad)
    stop.stepping = True
    for step in bar:
        for group, schedule in zip(optimizer.param_groups, schedules):
            group["lr"] = schedule(step)
        clock = compression_clock([m["accuracy"] for m in metrics], cfg.sparsity_accuracy_hold, compressed=[
            compressing(s, cfg.sparsity_cycle_steps, cfg.sparsity_recovery_steps) for s in range(step)]) \
            if cfg.sparsity_accuracy_hold or cfg.sparsity_cycle_steps else None  # τ*'s step: compressing, held
        m = data.step_on_readable_rows(  # a row whose media fails is recorded and replaced, or stops the run
            lambda rows, first: train_step(policy, reference, processor, optimizer, rows, cfg, step, device,
                                           autocast, dist, first, clock), table, bad, cfg, step, dist)
        metrics.append(m)
        if dist.is_main:
            run_dir.append_metrics(metrics_path, m)
        kl = "off" if m["kl"] is None else f"{m['kl']:.4f}"
        bar.set_postfix(reward=f"{m['reward']:.3f}", acc=f"{m['accuracy']:.2f}", tau=f"{m['tau']:.3f}",
                        tau_relaxed=f"{m.get('tau_relaxed', math.nan):.3f}", kl=kl)
        stopping = stop.requested(dist)
        if (step + 1) % cfg.save_steps == 0 or step + 1 == cfg.max_steps or stopping:
            saved = run_dir.save_checkpoint(policy, processor, optimizer, cfg, step + 1, dist)
            if dist.is_main:
                run_dir.plot_metrics(metrics, Path(cfg.output_dir) / "metrics.png")
            if stopping:
                raise stop.stop(saved, step + 1)
    if dist.is_main:
        print(f"done: {len(table.skipped)} bad rows skipped at load, {len(bad) - known_bad} while training; "
              f"checkpoint {run_dir.checkpoints(Path(cfg.output_dir))[-1]}, metrics {metrics_path}, "
              f"plot {metrics_path.with_suffix('.png')}", file=sys.stderr)
    multi_gpu.shutdown(dist)
    return metrics


def main(argv=None) -> None:
    cfg = None
    try:
        cfg = parse_config(argv)
        check_transformers()  # one line and exit where transformers lacks a feature we rely on
        train(cfg)
    except (media.ModelNotAvailable, data.DatasetError, ConfigError, FileExistsError, run_dir.ResumeError,
            run_dir.SaveError) as err:
        raise SystemExit(f"error: {err}") from None
    except run_dir.Stopped as err:  # SIGTERM / SIGINT: exit as the signal would, after one line
        print(err.message or run_dir.interrupted(cfg), file=sys.stderr)
        raise SystemExit(128 + err.signum) from None
    except KeyboardInterrupt:
        raise SystemExit(run_dir.interrupted(cfg)) from None


if __name__ == "__main__":
    main()
