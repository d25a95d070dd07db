"""The lmms-eval plugin inside the real lmms-eval (the pinned 0.7.3, installed by docs/lmms_eval.md's command).

Runs `python -m lmms_eval --model zipr1` on local toy tasks (lmms_eval_zipr1.toy_tasks) in a subprocess, found through
the `lmms_eval.models` entry point (no LMMS_EVAL_PLUGINS, no PYTHONPATH), and scores them with lmms-eval's own
process_results. Reference: a stock HF forward with full attention (keep_p = 1 equals it) computes log P of each
choice; lmms-eval's multiple_choice accuracy must equal how often the likelier choice is the right one, its
loglikelihood accuracy how often greedy decoding writes the right answer. Every CLI run must also not print
lmms-eval's "Error during evaluation" (its CLI exits 0 after one).

Needs lmms-eval: skipped where it is not installed, but never in CI (.ci/run sets ZIPR1_REQUIRE_LMMS=1: then a
missing lmms-eval fails here).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import ImageFile
from transformers import AutoModelForImageTextToText

from zipr1_support import media
from lmms_eval_zipr1.toy_tasks import toy_docs, write_toy_tasks

ROOT = Path(__file__).resolve().parents[1]
TOY_MODEL = ROOT / "toy_model"
HAVE_LMMS = importlib.util.find_spec("lmms_eval") is not None
if not HAVE_LMMS and os.environ.get("ZIPR1_REQUIRE_LMMS"):
    raise ImportError("ZIPR1_REQUIRE_LMMS is set but lmms-eval is not installed: run the install in docs/lmms_eval.md")
pytestmark = pytest.mark.skipif(not HAVE_LMMS, reason="lmms-eval not installed (docs/lmms_eval.md)")
TRUNCATED = ImageFile.LOAD_TRUNCATED_IMAGES


@pytest.fixture(autouse=True)
def keep_pil_truncation_setting():
    """Importing lmms-eval (lmms_eval/api/task.py:53) sets PIL's LOAD_TRUNCATED_IMAGES for the whole process; the other
    test files check that a truncated image fails to load, so the setting is restored after each test here."""
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = TRUNCATED
N_DOCS = 10


def run_lmms_eval(args: list[str], cwd: Path, env_extra: dict | None = None) -> str:
    """`python -m lmms_eval ARGS` from cwd (not the repository: the plugin must come from the install); its output.

    Fails on a non-zero exit and on lmms-eval's "Error during evaluation", which its CLI logs and then exits 0 after.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("LMMS_EVAL_PLUGINS", "PYTHONPATH")}
    env.update(HF_HOME=str(cwd / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               **(env_extra or {}))
    done = subprocess.run([sys.executable, "-m", "lmms_eval", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "Error during evaluation" not in out, out[-4000:]
    return out


def benchmark_script():
    """benchmarks/lmms_benchmarks.py as a module."""
    spec = importlib.util.spec_from_file_location("lmms_benchmarks", ROOT / "benchmarks" / "lmms_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results_json(output_path: Path) -> dict:
    """lmms-eval's aggregated results file under output_path (<model>/<date>_results.json)."""
    found = sorted(output_path.rglob("*_results.json"))
    assert found, f"no results JSON under {output_path}"
    return json.loads(found[-1].read_text())


@torch.no_grad()
def reference_scores(doc) -> tuple[list[float], bool]:
    """(log P of each choice, greedy writes the right one) under a stock dense forward of the same prompt."""
    model = reference_scores.model
    processor = reference_scores.processor
    inputs = media.encode_prompts(processor, [media.chat_item(doc["question"], [doc["image"]])])
    prompt_len = inputs["input_ids"].shape[1]
    logps, greedy = [], None
    for choice in doc["choices"]:
        ids = processor.tokenizer(choice, add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, T)
        batch = dict(inputs, input_ids=torch.cat([inputs["input_ids"], ids], 1),
                     attention_mask=torch.ones(1, prompt_len + ids.shape[1], dtype=torch.long),
                     mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], 1))
        logits = model(**batch).logits[0, prompt_len - 1:-1].float()  # (T, V): predictions of the choice's tokens
        logps.append(float(torch.log_softmax(logits, -1).gather(-1, ids[0][:, None]).sum()))
        if choice == doc["truth"]:
            greedy = bool((logits.argmax(-1) == ids[0]).all())
    return logps, greedy


def test_multiple_choice_and_loglikelihood_scored_by_lmms_eval_pick_the_likelier_choice(tmp_path):
    tasks = write_toy_tasks(tmp_path / "tasks", n=N_DOCS)
    stats = tmp_path / "out" / "zipr1_stats.json"
    run_lmms_eval(["--model", "zipr1", "--model_args", f"pretrained={TOY_MODEL},keep_p=1.0,stats_path={stats}",
                   "--tasks", "zipr1_toy_mc,zipr1_toy_ll", "--include_path", str(tasks), "--batch_size", "1",
                   "--device", "cpu", "--output_path", str(tmp_path / "out")], cwd=tmp_path)
    results = results_json(tmp_path / "out")["results"]

    reference_scores.model = AutoModelForImageTextToText.from_pretrained(TOY_MODEL, attn_implementation="sdpa").eval()
    reference_scores.processor = media.load_processor(str(TOY_MODEL))
    likelier_right, greedy_right = [], []
    for doc in toy_docs(N_DOCS):
        logps, greedy = reference_scores(doc)
        likelier_right.append(float(max(range(2), key=lambda i: logps[i]) == doc["gold"]))
        greedy_right.append(float(greedy))
    expected_mc, expected_ll = sum(likelier_right) / N_DOCS, sum(greedy_right) / N_DOCS
    assert 0.5 < expected_mc  # the toy model prefers the right letter: a reversed sign would score 1 - expected
    assert results["zipr1_toy_mc"]["acc,none"] == pytest.approx(expected_mc, rel=1e-6)
    assert results["zipr1_toy_ll"]["acc,none"] == pytest.approx(expected_ll, rel=1e-6)
    summary = json.loads(stats.read_text())  # τ per task beside the results: keep_p 1 keeps every token
    assert {t: s["requests"] for t, s in summary.items()} == {"zipr1_toy_mc": 2 * N_DOCS, "zipr1_toy_ll": N_DOCS}
    assert all(s["token_ratio"] == pytest.approx(1.0, rel=1e-6) for s in summary.values())


def test_error_during_evaluation_with_exit_code_zero_fails_the_run(tmp_path):
    """lmms-eval 0.7.3 catches an exception, logs "Error during evaluation" and exits 0 (__main__.py:609-615): the
    helper every CLI run here goes through must fail on it. A batch_size in model_args raises inside the run."""
    tasks = write_toy_tasks(tmp_path / "tasks", n=2)
    with pytest.raises(AssertionError, match="batch_size is not a model_arg"):
        run_lmms_eval(["--model", "zipr1", "--model_args", f"pretrained={TOY_MODEL},batch_size=2",
                       "--tasks", "zipr1_toy_mc", "--include_path", str(tasks), "--device", "cpu"], cwd=tmp_path)


def test_benchmark_script_writes_the_papers_table_on_the_toy_tasks(tmp_path, monkeypatch):
    """benchmarks/lmms_benchmarks.py --toy: three lmms-eval runs (Full, ZipVL, ZipR1 = the toy model) -> table.md,
    whose cells are lmms-eval's accuracies and the plugin's τ of each run."""
    lmms_benchmarks = benchmark_script()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lmms_benchmarks.main(["--toy", "--tasks", "zipr1_toy_mc", "--output_dir", str(tmp_path / "out")])
    rows = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert rows[0] == "| benchmark | task | Full acc | Full τ | ZipVL acc | ZipVL τ | ZipR1 acc | ZipR1 τ |"
    cells = [c.strip() for c in rows[2].strip("|").split("|")]
    accs = [results_json(tmp_path / "out" / m)["results"]["zipr1_toy_mc"]["acc,none"] for m in ("Full", "ZipVL",
                                                                                                  "ZipR1")]
    taus = [json.loads((tmp_path / "out" / m / "zipr1_stats.json").read_text())["zipr1_toy_mc"]["token_ratio"]
            for m in ("Full", "ZipVL", "ZipR1")]
    assert cells[:2] == ["toy (multiple choice)", "`zipr1_toy_mc`"]
    assert cells[2::2] == [f"{a:.3f}" for a in accs] and cells[3::2] == [f"{t:.3f}" for t in taus]
    assert taus[0] == 1.0 and taus[1] < 1.0 and taus[1] == pytest.approx(taus[2], rel=1e-6)  # ZipR1 = ZipVL here


def test_the_13_benchmarks_task_names_exist_in_the_installed_lmms_eval():
    lmms_benchmarks = benchmark_script()
    checked = lmms_benchmarks.check_tasks()
    assert len({name.split(" (")[0] for name, _, _ in checked}) == 13  # MMMU-Pro runs in two settings
    assert [task for _, task, ok in checked if not ok] == []
