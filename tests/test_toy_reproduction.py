"""benchmarks/toy_reproduction.py end to end at a tiny size: the two-stage recipe continues the learned run's last
checkpoint with the literal objective (λ = 0), and the report carries every recipe it ran."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zipr1_support import run_dir
import sparse_qwen
import toy
import train

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_reproduction.py"


def load_script():
    spec = importlib.util.spec_from_file_location("toy_reproduction", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_reproduction"] = module  # --jobs 2 pickles its worker by module name
    spec.loader.exec_module(module)
    return module


def test_two_stage_continues_the_learned_checkpoint_with_the_literal_objective(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # train.py writes the toy RL rows under ./.cache
    script, threads = load_script(), torch.get_num_threads()
    try:  # the script sets one CPU thread for its process
        out = script.main(["--recipes", "learned,two_stage", "--steps", "2", "--recover_steps", "1",
                           "--per_step_questions", "1", "--eval_questions", "3", "--sweep", "0.975",
                           "--ref_model", "toy", "--train_questions", "16", "--learned_beta", "0.3",
                           "--learned_lr_scheduler_type", "constant", "--sparsity_gate", "all",
                           "--selection_straight_through", "0.5", "--sparsity_target_steps", "2",
                           "--sparsity_accuracy_hold", "0.05", "--sparsity_cycle_steps", "2",
                           "--sparsity_recovery_steps", "1", "--probe_scorer", "--output_dir", str(tmp_path / "r")])
    finally:
        torch.set_num_threads(threads)
    learned = run_dir.checkpoints(tmp_path / "r" / "learned" / "train")[-1]
    stage1 = script.trained_config(learned)
    stage2 = script.trained_config(run_dir.checkpoints(tmp_path / "r" / "two_stage" / "train")[-1])
    assert learned.name == "checkpoint-2" and stage1["model"] == "toy"
    assert stage1["sparsity_coef"] == toy.TOY_LEARNED["sparsity_coef"] > 0  # stage 1: the relaxed term
    assert stage2["model"] == str(learned) and stage2["sparsity_coef"] == 0.0 and stage2["max_steps"] == 1
    assert stage2["ref_model"] == "toy"  # the KL anchor stays the original warmed-up model
    assert stage1["lr_scheduler_type"] == "constant"  # --learned_lr_scheduler_type: the learned run only
    assert stage2["lr_scheduler_type"] == "cosine"
    assert stage1["beta"] == 0.3 and stage2["beta"] == train.Config.beta  # --learned_beta: the learned run only
    assert stage1["sparsity_gate"] == "all"
    assert stage1["selection_straight_through"] == stage2["selection_straight_through"] == 0.5  # both stages
    assert stage1["probe_scorer"] is stage2["probe_scorer"] is True  # stage 2 trains stage 1's scorer on
    assert (learned / sparse_qwen.SCORER_FILE).is_file()
    questions = Path(".cache") / f"toy-data-v{toy.TASK_VERSION}-16" / "toy.jsonl"  # --train_questions 16, under cwd
    assert stage1["dataset"] == stage2["dataset"] == str(questions) and len(questions.read_text().splitlines()) == 16
    report = json.loads((tmp_path / "r" / "reproduction.json").read_text())
    assert report["recipe"] == out["recipe"] == "two_stage" and set(report["recipes"]) == {"learned", "two_stage"}
    assert report["recipes"]["two_stage"]["start"] == str(learned)
    assert report["recipes"]["two_stage"]["reference"] == "toy"
    assert report["recipes"]["two_stage"]["dataset"] == report["recipes"]["learned"]["dataset"] == str(questions)
    assert report["recipes"]["learned"]["selection_straight_through"] == 0.5  # recorded from the run's own config
    assert report["recipes"]["two_stage"]["selection_straight_through"] == 0.5
    md = (tmp_path / "r" / "reproduction.md").read_text()
    assert "KL reference toy" in md and md.count("straight-through selection T = 0.5") == 2
    assert md.count("learned probe scorer") == 2
    assert report["recipes"]["learned"]["sparsity_accuracy_hold"] == 0.05 == stage1["sparsity_accuracy_hold"]
    assert md.count("targets fall while the accuracy holds within 0.05") == 1  # the learned run's line only
    assert (report["recipes"]["learned"]["sparsity_cycle_steps"], stage1["sparsity_recovery_steps"]) == (2, 1)
    assert md.count("cycles of 2 steps ending with 1 at λ = 0") == 1
    assert (tmp_path / "r" / "pareto.png").stat().st_size > 0 and (tmp_path / "r" / "two_stage_metrics.png").is_file()
    assert report["recipes"]["two_stage"]["accuracy_vs_full_standard_error_points"] >= 0


def test_paired_difference_by_hand():
    """Per question ZipR1 − Full: [0, 1, 0, 1] -> mean 0.5, sample std sqrt(1/3), standard error sqrt(1/3) / 2."""
    ours, full = ([{"correct": c} for c in cs] for cs in ([1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]))
    mean, se = load_script().paired_difference(ours, full)
    assert mean == 50.0 and abs(se - 100 * (1 / 3) ** 0.5 / 2) < 1e-9


def test_literal_baseline_trains_as_long_as_the_two_stage_recipe(tmp_path, monkeypatch):
    """The fair baseline (issue 27): by default "literal" trains --steps + --recover_steps, and the report's
    accuracy_drop_vs_literal_points is literal − recipe on the same held-out questions, recomputed here from the
    per-question answers eval.py wrote for each recipe."""
    monkeypatch.chdir(tmp_path)
    script, threads = load_script(), torch.get_num_threads()
    try:
        script.main(["--recipes", "literal,learned,two_stage", "--steps", "2", "--recover_steps", "1",
                     "--per_step_questions", "1", "--eval_questions", "4", "--sweep", "0.975",
                     "--train_questions", "16", "--output_dir", str(tmp_path / "r")])
    finally:
        torch.set_num_threads(threads)
    literal = run_dir.checkpoints(tmp_path / "r" / "literal" / "train")
    assert literal[-1].name == "checkpoint-3" and script.trained_config(literal[-1])["max_steps"] == 3  # 2 + 1
    report = json.loads((tmp_path / "r" / "reproduction.json").read_text())

    def correct(recipe):  # eval.py's results file of that recipe: 1.0 / 0.0 per held-out question
        results = json.loads(next((tmp_path / "r" / recipe / "eval").glob("*.json")).read_text())
        return [r["correct"] for r in results["methods"]["ZipR1"]["records"]]

    base = correct("literal")
    for recipe in ("learned", "two_stage"):
        ours = correct(recipe)
        expected = 100 * (sum(base) - sum(ours)) / len(base)
        assert abs(report["recipes"][recipe]["accuracy_drop_vs_literal_points"] - expected) < 1e-9
        assert report["recipes"][recipe]["literal_steps"] == 3
    assert report["accuracy_drop_vs_literal_points"] == report["recipes"]["two_stage"]["accuracy_drop_vs_literal_points"]
    assert "accuracy_drop_vs_literal_points" not in report["recipes"]["literal"]
    assert "vs the literal recipe trained for 3 steps" in (tmp_path / "r" / "reproduction.md").read_text()


def test_literal_from_pairs_with_a_literal_run_of_another_folder(tmp_path, monkeypatch):
    """--literal_from: one literal run per seed, paired with a variant trained in another folder. The drop equals
    literal − recipe recomputed from both folders' per-question answers; another seed, a folder without a literal
    run, or literal in --recipes as well is a one-line error before any training."""
    monkeypatch.chdir(tmp_path)
    script, threads = load_script(), torch.get_num_threads()
    tiny = ["--per_step_questions", "1", "--eval_questions", "4", "--sweep", "0.975", "--train_questions", "16"]
    try:
        script.main(["--recipes", "literal", "--steps", "3", "--output_dir", str(tmp_path / "a"), *tiny])
        script.main(["--recipes", "learned,two_stage", "--steps", "2", "--recover_steps", "1", "--literal_from",
                     str(tmp_path / "a"), "--output_dir", str(tmp_path / "b"), *tiny])
    finally:
        torch.set_num_threads(threads)

    def correct(folder, recipe):
        results = json.loads((tmp_path / folder / recipe / "eval" / "results.json").read_text())
        return [r["correct"] for r in results["methods"]["ZipR1"]["records"]]

    report, base = json.loads((tmp_path / "b" / "reproduction.json").read_text()), correct("a", "literal")
    assert not (tmp_path / "b" / "literal").exists() and set(report["recipes"]) == {"learned", "two_stage"}
    for recipe in ("learned", "two_stage"):
        expected = 100 * (sum(base) - sum(correct("b", recipe))) / len(base)
        assert abs(report["recipes"][recipe]["accuracy_drop_vs_literal_points"] - expected) < 1e-9
        assert report["recipes"][recipe]["literal_steps"] == 3
    assert "vs the literal recipe trained for 3 steps" in (tmp_path / "b" / "reproduction.md").read_text()
    for argv, message in ((["--seed", "1", "--literal_from", str(tmp_path / "a")], "--seed 0, --eval_questions 4"),
                          (["--literal_from", str(tmp_path / "b")], "no trained and evaluated literal run"),
                          (["--recipes", "literal,learned", "--literal_from", str(tmp_path / "a")], None)):
        with pytest.raises(SystemExit) as error:
            script.main(["--recipes", "learned", "--output_dir", str(tmp_path / "c"), *tiny, *argv])
        if message:
            assert message in str(error.value) and "\n" not in str(error.value)
        else:
            assert error.value.code == 2  # argparse: the usage line and one error line
    assert not (tmp_path / "c").exists()


def test_literal_steps_default_follows_the_headline_recipe():
    parse = load_script().parse_args
    assert parse(["--steps", "5", "--recover_steps", "7"]).literal_steps == 12  # ... two_stage last: 5 + 7
    assert parse(["--recipes", "literal,learned", "--steps", "5"]).literal_steps == 5
    assert parse(["--literal_steps", "9"]).literal_steps == 9


def test_per_layer_targets_reach_only_the_learned_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config names the toy RL rows, written under ./.cache
    script = load_script()
    args = script.parse_args(["--sparsity_layer_targets", "0.6", "0.45", "0.15", "0.15", "--train_questions", "4",
                              "--sparsity_target_steps", "30", "--selection_straight_through", "0.5",
                              "--sparsity_layer_floors", "0", "0.3", "0", "0", "--sparsity_accuracy_hold", "0.02",
                              "--sparsity_cycle_steps", "400", "--sparsity_recovery_steps", "150", "--probe_scorer",
                              "--probe_scorer_learning_rate", "0.002", "--output_dir", str(tmp_path / "r")])
    learned, literal = script.recipe_config(args, "learned"), script.recipe_config(args, "literal")
    assert learned.sparsity_layer_targets == [0.6, 0.45, 0.15, 0.15] and learned.sparsity_target_steps == 30
    assert learned.sparsity_layer_floors == [0.0, 0.3, 0.0, 0.0] and literal.sparsity_layer_floors == []
    assert (learned.sparsity_accuracy_hold, literal.sparsity_accuracy_hold) == (0.02, 0.0)
    assert (learned.sparsity_cycle_steps, learned.sparsity_recovery_steps) == (400, 150)
    assert (literal.sparsity_cycle_steps, literal.sparsity_recovery_steps) == (0, 0)  # λ = 0 throughout anyway
    assert literal.sparsity_coef == 0.0 and literal.sparsity_target_steps == 0
    assert (learned.selection_straight_through, literal.selection_straight_through) == (0.5, 0.0)  # not the baseline
    assert (learned.probe_scorer, literal.probe_scorer) == (True, False) and learned.probe_scorer_learning_rate == 0.002
    assert script.recipe_config(script.parse_args(["--train_questions", "4"]), "learned").probe_scorer is False


def test_chains_run_side_by_side_only_when_independent():
    script = load_script()
    chains = lambda argv: script.chains(script.parse_args(argv))  # noqa: E731
    assert chains([]) == [["literal"], ["learned", "two_stage"]]
    assert chains(["--recipes", "learned,two_stage"]) == [["learned", "two_stage"]]
    assert chains(["--recipes", "literal,learned", "--learned_init", "literal"]) == [["literal", "learned"]]
    assert chains(["--recipes", "two_stage,literal"]) == [["literal"], ["two_stage"]]


def test_side_by_side_gives_the_same_report_as_one_after_another(tmp_path):
    """--jobs 2 trains literal in a second process beside learned → two_stage: every number but the wall time
    equals --jobs 1's. Both run as a user runs them, each in a fresh process (inside this one, state that earlier
    tests leave behind could differ between the two arms)."""
    common = [sys.executable, str(SCRIPT), "--steps", "2", "--recover_steps", "1", "--per_step_questions", "1",
              "--eval_questions", "4", "--sweep", "0.975", "--train_questions", "16"]
    for jobs in "12":
        done = subprocess.run(common + ["--jobs", jobs, "--output_dir", str(tmp_path / jobs)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
    reports = [json.loads((tmp_path / jobs / "reproduction.json").read_text()) for jobs in "12"]

    def numbers(report):
        return json.loads(json.dumps(report).replace(str(tmp_path / "1"), "D").replace(str(tmp_path / "2"), "D"),
                          object_hook=lambda d: {k: v for k, v in d.items() if k not in ("train_seconds", "seconds")})
    one, two = map(numbers, reports)
    assert list(two["recipes"]) == ["literal", "learned", "two_stage"]
    assert one == two, [(k, one["recipes"][k], two["recipes"][k]) for k in one["recipes"]
                        if one["recipes"][k] != two["recipes"][k]]
    assert "accuracy_drop_vs_literal_points" in two
    assert all(r["seconds"]["wall"] > 0 and r["seconds"]["cpu"] > 0 for r in reports[1]["recipes"].values())
