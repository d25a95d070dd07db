"""Every setting of a ZipR1 run (`Config`), its command line and its checks; train.py runs it.

    cfg = parse_config(["--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--max_steps", "500"])   # what train.main does
    cfg = check_config(Config(model="toy", max_steps=10))                                   # from Python

One dataclass, one flag per field (transformers' HfArgumentParser, see cli.py), names as in TRL's GRPOConfig where
TRL has the concept (docs/settings.md). `check_config` gives one clear error per setting that cannot work,
before anything loads; `check_sources` what the loaded data and model folder allow.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers.hf_argparser import HfArg

from zipr1_support import cli, media
import grpo
import rewards
from zipr1_support.media_files import (FPS, FPS_MAX_FRAMES, FPS_MIN_FRAMES, MAX_PIXELS, MIN_PIXELS, VIDEO_MAX_PIXELS,
                                       VIDEO_MIN_PIXELS, InputSizes, input_sizes)  # noqa: F401 (input_sizes: train.py)
from zipr1_support.run_dir import DEFAULT_OUTPUT_DIR, checkpoints
import toy
from toy import TOY_CACHE, TOY_PRESET, TOY_TRAIN_ROWS

SPARSITY_GATES = ("group", "answer", "all", "none")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")  # of transformers.get_scheduler
PER_LAYER_VALUES = {"sparsity_layer_targets": "target", "sparsity_layer_floors": "floor"}  # one value per decoder layer
PAPER_KEEP_P_GRID = tuple(round(0.94 + 0.005 * i, 3) for i in range(8))  # 0.94, 0.945, ..., 0.975


class ConfigError(ValueError):
    """A setting that cannot work (reported as one line by main)."""


OPTIONAL_BOOL = {"nargs": "?", "const": True}  # `--bf16` alone means true; unset: decided by the device


@dataclass
class Config:
    """Every setting of a run; the command line has one flag per field (`python train.py --help`). Names follow TRL's
    GRPOConfig where TRL has the concept (docs/settings.md)."""

    # model and data
    model: str = HfArg(default="toy", help="HF hub id in the local cache, or a local directory; 'toy': the offline "
                                             "tiny Qwen2.5-VL")
    dataset: str = HfArg(default="toy", help="Video-R1-schema .json/.jsonl, a directory, or a cached hub id; 'toy': "
                                               "the rendered toy task")
    ref_model: str | None = HfArg(default=None, help="the frozen KL reference pi_ref (same forms as --model); "
                                                       "default: --model itself. A second stage started from a "
                                                       "checkpoint can keep the original model as anchor")
    media_root: str | None = HfArg(default=None, help="where rows' 'path' are resolved (default: the dataset's folder)")
    skip_bad_rows: bool = HfArg(default=False, help="drop and count bad rows instead of stopping at the first one")
    # input sizes (media_files.InputSizes; names and defaults of Video-R1's qwen-vl-utils, docs/video_r1.md)
    min_pixels: int = HfArg(default=MIN_PIXELS, help="fewest pixels per image (4*28*28)")
    max_pixels: int = HfArg(default=MAX_PIXELS, help="most pixels per image (256*28*28)")
    video_min_pixels: int = HfArg(default=VIDEO_MIN_PIXELS, help="fewest pixels per video frame (128*28*28)")
    video_max_pixels: int = HfArg(default=VIDEO_MAX_PIXELS, help="most pixels per video frame (128*28*28; "
                                                                 "qwen-vl-utils allows 1.05 x video_min_pixels)")
    fps: float = HfArg(default=FPS, help="video frames kept per second of video")
    min_frames: int = HfArg(default=FPS_MIN_FRAMES, help="fewest frames kept per video (rounded up to even)")
    max_frames: int = HfArg(default=FPS_MAX_FRAMES, help="most frames kept per video (rounded down to even)")
    prompt_template: Literal["video_r1", "answer_only"] = HfArg(
        default="video_r1", help="Video-R1's prompt (think in <think>, answer in <answer>), or the question and its "
                                 "answer instruction only (media.question_text)")
    # ZipR1: N answers per question, each under its own sparsity threshold p_n
    num_generations: int = HfArg(default=8, help="N answers per question (a GRPO group)")
    keep_p_grid: list[float] = HfArg(default_factory=lambda: list(PAPER_KEEP_P_GRID),
                                     help="sparsity thresholds p, cycled over each group (paper: 0.94..0.975)")
    keep_p_uniform: bool = HfArg(default=False, help="instead draw p = 1 - u (1 - keep_p_low), u ~ U[0, 1)")
    keep_p_low: float = HfArg(default=0.0, help="lower end of the uniform p; 0 is the method text's U(0, 1)")
    gate_efficiency: bool = HfArg(default=True, help="C: no efficiency reward for an all-wrong group")
    gate_threshold: float = HfArg(default=0.5, help="C = 1 iff some answer of the group scores r_acc >= this, in "
                                                    "(0, 1]; binary rewards: any value is 'some answer correct'")
    accuracy_reward: Literal["graded", "binary"] = HfArg(
        default="graded", help="r_acc: Video-R1's per-type scores in [0, 1] (OCR 1-WER, free-form ROUGE, regression "
                               "relative error), or 1 / 0 for a correct answer (rewards.py)")
    format_reward_weight: float = HfArg(default=0.0, help="weight of Video-R1's format reward (<think>...</think>"
                                                          "<answer>...</answer>) in r; 0 as in the paper")
    # learned sparsity: λ·C·max(τ̃ − target, 0) joins the loss, τ̃ the relaxed Eq. 3 count (docs/learned_sparsity.md);
    # λ = 0 is the paper's literal objective (τ̃ is still logged)
    sparsity_coef: float = HfArg(default=0.0, help="λ of the learned-sparsity term; 0: the paper's literal recipe")
    sparsity_temperature: float = HfArg(default=0.01, help="T of the smooth count σ((p − c_{i−1}) / T)")
    sparsity_gate: Literal["group", "answer", "all", "none"] = HfArg(
        default="group", help="C per answer: the reward's group gate, this answer correct, every answer of its "
                              "group correct, or always 1")
    sparsity_target: float = HfArg(default=0.0, help="hinge: τ̃ at or below it is not pushed further")
    sparsity_per_layer: bool = HfArg(default=False, help="hinge each layer's τ̃_j at the target and average the "
                                                          "hinges, instead of hinging the mean over layers")
    sparsity_skip_layers: list[int] = HfArg(default_factory=list, help="layers the term leaves alone (e.g. 0, "
                                                                        "whose q and k come from the embeddings)")
    sparsity_layer_targets: list[float] = HfArg(default_factory=list, help="a target τ*_j per decoder layer, each "
                                                "layer hinged at its own (a per-layer budget; replaces the target)")
    sparsity_layer_floors: list[float] = HfArg(default_factory=list, help="a floor f_j per decoder layer: τ̃_j below "
                                               "it is pushed back up, so each layer keeps a band [f_j, τ*_j]")
    sparsity_warmup_steps: int = HfArg(default=0, help="λ ramps linearly from 0 over these steps")
    sparsity_target_steps: int = HfArg(default=0, help="the targets fall from 1 to their values over these steps "
                                                       "as (1 − t/steps)³ (gradual compression); 0: from the start")
    sparsity_accuracy_hold: float = HfArg(default=0.0, help="the targets fall only on steps whose rollout accuracy "
                                          "(an EMA over steps, decay 0.98) is within this of its best so far: "
                                          "compression that follows accuracy; 0: on every step")
    sparsity_cycle_steps: int = HfArg(default=0, help="alternate: cycles of this many steps, each ending with "
                                      "sparsity_recovery_steps at λ = 0 (Eq. 5 alone; the targets wait); 0: λ always")
    sparsity_recovery_steps: int = HfArg(default=0, help="the recovery steps that end each sparsity cycle")
    selection_straight_through: float = HfArg(default=0.0, help="T of a straight-through gradient for which tokens "
                                              "Eq. 3 keeps, σ(log(s/θ)/T) per key (toy-sized prompts: dense "
                                              "attention in training); 0: none, as in the paper")
    probe_scorer: bool = HfArg(default=False, help="a learned probe scorer: each key's Eq. 3 identity score times "
                               "exp(w_j · v), w_j per layer from zero, trained through the straight-through "
                               "selection (needs selection_straight_through > 0); k is unchanged")
    probe_scorer_learning_rate: float | None = HfArg(default=None, help="AdamW rate of the probe scorers, on the "
                                                     "learning-rate schedule (default: learning_rate)")
    # GRPO (Eq. 4-5)
    beta: float = HfArg(default=0.04, help="KL weight (paper 0.04; TRL's default 0.0); 0 skips the reference model")
    epsilon: float = HfArg(default=0.2, help="lower clip range of the ratio")
    epsilon_high: float | None = HfArg(default=None, help="upper clip range (default: epsilon; DAPO uses 0.28)")
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = HfArg(
        default="grpo", help="how per-token terms are averaged (paper: grpo; TRL's default dapo), see grpo.grpo_loss")
    scale_rewards: Literal["group", "batch", "none"] = HfArg(
        default="group", help="divide advantages by the group's reward std (Eq. 4), the whole batch's, or nothing")
    mask_truncated_completions: bool = HfArg(default=False, help="leave answers that hit max_completion_length "
                                                                 "without EOS out of the loss")
    num_iterations: int = HfArg(default=1, help="mu: updates per rollout batch; > 1 uses the rollout's log-probs "
                                                "as pi_old")
    # batches: TRL counts completions, we count questions (docs/settings.md)
    per_step_questions: int = HfArg(default=1, help="G questions per optimizer step (G * N completions)")
    generation_batch_size: int = HfArg(default=0, help="TRL's name: completions per step, G * N; sets "
                                                       "per_step_questions when given")
    rollout_questions: int = HfArg(default=0, help="questions a process samples in one batch; 0: all of its own")
    max_completion_length: int = HfArg(default=768, help="new tokens per answer at most (Video-R1: 768, room "
                                                         "to reason)")
    max_prompt_length: int | None = HfArg(default=16384, help="prompt tokens (text + image/video tokens) per "
                                                              "question at most: a longer row is a bad row (never "
                                                              "truncated); None: no limit")
    temperature: float = HfArg(default=1.0, help="sampling temperature; 0: greedy (log-probs at temperature 1)")
    # optimisation
    learning_rate: float = HfArg(default=1e-6, help="AdamW learning rate")
    lr_scheduler_type: Literal["constant", "constant_with_warmup", "linear", "cosine"] = HfArg(
        default="constant", help="schedule of the learning rate over max_steps (transformers.get_scheduler; TRL's "
                                 "default: linear)")
    warmup_steps: int = HfArg(default=0, help="steps of linear learning-rate warm-up (with_warmup, linear, cosine)")
    weight_decay: float = HfArg(default=0.0, help="AdamW weight decay")
    max_grad_norm: float = HfArg(default=1.0, help="gradient clipping norm")
    freeze_vision: bool = HfArg(default=True, help="train the language model only: the sparsity acts in the decoder")
    bf16: bool | None = HfArg(default=None, metadata=OPTIONAL_BOOL, help="autocast to bf16 over fp32 master weights "
                                                                           "(default: on with CUDA)")
    gradient_checkpointing: bool | None = HfArg(default=None, metadata=OPTIONAL_BOOL,
                                                help="recompute activations in backward (default: on with CUDA)")
    seed: int = HfArg(default=0, help="seeds questions, thresholds, probes and sampling: a rerun is a replay")
    # the run
    max_steps: int = HfArg(default=1000, help="optimizer steps")
    save_steps: int = HfArg(default=100, help="save a checkpoint every this many steps (and at the end)")
    save_total_limit: int = HfArg(default=2, help="newest checkpoints kept on disk (>= 1)")
    output_dir: str = HfArg(default=DEFAULT_OUTPUT_DIR, help="checkpoints, metrics.jsonl, metrics.png")
    overwrite_output_dir: bool = HfArg(default=False, help="start over in an output_dir that holds a run")
    resume_from_checkpoint: str | None = HfArg(default=None, metadata={"nargs": "?", "const": "last"},
                                               help="a checkpoint folder to continue from, or 'last' (the flag "
                                                    "alone): the newest complete one in output_dir")
    disable_tqdm: bool = HfArg(default=False, help="no progress bars")
    num_threads: int = HfArg(default=0, help="torch CPU threads per process; 0: torch's default")


RENAMED = {"max_new_tokens": "max_completion_length", "steps": "max_steps", "save_every": "save_steps",
           "resume": "resume_from_checkpoint"}  # old flag names, still accepted with a deprecation line
INVERTED = {"progress": "disable_tqdm"}


def parse_config(argv=None) -> Config:
    """The command line (HfArgumentParser over Config, see cli.py); fields not given take TOY_PRESET when --model
    is toy."""
    cfg = cli.parse(Config, argv, presets=lambda given: TOY_PRESET if given.get("model", Config.model) == "toy"
                    else {}, renamed=RENAMED, inverted=INVERTED,
                    description="ZipR1 training: GRPO on a Top-p sparse policy, rewarded for right answers and for the "
                    "tokens it drops. With --model toy (the default), unset fields take "
                    "toy.TOY_PRESET: " + ", ".join(f"{k}={v}" for k, v in TOY_PRESET.items()))
    return check_config(cfg)


def check_config(cfg: Config) -> Config:
    """Clear errors for settings that cannot work; resolves generation_batch_size, resume_from_checkpoint ("last"
    or a path) and the CUDA-dependent defaults."""
    cfg = dataclasses.replace(cfg, keep_p_grid=list(cfg.keep_p_grid),
                              resume_from_checkpoint=resume_target(cfg.resume_from_checkpoint))
    if cfg.generation_batch_size:
        if cfg.generation_batch_size < 0 or cfg.generation_batch_size % cfg.num_generations:
            raise ConfigError(f"generation_batch_size={cfg.generation_batch_size} must be a multiple of "
                              f"num_generations={cfg.num_generations} (it counts completions, G * N)")
        cfg = dataclasses.replace(cfg, per_step_questions=cfg.generation_batch_size // cfg.num_generations)
    if not all(0 < p <= 1 for p in cfg.keep_p_grid) or not cfg.keep_p_grid:
        raise ConfigError(f"keep_p_grid values must lie in (0, 1], got {cfg.keep_p_grid}")
    if not 0 <= cfg.keep_p_low < 1:
        raise ConfigError(f"keep_p_low must lie in [0, 1), got {cfg.keep_p_low}")
    for name, low in (("num_generations", 2), ("per_step_questions", 1), ("num_iterations", 1), ("max_steps", 1)):
        if getattr(cfg, name) < low:
            raise ConfigError(f"{name} must be >= {low}, got {getattr(cfg, name)}")
    if cfg.num_threads < 0:
        raise ConfigError(f"num_threads must be >= 0 (0: torch's default), got {cfg.num_threads}")
    if cfg.rollout_questions < 0:
        raise ConfigError(f"rollout_questions must be >= 0 (0: all of a process's), got {cfg.rollout_questions}")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's process count
    if cfg.per_step_questions % world:
        raise ConfigError(f"per_step_questions={cfg.per_step_questions} must be a multiple of the {world} processes "
                          f"(each takes whole question groups, the same number)")
    for name, ok, allowed in (("sparsity_coef", cfg.sparsity_coef >= 0, ">= 0"),
                              ("sparsity_temperature", cfg.sparsity_temperature > 0, "> 0"),
                              ("sparsity_target", 0 <= cfg.sparsity_target < 1, "in [0, 1)"),
                              ("sparsity_warmup_steps", cfg.sparsity_warmup_steps >= 0, ">= 0"),
                              ("sparsity_target_steps", cfg.sparsity_target_steps >= 0, ">= 0"),
                              ("sparsity_accuracy_hold", 0 <= cfg.sparsity_accuracy_hold < 1, "in [0, 1)"),
                              ("sparsity_cycle_steps", cfg.sparsity_cycle_steps >= 0, ">= 0"),
                              ("sparsity_recovery_steps", cfg.sparsity_recovery_steps >= 0, ">= 0"),
                              ("selection_straight_through", cfg.selection_straight_through >= 0, ">= 0")):
        if not ok:
            raise ConfigError(f"{name} must be {allowed}, got {getattr(cfg, name)}")
    if cfg.sparsity_accuracy_hold and not cfg.sparsity_target_steps:
        raise ConfigError(f"sparsity_accuracy_hold={cfg.sparsity_accuracy_hold} paces the falling targets: it needs "
                          f"sparsity_target_steps >= 1, got {cfg.sparsity_target_steps}")
    if cfg.sparsity_recovery_steps and not cfg.sparsity_cycle_steps:
        raise ConfigError(f"sparsity_recovery_steps={cfg.sparsity_recovery_steps} ends each sparsity cycle: it needs "
                          f"sparsity_cycle_steps > {cfg.sparsity_recovery_steps}, got 0")
    if cfg.sparsity_cycle_steps and not 0 < cfg.sparsity_recovery_steps < cfg.sparsity_cycle_steps:
        raise ConfigError(f"sparsity_recovery_steps={cfg.sparsity_recovery_steps} must be in [1, sparsity_cycle_steps"
                          f" - 1 = {cfg.sparsity_cycle_steps - 1}] when cycling (each cycle compresses, then recovers)")
    if cfg.probe_scorer_learning_rate is not None and not cfg.probe_scorer_learning_rate >= 0:
        raise ConfigError(f"probe_scorer_learning_rate must be >= 0, got {cfg.probe_scorer_learning_rate}")
    if cfg.probe_scorer and not cfg.selection_straight_through:
        raise ConfigError("probe_scorer is trained through the straight-through selection: it needs "
                          f"selection_straight_through > 0, got {cfg.selection_straight_through}")
    for name in PER_LAYER_VALUES:  # τ*_j and f_j
        if not all(0 <= v < 1 for v in getattr(cfg, name)):
            raise ConfigError(f"{name} must each be in [0, 1), got {getattr(cfg, name)}")
    if cfg.sparsity_layer_floors and cfg.sparsity_layer_targets and any(
            f > t for f, t in zip(cfg.sparsity_layer_floors, cfg.sparsity_layer_targets)):
        raise ConfigError(f"sparsity_layer_floors {cfg.sparsity_layer_floors} must each be at most the layer's "
                          f"target in sparsity_layer_targets {cfg.sparsity_layer_targets}")
    if any(j < 0 for j in cfg.sparsity_skip_layers):
        raise ConfigError(f"sparsity_skip_layers must be layer indices >= 0, got {cfg.sparsity_skip_layers}")
    if cfg.sparsity_gate not in SPARSITY_GATES:
        raise ConfigError(f"sparsity_gate must be one of {SPARSITY_GATES}, got {cfg.sparsity_gate!r}")
    if cfg.lr_scheduler_type not in LR_SCHEDULES:
        raise ConfigError(f"lr_scheduler_type must be one of {LR_SCHEDULES}, got {cfg.lr_scheduler_type!r}")
    if cfg.loss_type not in grpo.LOSS_TYPES:
        raise ConfigError(f"loss_type must be one of {grpo.LOSS_TYPES}, got {cfg.loss_type!r}")
    if cfg.scale_rewards not in grpo.REWARD_SCALINGS:
        raise ConfigError(f"scale_rewards must be one of {grpo.REWARD_SCALINGS}, got {cfg.scale_rewards!r}")
    check_ranges(cfg)
    cuda = torch.cuda.is_available()
    return dataclasses.replace(cfg, bf16=cuda if cfg.bf16 is None else cfg.bf16, gradient_checkpointing=cuda
                               if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing)


def resume_target(value) -> str | None:
    """resume_from_checkpoint as run_dir reads it: None (start fresh), "last", or a checkpoint path. true/yes/1 mean
    "last" (TRL's `--resume_from_checkpoint true`), false/no/0 and "" mean None."""
    if value is None or str(value).lower() in ("", "false", "no", "0"):
        return None
    return "last" if value is True or str(value).lower() in ("last", "true", "yes", "1") else str(value)


SEED_RANGE = (0, 2**64 - 1)  # what torch.manual_seed takes (unsigned 64-bit)


def check_ranges(cfg: Config) -> None:
    """One ConfigError per setting outside the range where it means something (NaN and infinity included), and an
    output_dir that cannot be written: before any model or data loads."""
    floats = [f.name for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), float)]
    for name in floats + ["keep_p_grid"]:
        values = getattr(cfg, name) if name == "keep_p_grid" else [getattr(cfg, name)]
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(f"{name} must be a finite number, got {getattr(cfg, name)}")
    ranges = {"max_completion_length": (cfg.max_completion_length >= 1, ">= 1"),
              "save_steps": (cfg.save_steps >= 1, ">= 1"),
              "save_total_limit": (cfg.save_total_limit >= 1, ">= 1 (the newest checkpoints kept)"),
              "learning_rate": (cfg.learning_rate >= 0, ">= 0"), "warmup_steps": (cfg.warmup_steps >= 0, ">= 0"),
              "weight_decay": (cfg.weight_decay >= 0, ">= 0"),
              "temperature": (cfg.temperature >= 0, ">= 0 (0: greedy)"), "beta": (cfg.beta >= 0, ">= 0"),
              "epsilon": (0 < cfg.epsilon < 1, "in (0, 1) (1 or more clips nothing)"),
              "epsilon_high": (cfg.epsilon_high is None or cfg.epsilon_high >= 0, ">= 0 (or unset: epsilon)"),
              "max_grad_norm": (cfg.max_grad_norm > 0, "> 0"),
              "gate_threshold": (0 < cfg.gate_threshold <= 1, "in (0, 1]"),
              "format_reward_weight": (cfg.format_reward_weight >= 0, ">= 0"),
              "prompt_template": (cfg.prompt_template in media.PROMPT_TEMPLATES, f"one of {media.PROMPT_TEMPLATES}"),
              "accuracy_reward": (cfg.accuracy_reward in rewards.ACCURACY_REWARDS,
                                  f"one of {rewards.ACCURACY_REWARDS}"),
              "max_prompt_length": (cfg.max_prompt_length is None or cfg.max_prompt_length >= 1,
                                    ">= 1 (or None: no limit)"),
              "seed": (SEED_RANGE[0] <= cfg.seed <= SEED_RANGE[1], "in [0, 2**64 - 1] (torch.manual_seed's range)")}
    ranges.update({name: (False, allowed) for name, allowed in InputSizes.problems(cfg).items()})
    for name, (ok, allowed) in ranges.items():
        if not ok:
            raise ConfigError(f"{name} must be {allowed}, got {getattr(cfg, name)}")
    check_output_dir(cfg.output_dir)


def check_output_dir(output_dir: str) -> None:
    """output_dir names a folder this user can create or write into."""
    if not str(output_dir).strip():
        raise ConfigError("output_dir must name a folder, got '' (it would write into the current directory)")
    path = Path(output_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir {output_dir} is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())  # the folder itself, or where it would be made
    if not existing.is_dir():
        raise ConfigError(f"output_dir {output_dir} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {output_dir} cannot be written: {existing} is not writable by this user")


def check_sources(cfg: Config, model_dir: str, num_rows: int, reference_dir: str | None = None) -> None:
    """What the loaded data and the model folders allow: enough rows per step; a --ref_model that scores the same
    tokens; --overwrite_output_dir would not delete the model the run starts from or its reference (e.g. --model
    outs/x/checkpoint-12 --output_dir outs/x)."""
    if cfg.per_step_questions > num_rows:
        raise ConfigError(f"per_step_questions={cfg.per_step_questions} exceeds the {num_rows} usable rows of "
                          f"{cfg.dataset}")
    if cfg.sparsity_skip_layers or any(getattr(cfg, name) for name in PER_LAYER_VALUES):
        from transformers import AutoConfig
        layers = AutoConfig.from_pretrained(model_dir).get_text_config().num_hidden_layers
        if cfg.sparsity_skip_layers and (max(cfg.sparsity_skip_layers) >= layers
                                         or len(set(cfg.sparsity_skip_layers)) == layers):
            raise ConfigError(f"sparsity_skip_layers={cfg.sparsity_skip_layers} must name some, not all, of the "
                              f"model's {layers} decoder layers (0..{layers - 1})")
        for name, what in PER_LAYER_VALUES.items():
            values = getattr(cfg, name)
            if values and len(values) != layers:
                raise ConfigError(f"{name} has {len(values)} values; the model has {layers} decoder layers: give "
                                  f"one {what} per layer")
    reference_dir = reference_dir or model_dir
    if reference_dir != model_dir and cfg.beta > 0:
        check_same_vocabulary(model_dir, reference_dir)
    output = Path(cfg.output_dir).resolve()
    for role, folder in (("model it starts from", model_dir), ("reference model", reference_dir)):
        if cfg.overwrite_output_dir and cfg.resume_from_checkpoint is None and any(
                Path(folder).resolve().is_relative_to(c.resolve()) for c in checkpoints(output)):
            raise ConfigError(f"--overwrite_output_dir would delete the {role} ({folder} lies in {cfg.output_dir}): "
                              f"pass another --output_dir, or copy the model out first")


def check_same_vocabulary(model_dir: str, reference_dir: str) -> None:
    """The KL term compares the two models' log-probs of the same token ids: their vocabularies must agree."""
    from transformers import AutoConfig
    sizes = [AutoConfig.from_pretrained(d).get_text_config().vocab_size for d in (model_dir, reference_dir)]
    if sizes[0] != sizes[1]:
        raise ConfigError(f"--ref_model {reference_dir} has a vocabulary of {sizes[1]} tokens, the model "
                          f"{model_dir} {sizes[0]}: the KL term needs the same tokenizer")


def resolve_sources(cfg: Config) -> tuple[str, str, str]:
    """(model directory, dataset, reference directory) with "toy" replaced by the cached warmed-up tiny model and
    written toy data; the reference is the model's directory unless --ref_model names another."""
    model = resolve_model(cfg.model, cfg)
    reference = model if cfg.ref_model in (None, cfg.model) else resolve_model(cfg.ref_model, cfg)
    dataset = cfg.dataset
    if dataset == "toy":
        dataset = str(toy.rl_dataset(TOY_TRAIN_ROWS, TOY_CACHE))  # a new task version: new data
    return model, dataset, reference


def resolve_model(name: str, cfg: Config) -> str:
    """A model folder on disk: "toy" is the shipped (or cached) warmed-up tiny model; otherwise a local directory or
    a hub id in the local cache (ModelNotAvailable, one line, when not on disk offline)."""
    if name == "toy":
        return str(toy.ensure_toy_model(TOY_CACHE / "toy-model", progress=not cfg.disable_tqdm))
    folder = str(media.resolve_model_dir(name))
    media.check_model_dir(folder)  # empty folder, torn config.json, no weights: one line, before loading
    return folder
