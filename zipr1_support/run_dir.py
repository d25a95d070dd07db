"""A training run's output folder: HF checkpoints, the metrics log, the curves plot, and what
--resume_from_checkpoint picks up.

    output_dir/checkpoint-<step>/   save_pretrained (model + processor, loadable by plain transformers)
                                    + trainer_state.pt (step, optimizer state keyed by parameter name, config)
    output_dir/metrics.jsonl        one line of metrics per step
    output_dir/metrics.png          reward, accuracy and token ratio τ (and the relaxed τ̃) over steps
    output_dir/bad_rows.jsonl       rows whose media failed while training (train.py replaces them; kept on restart)

A checkpoint is written to checkpoint-<step>.tmp and renamed when complete, so a run killed while saving leaves no
half-written checkpoint-<step>; --resume_from_checkpoint still checks each (config, weights, trainer state) newest
first, moves an incomplete one aside to checkpoint-<step>.incomplete and says so in one line. A torn last line of
metrics.jsonl (a run killed while logging) is dropped.
"""
from __future__ import annotations

import atexit
import dataclasses
import fcntl
import json
import math
import os
import signal
import shutil
import sys
import time
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from zipr1_support import multi_gpu

DEFAULT_OUTPUT_DIR = "outputs/zipr1"  # train.py's run folder (Config.output_dir); eval.py finds ZipR1 there


# ----------------------------------------------------------------------------------------------- atomic writes
# Every file or folder the code writes for later reuse is written aside, then renamed into place: a killed run
# never leaves a torn one, and concurrent writers never write into each other's files.
def write_text_atomically(path: Path, text: str) -> None:
    """path's text replaced in one rename: written to a file private to this process beside it first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def private_build_folder(folder: Path) -> Path:
    """An empty folder beside `folder`, private to this process: concurrent builders never share one."""
    work = folder.with_name(f"{folder.name}.building-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    return work


def move_into_place(work: Path, folder: Path, complete=lambda folder: False) -> Path:
    """Rename the finished build `work` to `folder`. If another process finished the same build first (complete(folder)
    holds), its folder is kept and ours dropped; a stale folder, or one built with other settings, is replaced."""
    try:
        work.rename(folder)
    except OSError:  # folder exists and is not empty
        if not complete(folder):
            shutil.rmtree(folder)
            work.rename(folder)
    shutil.rmtree(work, ignore_errors=True)
    return folder


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-<step> folders of a run, oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


class ResumeError(ValueError):
    """--resume_from_checkpoint cannot continue this output_dir (reported as one line by train.main)."""


class SaveError(OSError):
    """A checkpoint cannot be written (full disk): one line naming the folder and the bytes needed."""


LOCK_FILE = ".zipr1.lock"
_held_locks: dict[Path, object] = {}  # output_dir -> the open lock file, held until this process ends


@atexit.register
def _release_locks() -> None:
    """Closes the held lock files at exit (the OS would drop the locks anyway; this avoids ResourceWarnings)."""
    while _held_locks:
        _held_locks.popitem()[1].close()


def lock_output_dir(output_dir) -> None:
    """Claims output_dir for this process (fcntl.flock on output_dir/.zipr1.lock; the OS releases it when the
    process ends, also when killed): a second run started in the same folder stops at once with one line, instead
    of both writing the same checkpoint-<step>.tmp. Re-entrant within a process."""
    output_dir = Path(output_dir).resolve()
    if output_dir in _held_locks:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = open(output_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ResumeError(f"output_dir {output_dir} is in use by another run ({holder}): wait for it to end, or "
                          f"pass another --output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _held_locks[output_dir] = handle


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_bytes_estimate(policy, optimizer) -> int:
    """Bytes a checkpoint takes: the newest one's size when there is one (see check_free_space), else the
    parameters as stored plus the optimizer's state tensors (AdamW: two fp32 moments per trained parameter)."""
    weights = sum(p.numel() * p.element_size() for p in policy.parameters())
    moments = sum(2 * p.numel() * 4 for group in optimizer.param_groups for p in group["params"])
    return weights + moments


def check_free_space(output_dir: Path, needed: int, step: int) -> None:
    """SaveError naming the folder and the bytes needed when the disk holding output_dir has less free."""
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise SaveError(f"cannot save checkpoint-{step}: {output_dir} has {free:,} bytes free, the checkpoint needs "
                        f"about {needed:,}: free some space, then run the same command with "
                        f"--resume_from_checkpoint (it continues from the last complete checkpoint)")


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def save_checkpoint(policy, processor, optimizer, cfg, step: int, dist=multi_gpu.SINGLE) -> Path:
    """HF folder (save_pretrained: loadable by plain transformers) + optimizer state; keeps save_total_limit.
    Written to checkpoint-<step>.tmp, then renamed: checkpoint-<step> only ever holds a complete checkpoint.
    Under torchrun every rank joins the gathers and rank 0 writes one consolidated checkpoint."""
    output_dir = Path(cfg.output_dir)
    path, tmp = output_dir / f"checkpoint-{step}", output_dir / f"checkpoint-{step}.tmp"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    last = checkpoints(output_dir)[-1:] if dist.is_main else []
    needed = folder_bytes(last[0]) if last else checkpoint_bytes_estimate(policy, optimizer)
    try:  # every rank learns that the disk is full, and stops
        short = dist.is_main and shutil.disk_usage(output_dir).free < needed
        if multi_gpu.all_sum(float(short), dist):
            check_free_space(output_dir, needed, step)
            raise SaveError(f"cannot save checkpoint-{step}: {output_dir} is full on rank 0")
        multi_gpu.barrier(dist)
        multi_gpu.save_pretrained(policy, tmp, dist)
        optimizer_state = multi_gpu.optimizer_state(policy, optimizer, dist)  # full, keyed by parameter name
        if dist.is_main:
            processor.save_pretrained(tmp)
            torch.save({"step": step, "optimizer": optimizer_state, "config": dataclasses.asdict(cfg)},
                       tmp / "trainer_state.pt")
    except (OSError, RuntimeError, SafetensorError) as err:  # a write failed: full disk, quota, file size limit
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # no half-written checkpoint is left behind
        if isinstance(err, SaveError):
            raise
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
        free = shutil.disk_usage(output_dir).free
        raise SaveError(f"cannot save checkpoint-{step}: writing it in {output_dir} failed ({cause}); {free:,} bytes "
                        f"free, about {needed:,} needed: free some space, then run the same command with "
                        f"--resume_from_checkpoint (it continues from the last complete checkpoint)") from None
    if dist.is_main:
        move_into_place(tmp, path)  # a step saved again (resumed before it): the new one replaces it
        for old in checkpoints(output_dir)[:-cfg.save_total_limit]:
            shutil.rmtree(old)
    multi_gpu.barrier(dist)
    return path


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint (a missing or torn file), or None. Cheap: headers only."""
    from safetensors import safe_open
    try:
        json.loads((path / "config.json").read_text())
        index = path / "model.safetensors.index.json"
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
            ["model.safetensors"]
        for name in [*shards, "trainer_state.pt"]:
            if not (path / name).is_file():
                return f"no {name}"
        for shard in shards:
            with safe_open(str(path / shard), "pt"):  # the header parses and the file holds what it announces
                pass
        with zipfile.ZipFile(path / "trainer_state.pt"):  # torch.save's zip: a torn file has no central directory
            pass
    except FileNotFoundError as err:  # safetensors' error carries no filename: name the file ourselves
        return f"no {Path(err.filename).name}" if err.filename else f"a missing file ({err})"
    except Exception as err:  # OSError, ValueError, KeyError, BadZipFile, and safetensors' own errors
        return f"unreadable: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return None


def resumable_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete newer ones are renamed checkpoint-<step>.incomplete, one line each."""
    for path in reversed(checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        aside = path.with_name(path.name + ".incomplete")
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)
        print(f"resume: {path.name} is incomplete ({problem}): moved to {aside.name}, trying the one before",
              file=sys.stderr)
    return None


def chosen_checkpoint(path) -> Path:
    """A checkpoint folder named by --resume_from_checkpoint PATH, checked like the newest one; ResumeError if not."""
    path = Path(path)
    if not path.is_dir() or not path.name.split("-")[-1].isdigit():
        raise ResumeError(f"--resume_from_checkpoint {path}: not a checkpoint-<step> folder (or pass 'last')")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ResumeError(f"--resume_from_checkpoint {path}: the checkpoint is incomplete ({problem})")
    return path


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    """The logged steps (<= up_to_step); a torn last line (a run killed while writing it) is dropped."""
    lines = [line for line in (path.read_text().splitlines() if path.is_file() else []) if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ResumeError(f"{path}: line {number} is not JSON (only a torn last line is dropped)") from None
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


def read_bad_rows(output_dir: Path) -> dict[int, str]:
    """{source row index: why} of the rows whose media failed during this run's training (train.py)."""
    found = {}
    for line in (output_dir / "bad_rows.jsonl").read_text().splitlines() if (output_dir / "bad_rows.jsonl").is_file() \
            else []:
        try:
            entry = json.loads(line)
            found[int(entry["row"])] = entry["error"]
        except (ValueError, KeyError, TypeError):  # a torn line
            continue
    return found


def record_bad_row(output_dir: Path, row: int, error: str, step: int) -> Path:
    path = output_dir / "bad_rows.jsonl"
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log:
        log.write(json.dumps({"row": row, "step": step, "error": error}) + "\n")
    return path


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
    """(checkpoint to resume or None, metrics kept); refuses to write over an earlier run by accident, and to resume
    what cannot be resumed. Changes nothing on disk except moving incomplete checkpoints aside (see start_output_dir).
    """
    output_dir, metrics_path = Path(cfg.output_dir), Path(cfg.output_dir) / "metrics.jsonl"
    existing = checkpoints(output_dir)
    text = metrics_path.read_text() if metrics_path.is_file() else ""
    logged = sum(1 for line in text.splitlines() if line.strip())  # 0: an empty log (a failed start) holds no run
    resume = cfg.resume_from_checkpoint  # None, "last" or a checkpoint folder
    last = resumable_checkpoint(output_dir) if resume == "last" else chosen_checkpoint(resume) if resume else None
    if resume and (last is not None or not cfg.overwrite_output_dir):  # both flags, nothing to resume: start over
        if last is None:
            held = f"{logged} logged steps but no complete checkpoint" if logged else "no checkpoint"
            raise ResumeError(f"--resume_from_checkpoint: output_dir {output_dir} holds {held} to resume from: pass "
                              f"--overwrite_output_dir to start over (deletes its checkpoints and metrics.jsonl)")
        if checkpoint_step(last) > cfg.max_steps:
            raise ResumeError(f"--resume_from_checkpoint: {last} is already past --max_steps {cfg.max_steps}: pass "
                              f"--max_steps larger than {checkpoint_step(last)} to train further")
        return last, read_metrics(metrics_path, checkpoint_step(last))  # later lines are redone
    if (existing or logged) and not cfg.overwrite_output_dir:
        raise FileExistsError(f"output_dir {output_dir} already holds a run: pass --resume_from_checkpoint to "
                              f"continue it, --overwrite_output_dir to start over, or another --output_dir")
    return None, []


def start_output_dir(cfg, resume_from: Path | None, kept: list[dict]) -> None:
    """Once the run has loaded everything: clears an overwritten run (only what a run writes, never the folder
    itself; bad_rows.jsonl stays, the data did not change), or trims metrics.jsonl to the resumed checkpoint."""
    output_dir, metrics_path = Path(cfg.output_dir), Path(cfg.output_dir) / "metrics.jsonl"
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob("checkpoint-*.tmp"):  # a save that was killed
        shutil.rmtree(stale)
    if resume_from is not None and metrics_path.is_file():
        write_text_atomically(metrics_path, "".join(json.dumps(m) + "\n" for m in kept))
    if resume_from is None and cfg.overwrite_output_dir:
        for old in checkpoints(output_dir):
            shutil.rmtree(old)
        metrics_path.unlink(missing_ok=True)


class Stopped(Exception):
    """The run stopped on a signal (train.main prints `message` and exits 128 + signum, as a killed process would);
    an empty message: stopped before a step could finish (train.interrupted says what can be resumed)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum, self.message = signum, message


class StopOnSignal:
    """SIGTERM (what schedulers send before killing) and SIGINT (Ctrl-C) while training. Once the steps run
    (`stepping`), the first signal prints one line and lets the current step finish; train.py then saves a checkpoint
    and stops (Stopped). Before the first step, or at a second signal, Stopped is raised at once. Only the main
    thread can take signals: elsewhere this does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum, self.stepping, self.previous = None, False, {}

    def install(self) -> "StopOnSignal":
        import threading
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._received) for s in self.SIGNALS}
        return self

    def uninstall(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _received(self, signum, frame) -> None:
        if self.signum is not None or not self.stepping:
            self.uninstall()
            raise Stopped(signum)
        self.signum = signum
        print(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint (send it again to stop "
              f"at once)", file=sys.stderr, flush=True)

    def requested(self, dist=multi_gpu.SINGLE) -> bool:
        """Whether any rank took a signal (all ranks stop after the same step)."""
        return multi_gpu.all_sum(float(self.signum is not None), dist) > 0

    def stop(self, saved: Path, step: int) -> Stopped:
        self.uninstall()
        name = signal.Signals(self.signum or signal.SIGTERM).name
        return Stopped(self.signum or signal.SIGTERM, f"stopped by {name} after step {step}: saved {saved}; run the "
                       f"same command with --resume_from_checkpoint to continue from it")


def load_trainer_state(resume_from: Path, policy, optimizer, cfg, dist=multi_gpu.SINGLE) -> int:
    """The optimizer state of checkpoint `resume_from` loaded into `optimizer` (each rank its shard); returns its step.
    Says in one line when the settings changed since (not a replay) or when there is nothing left to do."""
    state = torch.load(resume_from / "trainer_state.pt", map_location="cpu", weights_only=False,
                       mmap=True)  # ranks share the file's pages; each keeps only its shard
    multi_gpu.load_optimizer_state(policy, optimizer, state["optimizer"], dist)
    changed = [k for k, v in dataclasses.asdict(cfg).items()
               if k not in ("max_steps", "resume_from_checkpoint", "disable_tqdm") and state["config"].get(k) != v]
    if changed and dist.is_main:
        print(f"warning: resuming {resume_from} with changed settings {changed}: not a replay", file=sys.stderr)
    if state["step"] == cfg.max_steps and dist.is_main:
        print(f"nothing to do: {resume_from} is at --max_steps {cfg.max_steps}", file=sys.stderr)
    return state["step"]


def keep_p_bucket(cfg, p: float) -> str:
    """Key for per-threshold tau metrics: the grid value, or its tenth (e.g. "0.9") with uniform sampling."""
    return f"{math.floor(p * 10) / 10:.1f}" if cfg.keep_p_uniform else f"{p:.3f}"


def step_metrics(cfg, step: int, rollouts, texts, acc, tau, parts, stats, coef, optimizer, reference,
                 start: float) -> dict:
    """One line of metrics.jsonl: rewards, τ (per threshold and per layer), the update's statistics, throughput."""
    kl = stats.pop("kl")  # masked mean of k3; nan without a reference
    seconds = time.perf_counter() - start  # the step's wall time
    by_p: dict[str, list[float]] = {}
    for p, t in zip(torch.cat([r.keep_p for r in rollouts]).tolist(), tau.tolist()):
        by_p.setdefault(keep_p_bucket(cfg, p), []).append(t)
    groups = parts["reward"].reshape(-1, cfg.num_generations)  # (G, N)
    tokens = sum(int(r.completion_mask.sum()) for r in rollouts)
    by_layer = torch.cat([r.kept.float() / r.lengths[:, None].float() for r in rollouts]).mean(0).cpu()  # k_j / ℓ
    return {"step": step + 1, "reward": parts["reward"].mean().item(), "accuracy": acc.mean().item(),
            "r_eff": parts["r_eff"].mean().item(), "gate": parts["gate"].mean().item(), "tau": tau.mean().item(),
            "tau_by_keep_p": {k: sum(v) / len(v) for k, v in sorted(by_p.items())},
            "tau_by_layer": {str(j): t for j, t in enumerate(by_layer.tolist())},
            "sparsity_coef": coef, "learning_rate": optimizer.param_groups[0]["lr"],
            "kl": kl if reference is not None else None,
            "zero_std_groups": (groups.amax(1) == groups.amin(1)).float().mean().item(),
            "completion_length": tokens / len(texts), **stats,
            **({"r_format": parts["r_format"].mean().item()} if cfg.format_reward_weight else {}),
            "tokens_per_s": tokens / seconds, "seconds": seconds}


def append_metrics(path: Path, metrics: dict) -> None:
    """One line of metrics.jsonl, opened per step: a failed start leaves no empty log."""
    with open(path, "a") as log:
        log.write(json.dumps(metrics) + "\n")


def interrupted(cfg) -> str:
    """The one line printed on Ctrl-C: how to continue."""
    found = [c for c in checkpoints(Path(cfg.output_dir)) if checkpoint_problem(c) is None] \
        if cfg is not None else []
    if not found:
        return "interrupted before the first checkpoint: nothing to resume (rerun the command to start over)"
    return (f"interrupted: the last checkpoint is {found[-1]}; run the same command with --resume_from_checkpoint "
            f"to continue from it")
