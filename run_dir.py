"""A training run's output folder: HF checkpoints, the metrics log, the curves plot, and what --resume picks up.

    output_dir/checkpoint-<step>/   save_pretrained (model + processor, loadable by plain transformers)
                                    + trainer_state.pt (step, optimizer state keyed by parameter name, config)
    output_dir/metrics.jsonl        one line of metrics per step
    output_dir/metrics.png          reward, accuracy and token ratio τ (and the relaxed τ̃) over steps
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

import multi_gpu


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-<step> folders of a run, oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def save_checkpoint(policy, processor, optimizer, cfg, step: int, dist=multi_gpu.SINGLE) -> Path:
    """HF folder (save_pretrained: loadable by plain transformers) + optimizer state; keeps save_total_limit.
    Under torchrun every rank joins the gathers and rank 0 writes one consolidated checkpoint."""
    output_dir = Path(cfg.output_dir)
    path = output_dir / f"checkpoint-{step}"
    multi_gpu.save_pretrained(policy, path, dist)
    optimizer_state = multi_gpu.optimizer_state(policy, optimizer, dist)  # full, keyed by parameter name
    if dist.is_main:
        processor.save_pretrained(path)
        torch.save({"step": step, "optimizer": optimizer_state, "config": dataclasses.asdict(cfg)},
                   path / "trainer_state.pt")
        for old in checkpoints(output_dir)[:-cfg.save_total_limit]:
            shutil.rmtree(old)
    multi_gpu.barrier(dist)
    return path


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    lines = path.read_text().splitlines() if path.is_file() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


def plot_metrics(metrics: list[dict], path: Path) -> None:
    """PNG of reward, accuracy and token ratio tau over steps: per step (thin) and a moving average."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps, window = [m["step"] for m in metrics], max(1, min(25, len(metrics) // 5))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, label in zip(axes, ("reward", "accuracy", "tau"), ("reward r", "accuracy", "token ratio τ")):
        values = torch.tensor([m[key] for m in metrics], dtype=torch.float64)
        smooth = values.cumsum(0)
        smooth[window:] = smooth[window:] - smooth[:-window].clone()
        smooth /= torch.arange(1, len(values) + 1).clamp(max=window)  # mean of the last `window` steps
        ax.plot(steps, values, lw=0.6, alpha=0.4)
        ax.plot(steps, smooth, lw=1.8, label=f"mean of {window}")
        if key == "tau" and "tau_relaxed" in metrics[0]:  # the relaxed count of the loss term, beside the hard τ
            ax.plot(steps, [m["tau_relaxed"] for m in metrics], lw=1.0, ls="--", label="τ̃ (relaxed, loss term)")
            ax.legend(fontsize=8)
        ax.set(xlabel="step", title=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prepare_output_dir(cfg) -> tuple[Path | None, list[dict]]:
    """(checkpoint to resume or None, metrics kept); refuses to write over an earlier run by accident."""
    output_dir, metrics_path = Path(cfg.output_dir), Path(cfg.output_dir) / "metrics.jsonl"
    existing = checkpoints(output_dir)
    if cfg.resume and existing:
        last = existing[-1]
        kept = read_metrics(metrics_path, int(last.name.split("-")[-1]))  # later lines are redone
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        return last, kept
    if (existing or metrics_path.is_file()) and not (cfg.resume or cfg.overwrite_output_dir):
        raise FileExistsError(f"output_dir {output_dir} already holds a run: pass --resume to continue it, "
                              f"--overwrite_output_dir to start over, or another --output_dir")
    for old in existing:  # only what a run writes, never the folder itself
        shutil.rmtree(old)
    metrics_path.unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    return None, []
