"""Mini-reproduction of ZipR1 on the offline toy task, literal and learned recipes (a measurement, not a test).

    python benchmarks/toy_reproduction.py                       # literal, learned, two_stage: train, evaluate
                                                                # (literal beside learned -> two_stage: --jobs 2)
    python benchmarks/toy_reproduction.py --recipes learned --sparsity_coef 0.3 --output_dir outputs/r1
    python benchmarks/toy_reproduction.py --resume              # continue interrupted runs, then evaluate
    python benchmarks/toy_reproduction.py --eval_only           # evaluate the newest checkpoints of --output_dir
    python benchmarks/toy_reproduction.py --recipes learned,two_stage --literal_from outputs/toy-reproduction \
        --output_dir outputs/variant                            # a variant against an earlier literal run

Paper claim (Qwen2.5-VL-7B): token ratio tau 80% -> 25% at <= 1.2 points accuracy. Our goal on the toy: tau at
keep_p = 0.975 halved from ZipVL (the warmed-up weights + sparse attention) to ZipR1, accuracy within 1 point of Full.
Recipes: "literal" is the paper's objective (reward r_acc + C (1 - tau), sparsity_coef = 0); "learned" adds
lambda * C * tau~, the relaxed Eq. 3 count with a pathwise gradient (train.py; defaults: toy.TOY_LEARNED);
"two_stage" continues the learned run's last checkpoint with the literal objective for --recover_steps (the
relaxed term lowers tau, then the paper's reward recovers accuracy at that tau; its KL reference is that checkpoint
unless --ref_model names another, e.g. toy: the original warmed-up model).
The fair baseline: RL alone raises accuracy on the toy, so "literal" trains, by default, for as many optimizer steps
as the headline (last) recipe (two_stage: --steps + --recover_steps) on the same questions, and every other recipe
reports accuracy_drop_vs_literal_points (literal trained as long minus it, on the same held-out questions).
Steps: (1) the shipped warmed-up tiny model (toy_model/, toy.ensure_toy_model), (2) ZipR1 GRPO with train.py on
--train_questions toy training rows, per recipe, (3) eval.py on held-out toy questions: Full, ZipVL and ZipR1 at
--keep_p and over --sweep, with tau per layer. `--seed` sets the training seed, the probes and the held-out questions
alike (the training questions are the same for every seed).
Writes <output_dir>/reproduction.json and .md (the headline fields are the last recipe's), pareto.png.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
import typing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # spawned workers import this file as toy_reproduction

import torch  # noqa: E402

from zipr1_support import data  # noqa: E402
import eval as zipr1_eval  # noqa: E402
from zipr1_support import media  # noqa: E402
from zipr1_support import run_dir  # noqa: E402
import toy  # noqa: E402
import train  # noqa: E402
from zipr1_support.pictures import pareto_plot  # noqa: E402
from rollout import prefill  # noqa: E402
from sparse_qwen import make_sparse  # noqa: E402

RECIPES = ("literal", "learned", "two_stage")  # two_stage: the learned run, then the literal recipe from its checkpoint
SPARSITY = ("sparsity_coef", "sparsity_temperature", "sparsity_gate", "sparsity_target", "sparsity_warmup_steps",
            "sparsity_target_steps", "sparsity_per_layer", "sparsity_skip_layers", "sparsity_layer_targets",
            "sparsity_layer_floors", "sparsity_accuracy_hold", "sparsity_cycle_steps", "sparsity_recovery_steps")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", default="literal,learned,two_stage",
                   help="comma separated: literal, learned, two_stage (needs the learned run of this output_dir)")
    p.add_argument("--steps", type=int, default=800,
                   help="800 steps × 8 questions, cosine, as in RESULTS.md (10–20 min a recipe on one core)")
    p.add_argument("--learning_rate", type=float, default=toy.TOY_PRESET["learning_rate"])
    p.add_argument("--lr_scheduler_type", default="cosine", choices=train.LR_SCHEDULES)
    p.add_argument("--learned_lr_scheduler_type", default=None, choices=train.LR_SCHEDULES,
                   help="schedule of the learned run only (default: --lr_scheduler_type), e.g. constant: a short "
                        "stage 1 that still reaches its τ, then a cosine recovery")
    p.add_argument("--warmup_steps", type=int, default=0, help="learning-rate warm-up steps")
    p.add_argument("--beta", type=float, default=train.Config.beta)
    p.add_argument("--learned_beta", type=float, default=None,
                   help="β of the learned run only (default: --beta), e.g. a larger KL to the dense reference while "
                        "the count shrinks")
    p.add_argument("--per_step_questions", type=int, default=8, help="questions per step (train.py's toy: 2)")
    p.add_argument("--keep_p_uniform", action="store_true", help="p ~ U(keep_p_low, 1] instead of the paper's grid")
    p.add_argument("--keep_p_low", type=float, default=train.Config.keep_p_low)
    defaults, hints = train.Config(), typing.get_type_hints(train.Config)
    for name in SPARSITY:  # the learned recipe's term (the literal recipe has sparsity_coef = 0)
        default = toy.TOY_LEARNED.get(name, getattr(defaults, name))
        kind = dict(action=argparse.BooleanOptionalAction) if isinstance(default, bool) else \
            dict(type=typing.get_args(hints[name])[0], nargs="*") if isinstance(default, list) else \
            dict(type=type(default))  # a list takes its element type from train.Config (list[int], list[float])
        p.add_argument(f"--{name}", default=default, help=f"learned recipe (default {default})", **kind)
    p.add_argument("--selection_straight_through", type=float, default=0.0,
                   help="learned and two_stage runs: T of the straight-through gradient for which tokens Eq. 3 keeps "
                        "(train.py --selection_straight_through); 0: off, as in the literal baseline")
    p.add_argument("--probe_scorer", action=argparse.BooleanOptionalAction, default=False,
                   help="learned and two_stage runs: a learned probe scorer for which tokens Eq. 3 keeps (train.py "
                        "--probe_scorer; needs --selection_straight_through > 0); off in the literal baseline")
    p.add_argument("--probe_scorer_learning_rate", type=float, default=None,
                   help="the probe scorers' own AdamW rate (train.py --probe_scorer_learning_rate; default: "
                        "--learning_rate)")
    p.add_argument("--learned_init", default="toy",
                   help="the learned run's start (and KL reference, unless --ref_model): toy (the warmed-up model), "
                        "literal (the literal run's last checkpoint), or a checkpoint folder (e.g. an earlier learned "
                        "run: two stages)")
    p.add_argument("--ref_model", default=None,
                   help="KL reference of every recipe (train.py --ref_model), e.g. toy: the original warmed-up model "
                        "in the two_stage run too; default: each run's start")
    p.add_argument("--literal_steps", type=int, default=None,
                   help="literal-recipe steps (default: as many as the headline recipe's, --steps + --recover_steps "
                        "when two_stage runs: the fair baseline)")
    p.add_argument("--literal_from", default=None,
                   help="the literal baseline of another --output_dir (trained and evaluated there with the same "
                        "--seed, --eval_questions and --keep_p), instead of training it again: one literal run per "
                        "seed, paired with every variant")
    p.add_argument("--recover_steps", type=int, default=800,
                   help="two_stage: literal-recipe steps (λ = 0) from the learned run's last checkpoint")
    p.add_argument("--train_questions", type=int, default=8192,
                   help="RL training questions, written once under .cache (8192: 420 MB, 80 s; 800 steps × 8 "
                        "questions see 6400 of them. train.py's toy has 512, which 800 × 8 revisit 12.5 times: the "
                        "trained models answer those 3–7 points better than held-out ones, RESULTS.md)")
    p.add_argument("--keep_p", type=float, default=0.975, help="inference threshold of ZipVL and ZipR1")
    p.add_argument("--sweep", default="0.9,0.95,0.975", help="keep_p values of the Pareto plot")
    p.add_argument("--eval_questions", type=int, default=1000,
                   help="held-out toy questions (1000: the paired ZipR1 − Full difference has a standard error of "
                        "about 1.1 points; 200: 2.6)")
    p.add_argument("--output_dir", default="outputs/toy-reproduction")
    p.add_argument("--seed", type=int, default=0, help="training seed, probe seed and held-out questions")
    p.add_argument("--jobs", type=int, default=2,
                   help="processes, one CPU thread each: recipes that do not wait for each other (literal beside "
                        "learned → two_stage) train side by side; 1: one after another")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval_only", action="store_true")
    args = p.parse_args(argv)
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not args.recipes or set(args.recipes) - set(RECIPES):
        p.error(f"--recipes: choose from {RECIPES}, got {args.recipes}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.literal_from and "literal" in args.recipes:
        p.error(f"--literal_from {args.literal_from}: the literal run comes from there; drop literal from --recipes")
    if args.literal_steps is None:  # the literal baseline trains as long as the headline recipe
        args.literal_steps = args.steps + (args.recover_steps if args.recipes[-1] == "two_stage" else 0)
    return args


def recipe_config(args, recipe: str) -> train.Config:
    """train.py's toy preset with the chosen overrides; "literal" turns the relaxed term off (sparsity_coef = 0);
    "two_stage" is the literal recipe for --recover_steps, started from the learned run's last checkpoint."""
    out = Path(args.output_dir) / recipe / "train"
    sparsity = {k: getattr(args, k) for k in SPARSITY} if recipe == "learned" else {"sparsity_coef": 0.0}
    model, steps = "toy", args.steps
    if recipe == "learned" and args.learned_init == "literal":
        model = str(run_dir.checkpoints(Path(args.literal_from or args.output_dir) / "literal" / "train")[-1])
    elif recipe == "learned":
        model = args.learned_init
    elif recipe == "two_stage":
        model, steps = str(run_dir.checkpoints(Path(args.output_dir) / "learned" / "train")[-1]), args.recover_steps
    elif recipe == "literal":
        steps = args.literal_steps
    return train.check_config(train.Config(**{
        **toy.TOY_PRESET, **sparsity, "model": model, "ref_model": args.ref_model, "max_steps": steps,
        "dataset": str(toy.rl_dataset(args.train_questions)),
        "save_steps": 25,
        "learning_rate": args.learning_rate, "warmup_steps": args.warmup_steps,
        "lr_scheduler_type": stage_value(args, recipe, "lr_scheduler_type"), "beta": stage_value(args, recipe, "beta"),
        "per_step_questions": args.per_step_questions,
        "selection_straight_through": 0.0 if recipe == "literal" else args.selection_straight_through,
        "probe_scorer": recipe != "literal" and args.probe_scorer,
        "probe_scorer_learning_rate": args.probe_scorer_learning_rate,
        "keep_p_uniform": args.keep_p_uniform, "keep_p_low": args.keep_p_low, "seed": args.seed,
        "output_dir": str(out), "resume_from_checkpoint": "last" if args.resume else None,
        "disable_tqdm": True}))


def stage_value(args, recipe: str, name: str):
    """This recipe's `name` (beta, lr_scheduler_type): --learned_<name> for the learned run where given, else
    --<name>."""
    own = getattr(args, f"learned_{name}")
    return own if recipe == "learned" and own is not None else getattr(args, name)


def train_recipe(args, recipe: str) -> float:
    """Train one recipe; returns wall seconds."""
    start = time.perf_counter()
    train.train(recipe_config(args, recipe))
    return time.perf_counter() - start


def evaluate(args, recipe: str) -> dict:
    """eval.py on held-out toy questions: Full, ZipVL and ZipR1 (the recipe's newest checkpoint) at keep_p + sweep."""
    checkpoint = run_dir.checkpoints(Path(args.output_dir) / recipe / "train")[-1]
    return zipr1_eval.run(zipr1_eval.parse_args([
        "--zipr1", str(checkpoint), "--keep-p", str(args.keep_p), "--limit", str(args.eval_questions),
        "--sweep", args.sweep, "--seed", str(args.seed), "--out", str(Path(args.output_dir) / recipe / "eval")]))


@torch.no_grad()
def layer_token_ratios(model_dir, question_file: Path, keep_p: float, seed: int, batch_size: int = 20) -> list:
    """Mean k_j / ℓ per layer over the held-out questions under sparse prefill at keep_p (eval's probe seed)."""
    from transformers import AutoModelForImageTextToText
    model = make_sparse(AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval())
    processor, rows = media.load_processor(model_dir), data.load_dataset_rows(str(question_file)).rows
    ratios = []
    for i in range(0, len(rows), batch_size):
        items = [data.prompt_item(r, 16, "answer_only") for r in rows[i:i + batch_size]]  # the toy's prompt
        inputs = media.encode_prompts(processor, items)
        _, state, _ = prefill(model, inputs, keep_p, seed)
        ratios.append(state.kept().float() / state.lengths()[:, None])  # (B, n_layers)
    return torch.cat(ratios).mean(0).tolist()


def training_trend(path: Path, keep_p: float, window: int = 25) -> dict:
    """Rollout accuracy, KL, tau (at keep_p when it is a grid value, else all rows) and the relaxed tau~ over the
    first and last `window` training steps: whether the run moved at all, independent of the held-out evaluation."""
    metrics = run_dir.read_metrics(path)
    key = f"{keep_p:.3f}"
    tau = lambda m: m["tau_by_keep_p"].get(key, m["tau"])  # noqa: E731
    mean = lambda rows, f: sum(f(m) for m in rows) / len(rows)  # noqa: E731
    parts = {"first": metrics[:window], "last": metrics[-window:]}
    return {name: {"steps": f"{rows[0]['step']}-{rows[-1]['step']}", "tau": mean(rows, tau),
                   "tau_relaxed": mean(rows, lambda m: m.get("tau_relaxed", float("nan"))),
                   "rollout_accuracy": mean(rows, lambda m: m["accuracy"]), "kl": mean(rows, lambda m: m["kl"] or 0.0)}
            for name, rows in parts.items()}


def paired_difference(records, baseline) -> tuple[float, float]:
    """Mean per-question accuracy difference (points) of one method over another on the same questions, and its
    standard error: the paired error, smaller than the two accuracies' own errors since most questions agree."""
    d = torch.tensor([a["correct"] - b["correct"] for a, b in zip(records, baseline, strict=True)],
                     dtype=torch.float64)  # (Q,)
    return 100 * d.mean().item(), 100 * (d.std() / len(d) ** 0.5).item()


def trained_config(checkpoint) -> dict:
    """The train.Config a checkpoint was trained with (its trainer_state.pt), as a dict."""
    return torch.load(Path(checkpoint) / "trainer_state.pt", map_location="cpu", weights_only=False)["config"]


def summarize(args, recipe: str, results: dict, train_seconds: float | None) -> dict:
    m, checkpoint = results["methods"], results["config"]["zipr1"]
    cfg = trained_config(checkpoint)  # the run's own settings (with --eval_only, not this command's)
    defaults = train.Config()  # for settings a run from before their flag does not record
    full, zipvl, zipr1 = m["Full"], m["ZipVL"], m["ZipR1"]
    questions = Path(args.output_dir) / recipe / "eval" / "toy_questions" / "toy.jsonl"
    summary = {
        "recipe": recipe, "steps": cfg.get("max_steps", cfg.get("steps")),  # "steps": a run from before the rename
        "per_step_questions": cfg["per_step_questions"],
        "learning_rate": cfg["learning_rate"],
        "lr_scheduler_type": cfg.get("lr_scheduler_type", defaults.lr_scheduler_type), "beta": cfg["beta"],
        "keep_p": args.keep_p, "seed": cfg["seed"], "eval_seed": args.seed,
        **{k: cfg.get(k, getattr(defaults, k)) for k in SPARSITY},
        "selection_straight_through": cfg.get("selection_straight_through", defaults.selection_straight_through),
        "probe_scorer": cfg.get("probe_scorer", defaults.probe_scorer),
        "probe_scorer_learning_rate": cfg.get("probe_scorer_learning_rate"),
        "start": cfg["model"], "reference": cfg.get("ref_model") or cfg["model"], "dataset": cfg.get("dataset"),
        "keep_p_sampling": f"U({cfg['keep_p_low']}, 1]" if cfg["keep_p_uniform"] else "paper grid 0.94..0.975",
        "eval_questions": full["questions"], "train_seconds": train_seconds,
        "accuracy": {"Full": full["accuracy"], "ZipVL": zipvl["accuracy"], "ZipR1": zipr1["accuracy"]},
        "tau": {"Full": 1.0, "ZipVL": zipvl["token_ratio"], "ZipR1": zipr1["token_ratio"]},
        "tau_by_layer": {"ZipVL": layer_token_ratios(results["config"]["base"], questions, args.keep_p, args.seed),
                         "ZipR1": layer_token_ratios(checkpoint, questions, args.keep_p, args.seed)},
        "tau_after_over_before": zipr1["token_ratio"] / zipvl["token_ratio"],
        "accuracy_drop_vs_zipvl_points": 100 * (zipvl["accuracy"] - zipr1["accuracy"]),
        "accuracy_drop_vs_full_points": 100 * (full["accuracy"] - zipr1["accuracy"]),
        "accuracy_vs_full_standard_error_points": paired_difference(zipr1["records"], full["records"])[1],
        "sweep": results["sweep"], "full": {"accuracy": full["accuracy"]},
        "records": zipr1["records"],  # per held-out question, for the paired comparison with the literal baseline
    }
    summary["training"] = training_trend(Path(args.output_dir) / recipe / "train" / "metrics.jsonl", args.keep_p)
    summary["goal_met"] = (summary["tau_after_over_before"] <= 0.5  # rounded: 100 (0.95 − 0.94) is 1.0000000000000009
                           and round(summary["accuracy_drop_vs_full_points"], 9) <= 1)
    return summary


def literal_from(args) -> dict:
    """--literal_from: the literal run of another output_dir, as its evaluation left it (per-question answers, keep_p
    sweep, steps), checked to be on this run's held-out questions (seed, count) at this run's keep_p."""
    folder = Path(args.literal_from) / "literal"
    path, checkpoints = folder / "eval" / "results.json", run_dir.checkpoints(folder / "train")
    if not path.is_file() or not checkpoints:
        sys.exit(f"--literal_from {args.literal_from}: no trained and evaluated literal run there ({path}); run "
                 f"toy_reproduction.py --recipes literal --output_dir {args.literal_from} first")
    results = json.loads(path.read_text())
    c = results["config"]
    if (c["seed"], c["limit"], c["keep_p"]) != (args.seed, args.eval_questions, args.keep_p):
        sys.exit(f"--literal_from {path}: evaluated with --seed {c['seed']}, --eval_questions {c['limit']}, "
                 f"--keep_p {c['keep_p']}; this run: {args.seed}, {args.eval_questions}, {args.keep_p} (the paired "
                 "difference needs the same held-out questions and threshold)")
    return {"records": results["methods"]["ZipR1"]["records"], "sweep": results["sweep"],
            "steps": trained_config(checkpoints[-1])["max_steps"]}


def compare_with_literal(summaries: dict, literal: dict | None) -> None:
    """accuracy_drop_vs_literal_points (literal − recipe, points) and its paired standard error, for every recipe
    beside a literal run (this one's or --literal_from's): the same held-out questions, so the difference is paired
    (paired_difference)."""
    if literal is None:
        return
    for s in summaries.values():
        if s is not literal:
            gain, se = paired_difference(s["records"], literal["records"])
            s["accuracy_drop_vs_literal_points"], s["accuracy_vs_literal_standard_error_points"] = -gain, se
            s["literal_steps"] = literal["steps"]


def cycles(s: dict) -> str:
    """The markdown clause for alternating compression and recovery ('' when the run did not cycle)."""
    if not s.get("sparsity_cycle_steps"):  # 0, or a run from before the flag
        return ""
    return f", cycles of {s['sparsity_cycle_steps']} steps ending with {s['sparsity_recovery_steps']} at λ = 0"


def markdown(summary: dict) -> list[str]:
    s, layers = summary, lambda v: " / ".join(f"{t:.2f}" for t in v)  # noqa: E731
    hold = s.get("sparsity_accuracy_hold")  # a run from before the flag does not record it
    term = "λ = 0" if s["recipe"] == "literal" else f"λ = 0, start {s['start']}" if s["recipe"] == "two_stage" else (
        f"λ = {s['sparsity_coef']}, T = {s['sparsity_temperature']}, gate {s['sparsity_gate']}, target "
        f"{s['sparsity_layer_targets'] or s['sparsity_target']}{' per layer' if s['sparsity_per_layer'] else ''}"
        f"{', floors ' + str(s['sparsity_layer_floors']) if s.get('sparsity_layer_floors') else ''}"
        f"{', targets fall while the accuracy holds within ' + str(hold) if hold else ''}"
        f"{cycles(s)}"
        f", skipped layers "
        f"{s['sparsity_skip_layers'] or 'none'}, warm-up {s['sparsity_warmup_steps']}, start {s['start']}")
    if s.get("reference", s["start"]) != s["start"]:
        term += f", KL reference {s['reference']}"
    if s.get("selection_straight_through"):
        term += f", straight-through selection T = {s['selection_straight_through']}"
    if s.get("probe_scorer"):
        rate = s.get("probe_scorer_learning_rate")
        term += ", learned probe scorer" + (f" (lr {rate})" if rate is not None else "")
    lines = [f"### {s['recipe']} ({term}; {s['steps']} steps × {s['per_step_questions']} questions, lr "
             f"{s['learning_rate']} ({s['lr_scheduler_type']}), β {s['beta']}, seed {s['seed']}, "
             + (f"{s['train_seconds']:.0f} s)" if s["train_seconds"] is not None else "evaluated only)"),
             "", "| Method | keep_p | Accuracy | τ | τ per layer |", "|---|---|---|---|---|"]
    for name in ("Full", "ZipVL", "ZipR1"):
        per_layer = layers(s["tau_by_layer"][name]) if name in s["tau_by_layer"] else "—"
        lines.append(f"| {name} | {s['keep_p'] if name != 'Full' else '—'} | {s['accuracy'][name]:.3f} | "
                     f"{s['tau'][name]:.3f} | {per_layer} |")
    lines += ["", f"τ after / before: {s['tau_after_over_before']:.3f} (goal ≤ 0.5); accuracy ZipR1 vs Full: "
              f"{-s['accuracy_drop_vs_full_points']:+.1f} ± {s['accuracy_vs_full_standard_error_points']:.1f} points "
              f"(± standard error; goal ≥ −1), vs ZipVL: {-s['accuracy_drop_vs_zipvl_points']:+.1f} points; "
              f"goal met: {s['goal_met']}"]
    if "accuracy_drop_vs_literal_points" in s:
        lines += [f"vs the literal recipe trained for {s['literal_steps']} steps: "
                  f"{-s['accuracy_drop_vs_literal_points']:+.1f} ± {s['accuracy_vs_literal_standard_error_points']:.1f} "
                  "points (the fair baseline: RL alone raises accuracy on the toy)"]
    lines += [f"training rollouts, steps {t['steps']}: accuracy {t['rollout_accuracy']:.3f}, τ {t['tau']:.3f}, "
              f"τ̃ {t['tau_relaxed']:.3f}, KL {t['kl']:.4f}" for t in s["training"].values()]
    return lines + [""]


def two_stage_curves(out: Path) -> Path:
    """Training curves of the learned run followed by the two-stage run (steps counted on): two_stage_metrics.png."""
    first = run_dir.read_metrics(out / "learned" / "train" / "metrics.jsonl")
    second = run_dir.read_metrics(out / "two_stage" / "train" / "metrics.jsonl")
    shift = first[-1]["step"]
    run_dir.plot_metrics(first + [{**m, "step": m["step"] + shift} for m in second], out / "two_stage_metrics.png")
    return out / "two_stage_metrics.png"


def report(args, summaries: dict, baseline: dict | None = None) -> dict:
    """reproduction.json/.md and pareto.png: the headline fields of the last recipe, every recipe under "recipes";
    baseline: the --literal_from run (literal_from), when this run has no literal recipe of its own."""
    out = Path(args.output_dir)
    last = summaries[args.recipes[-1]]
    literal = summaries.get("literal") or baseline
    compare_with_literal(summaries, literal)
    headline = {k: last[k] for k in ("recipe", "tau_after_over_before", "accuracy_drop_vs_full_points",
                                     "accuracy_drop_vs_literal_points", "accuracy_drop_vs_zipvl_points", "goal_met",
                                     "accuracy", "tau") if k in last}
    recipes = {name: {k: v for k, v in s.items() if k != "records"} for name, s in summaries.items()}
    (out / "reproduction.json").write_text(json.dumps({**headline, "recipes": recipes}, indent=1))
    lines = [line for s in summaries.values() for line in markdown(s)]
    (out / "reproduction.md").write_text("\n".join(lines))
    curves = {"ZipVL": last["sweep"]["ZipVL"]}
    for recipe, s in summaries.items():
        label = "learned, then λ = 0" if recipe == "two_stage" else f"λ = {s['sparsity_coef']:g}, {s['steps']} steps"
        curves[f"ZipR1 {recipe} ({label})"] = s["sweep"]["ZipR1"]
    if baseline is not None:
        curves[f"ZipR1 literal ({baseline['steps']} steps, {args.literal_from})"] = baseline["sweep"]["ZipR1"]
    pareto_plot(curves, last["full"], out / "pareto.png")
    if {"learned", "two_stage"} <= set(summaries):
        two_stage_curves(out)
    print("\n".join(lines) + f"\nwrote {out / 'reproduction.json'}, {out / 'pareto.png'}")
    return {**headline, "recipes": recipes}


def run_recipes(args, recipes: list) -> dict:
    """Train (unless --eval_only) and evaluate these recipes one after another in this process: {recipe: summary}."""
    torch.set_num_threads(toy.TOY_PRESET["num_threads"])
    summaries = {}
    for recipe in recipes:
        start, cpu = time.perf_counter(), time.process_time()
        seconds = None if args.eval_only else train_recipe(args, recipe)
        summaries[recipe] = summarize(args, recipe, evaluate(args, recipe), seconds)
        summaries[recipe]["seconds"] = {"wall": time.perf_counter() - start,  # training + evaluation
                                        "cpu": time.process_time() - cpu}  # this process's CPU time: ~ idle wall
    return summaries


def chains(args) -> list[list[str]]:
    """The recipes as chains that can run side by side: two_stage continues the learned run, and a learned run started
    from the literal one (--learned_init literal) waits for it; everything else is independent."""
    if args.learned_init == "literal":
        return [args.recipes]
    after_learned = [r for r in args.recipes if r in ("learned", "two_stage")]
    return [group for group in (["literal"] if "literal" in args.recipes else [], after_learned) if group]


def run_side_by_side(args, groups: list) -> dict:
    """Each chain in its own process (spawned, one thread each); the summaries come back in --recipes order."""
    toy.rl_dataset(args.train_questions)  # written once here, not by two processes at the same time
    with ProcessPoolExecutor(len(groups), mp_context=multiprocessing.get_context("spawn")) as pool:
        done = [pool.submit(run_recipes, args, group) for group in groups]
        summaries = {k: v for future in done for k, v in future.result().items()}
    return {recipe: summaries[recipe] for recipe in args.recipes}


def main(argv=None) -> dict:
    args = parse_args(argv)
    baseline = literal_from(args) if args.literal_from else None  # before hours of training: there, same questions
    groups = chains(args)  # at most two
    if args.jobs > 1 and len(groups) > 1:
        return report(args, run_side_by_side(args, groups), baseline)
    return report(args, run_recipes(args, args.recipes), baseline)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"toy_reproduction: {time.perf_counter() - start:.0f} s wall in all")
