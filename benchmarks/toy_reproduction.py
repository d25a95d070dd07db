"""Mini-reproduction of ZipR1 on the offline toy task (a measurement, not a test).

    python benchmarks/toy_reproduction.py                    # train ZipR1 for --steps, then evaluate
    python benchmarks/toy_reproduction.py --resume           # continue an interrupted run, then evaluate
    python benchmarks/toy_reproduction.py --eval_only        # evaluate the newest checkpoint of --output_dir

Paper claim (Qwen2.5-VL-7B): token ratio tau 80% -> 25% at <= 1.2 points accuracy. Our goal on the toy: tau at
keep_p = 0.975 halved from ZipVL (the warmed-up weights + sparse attention) to ZipR1, accuracy within 1 point.
Steps: (1) the cached warmed-up tiny model (toy.ensure_toy_model), (2) ZipR1 GRPO with train.py on the toy training
rows, (3) eval.py on held-out toy questions (a different seed): Full (stock attention), ZipVL and ZipR1 at keep_p.
Writes <output_dir>/reproduction.json and .md, and prints the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval as zipr1_eval  # noqa: E402
import run_dir  # noqa: E402
import toy  # noqa: E402
import train  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--learning_rate", type=float, default=toy.TOY_PRESET["learning_rate"])
    p.add_argument("--beta", type=float, default=train.Config.beta)
    p.add_argument("--per_step_questions", type=int, default=toy.TOY_PRESET["per_step_questions"])
    p.add_argument("--keep_p_uniform", action="store_true", help="p ~ U(keep_p_low, 1] instead of the paper's grid")
    p.add_argument("--keep_p_low", type=float, default=train.Config.keep_p_low)
    p.add_argument("--keep_p", type=float, default=0.975, help="inference threshold of ZipVL and ZipR1")
    p.add_argument("--eval_questions", type=int, default=200, help="held-out toy questions")
    p.add_argument("--output_dir", default="outputs/toy-reproduction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval_only", action="store_true")
    return p.parse_args(argv)


def train_zipr1(args) -> float:
    """ZipR1 on the toy with train.py's toy preset and the chosen overrides; returns wall seconds."""
    cfg = train.Config(**{**toy.TOY_PRESET, "max_steps": args.steps, "save_steps": 25, "learning_rate":
                          args.learning_rate, "beta": args.beta, "per_step_questions": args.per_step_questions,
                          "keep_p_uniform": args.keep_p_uniform, "keep_p_low": args.keep_p_low, "seed": args.seed,
                          "output_dir": str(Path(args.output_dir) / "train"), "resume_from_checkpoint": "last" if args.resume else None})
    start = time.perf_counter()
    train.train(train.check_config(cfg))
    return time.perf_counter() - start


def evaluate(args) -> dict:
    """eval.py on held-out toy questions: Full, ZipVL and ZipR1 (the newest checkpoint) at keep_p."""
    checkpoint = run_dir.checkpoints(Path(args.output_dir) / "train")[-1]
    return zipr1_eval.run(zipr1_eval.parse_args([
        "--zipr1", str(checkpoint), "--keep-p", str(args.keep_p), "--limit", str(args.eval_questions),
        "--sweep", "", "--out", str(Path(args.output_dir) / "eval")]))


def training_trend(path: Path, keep_p: float, window: int = 25) -> dict:
    """Rollout accuracy, KL and tau (at keep_p when it is a grid value, else all rows) over the first and last
    `window` training steps: whether the run moved at all, independent of the held-out evaluation."""
    metrics = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    key = f"{keep_p:.3f}"
    tau = lambda m: m["tau_by_keep_p"].get(key, m["tau"])  # noqa: E731
    mean = lambda rows, f: sum(f(m) for m in rows) / len(rows)  # noqa: E731
    parts = {"first": metrics[:window], "last": metrics[-window:]}
    return {name: {"steps": f"{rows[0]['step']}-{rows[-1]['step']}", "tau": mean(rows, tau),
                   "rollout_accuracy": mean(rows, lambda m: m["accuracy"]), "kl": mean(rows, lambda m: m["kl"] or 0.0)}
            for name, rows in parts.items()}


def report(args, results: dict, train_seconds: float | None) -> dict:
    m = results["methods"]
    full, zipvl, zipr1 = m["Full"], m["ZipVL"], m["ZipR1"]
    tau_before, tau_after = zipvl["token_ratio"], zipr1["token_ratio"]
    summary = {
        "steps": args.steps, "learning_rate": args.learning_rate, "beta": args.beta, "keep_p": args.keep_p,
        "keep_p_sampling": f"U({args.keep_p_low}, 1]" if args.keep_p_uniform else "paper grid 0.94..0.975",
        "eval_questions": full["questions"], "train_seconds": train_seconds,
        "accuracy": {"Full": full["accuracy"], "ZipVL": zipvl["accuracy"], "ZipR1": zipr1["accuracy"]},
        "tau": {"Full": 1.0, "ZipVL": tau_before, "ZipR1": tau_after},
        "tau_after_over_before": tau_after / tau_before,
        "accuracy_drop_vs_zipvl_points": 100 * (zipvl["accuracy"] - zipr1["accuracy"]),
        "accuracy_drop_vs_full_points": 100 * (full["accuracy"] - zipr1["accuracy"]),
    }
    summary["training"] = training_trend(Path(args.output_dir) / "train" / "metrics.jsonl", args.keep_p)
    summary["goal_met"] = summary["tau_after_over_before"] <= 0.5 and summary["accuracy_drop_vs_full_points"] <= 1
    lines = ["| Method | keep_p | Accuracy | τ |", "|---|---|---|---|"]
    lines += [f"| {name} | {args.keep_p if name != 'Full' else '—'} | {summary['accuracy'][name]:.3f} | "
              f"{summary['tau'][name]:.3f} |" for name in ("Full", "ZipVL", "ZipR1")]
    lines += ["", f"τ after / before: {summary['tau_after_over_before']:.3f} (goal ≤ 0.5); accuracy ZipR1 vs Full: "
              f"{-summary['accuracy_drop_vs_full_points']:+.1f} points, vs ZipVL: "
              f"{-summary['accuracy_drop_vs_zipvl_points']:+.1f} points (goal ≥ −1); "
              f"goal met: {summary['goal_met']}"]
    lines += [f"training rollouts, steps {t['steps']}: accuracy {t['rollout_accuracy']:.3f}, τ {t['tau']:.3f}, "
              f"KL {t['kl']:.4f}" for t in summary["training"].values()]
    out = Path(args.output_dir)
    (out / "reproduction.json").write_text(json.dumps(summary, indent=1))
    (out / "reproduction.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    seconds = None if args.eval_only else train_zipr1(args)
    return report(args, evaluate(args), seconds)


if __name__ == "__main__":
    main()
