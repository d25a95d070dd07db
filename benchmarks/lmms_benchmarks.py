"""The paper's 13 benchmarks with lmms-eval: Full, ZipVL (keep_p 0.975) and a trained ZipR1 checkpoint -> Markdown.

    python benchmarks/lmms_benchmarks.py --check_tasks             # the task names against the installed lmms-eval
    python benchmarks/lmms_benchmarks.py --model Qwen/Qwen2.5-VL-7B-Instruct --zipr1 outputs/zipr1/checkpoint-1000
    python benchmarks/lmms_benchmarks.py --toy                     # CPU: local toy tasks, toy_model, tests the table

Each method is one `python -m lmms_eval --model zipr1` run over all tasks (results under --output_dir/<method>/,
τ and KV bytes per task in zipr1_stats.json beside them); the table (--output_dir/table.md) has each benchmark's
accuracy and τ per method. Full runs the stock attention (attn_implementation=sdpa, τ = 1). Needs the install of
docs/lmms_eval.md, the datasets in HF_HOME (downloaded by lmms-eval on first use) and a GPU for real models.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (paper's name, lmms-eval task, the metric read as accuracy, what the dataset needs)
BENCHMARKS = [
    ("MME", "mme", "mme_perception_score", "HF token (dataset_kwargs token: True)"),
    ("MMBench", "mmbench_en_dev", "gpt_eval_score", "HF token; scored by a GPT judge: OPENAI_API_KEY"),
    ("MMStar", "mmstar", "average", ""),
    ("ChartQA", "chartqa", "relaxed_overall", "HF token"),
    ("TextVQA", "textvqa_val", "exact_match", ""),
    ("OCRBench", "ocrbench", "ocrbench_accuracy", "HF token"),
    ("MMMU-Pro (standard)", "mmmu_pro_standard", "mmmu_acc", ""),
    ("MMMU-Pro (vision)", "mmmu_pro_vision", "mmmu_acc", ""),
    ("Video-MME", "videomme", "videomme_perception_score", "HF token; videos unpacked under HF_HOME (~100 GB)"),
    ("MLVU", "mlvu_dev", "mlvu_percetion_score", "HF token; videos under HF_HOME"),
    ("Video-MMMU", "video_mmmu", "mmmu_acc", "videos under HF_HOME"),
    ("PerceptionTest", "perceptiontest_val_mc", "accuracy", "videos under HF_HOME"),
    ("EgoSchema", "egoschema_subset", "score", "videos under HF_HOME"),
    ("TempCompass", "tempcompass", "avg_accuracy", "videos under HF_HOME"),
]
TOY = [("toy (generate)", "zipr1_toy", "exact_match", "local"), ("toy (multiple choice)", "zipr1_toy_mc", "acc",
                                                                  "local")]


def methods(model: str, zipr1: str, keep_p: float) -> dict[str, str]:
    """method -> model_args."""
    return {"Full": f"pretrained={model},attn_implementation=sdpa", "ZipVL": f"pretrained={model},keep_p={keep_p}",
            "ZipR1": f"pretrained={zipr1},keep_p={keep_p}"}


def installed_tasks() -> set[str]:
    """Every task and group name the installed lmms-eval knows."""
    from lmms_eval.tasks import TaskManager
    return set(TaskManager().all_tasks)


def check_tasks(benchmarks=BENCHMARKS) -> list[tuple[str, str, bool]]:
    known = installed_tasks()
    return [(name, task, task in known) for name, task, _, _ in benchmarks]


def run_method(model_args: str, tasks: list[str], out: Path, include_path: str | None, batch_size: int,
               limit: int | None) -> None:
    """One lmms-eval run; fails on a non-zero exit and on the "Error during evaluation" it exits 0 after."""
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "zipr1", "--model_args",
           f"{model_args},stats_path={out / 'zipr1_stats.json'}", "--tasks", ",".join(tasks), "--batch_size",
           str(batch_size), "--output_path", str(out)] + (["--include_path", include_path] if include_path else []) \
        + (["--limit", str(limit)] if limit else [])
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    (out / "lmms_eval.log").parent.mkdir(parents=True, exist_ok=True)
    (out / "lmms_eval.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or "Error during evaluation" in done.stdout + done.stderr:
        sys.exit(f"error: lmms-eval failed for {model_args}: see {out / 'lmms_eval.log'}")


def read_method(out: Path) -> tuple[dict, dict]:
    """(lmms-eval's results per task, zipr1_stats per task) of one method's output folder."""
    found = sorted(out.rglob("*_results.json"))
    if not found:
        sys.exit(f"error: no lmms-eval results JSON under {out}")
    return json.loads(found[-1].read_text())["results"], json.loads((out / "zipr1_stats.json").read_text())


def accuracy(task_results: dict, metric: str) -> float | None:
    """The metric's value (lmms-eval keys it '<metric>,<filter>'), the first listed filter."""
    for key, value in task_results.items():
        if key.split(",")[0] == metric and isinstance(value, (int, float)):
            return float(value)
    return None


def markdown_table(benchmarks, per_method: dict[str, tuple[dict, dict]]) -> str:
    """The paper's table: one row per benchmark, accuracy and τ of each method."""
    names = list(per_method)
    head = "| benchmark | task | " + " | ".join(f"{m} acc | {m} τ" for m in names) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(names))]
    fmt = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
    for name, task, metric, _ in benchmarks:
        cells = []
        for m in names:
            results, stats = per_method[m]
            cells += [fmt(accuracy(results.get(task, {}), metric)), fmt(stats.get(task, {}).get("token_ratio"))]
        lines.append(f"| {name} | `{task}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct", help="base model (Full, ZipVL)")
    parser.add_argument("--zipr1", help="the trained checkpoint (ZipR1)")
    parser.add_argument("--keep_p", type=float, default=0.975)
    parser.add_argument("--tasks", help="comma-separated lmms-eval tasks (default: the 13 benchmarks)")
    parser.add_argument("--output_dir", default="outputs/lmms_benchmarks")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--limit", type=int, help="questions per task (lmms-eval --limit), for a quick look")
    parser.add_argument("--check_tasks", action="store_true", help="only check the task names, print a table")
    parser.add_argument("--toy", action="store_true", help="CPU: local toy tasks with toy_model (Full = ZipR1 = toy)")
    args = parser.parse_args(argv)
    if args.check_tasks:
        print("| benchmark | lmms-eval task | in the installed lmms-eval |\n|---|---|---|")
        for name, task, ok in check_tasks():
            print(f"| {name} | `{task}` | {'yes' if ok else 'NO'} |")
        return
    out = Path(args.output_dir)
    include_path = None
    benchmarks = BENCHMARKS
    if args.toy:
        from lmms_eval_zipr1.toy_tasks import write_toy_tasks
        include_path, benchmarks = str(write_toy_tasks(out / "toy_tasks", n=20)), TOY
        args.model = str(ROOT / "toy_model")
        args.zipr1 = args.zipr1 or args.model
    if not args.zipr1:
        parser.error("--zipr1 CHECKPOINT is required (or --toy)")
    if args.tasks:
        wanted = args.tasks.split(",")
        benchmarks = [b for b in benchmarks if b[1] in wanted] + [(t, t, "acc", "") for t in wanted
                                                                   if t not in {b[1] for b in benchmarks}]
    tasks = [b[1] for b in benchmarks]
    per_method = {}
    for method, model_args in methods(args.model, args.zipr1, args.keep_p).items():
        run_method(model_args, tasks, out / method, include_path, args.batch_size, args.limit)
        per_method[method] = read_method(out / method)
    table = markdown_table(benchmarks, per_method)
    (out / "table.md").write_text(table)
    print(table + f"written to {out / 'table.md'}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
