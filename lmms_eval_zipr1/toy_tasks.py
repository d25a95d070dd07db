"""Local lmms-eval tasks of toy image questions (no download): generate_until, multiple_choice and loglikelihood.

`write_toy_tasks(folder, n)` writes folder/docs.jsonl, folder/images/*.png, folder/utils.py and three task YAMLs
(`zipr1_toy`, `zipr1_toy_mc`, `zipr1_toy_ll`); run them with `--include_path folder --tasks zipr1_toy,...`.
Each question has two choices, `<answer>X</answer>` for the right letter and one wrong letter (the continuation the
toy model was warmed up to write). Used by the tests and by benchmarks/lmms_benchmarks.py on CPU.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from zipr1_support import media
import toy

KINDS = ("color", "shape", "position")  # the toy's image questions with options

UTILS = '''"""Functions of the zipr1 toy tasks (written by lmms_eval_zipr1.toy_tasks)."""
import re

from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def doc_to_choice(doc):
    return doc["choices"]


def process_results(doc, results):
    found = re.search(r"<answer>\\s*([A-Z])", results[0])  # the task stops at (and cuts) "</answer>"
    return {"exact_match": float(found is not None and found.group(1) == doc["answer"])}


def process_loglikelihood(doc, results):
    # lmms-eval 0.7.3's built-in loglikelihood scoring unpacks `ll, is_greedy = results` (api/task.py:1600), a list
    # of one (loss, is_greedy) pair: a ValueError for every model. This reads results[0], as lm-eval-harness does.
    loss, is_greedy = results[0]
    return {"acc": float(is_greedy)}
'''

COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
"""
TASKS = {
    "zipr1_toy": """output_type: generate_until
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  until: ["</answer>"]
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    "zipr1_toy_mc": """output_type: multiple_choice
doc_to_choice: !function utils.doc_to_choice
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "zipr1_toy_ll": """output_type: loglikelihood
doc_to_target: truth
target_delimiter: ""
process_results: !function utils.process_loglikelihood
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
}


def toy_docs(n: int, seed: int = 0) -> list[dict]:
    """n toy image questions with their image in memory and two choices (right and one wrong letter, shuffled)."""
    rng = random.Random(seed)
    docs = []
    for row in toy.toy_examples(n, seed=seed, kinds=KINDS):
        letter = row["solution"].removeprefix("<answer>").removesuffix("</answer>")
        wrong = rng.choice([chr(65 + i) for i in range(len(row["options"])) if chr(65 + i) != letter])
        letters = [letter, wrong] if rng.random() < 0.5 else [wrong, letter]
        choices = [f"<answer>{x}</answer>" for x in letters]
        docs.append({"image": row["image"], "question": media.question_text(row["problem"], row["options"],
                                                                                 template="answer_only"),
                     "answer": letter, "choices": choices, "gold": letters.index(letter), "truth": choices[
                         letters.index(letter)]})
    return docs


def write_toy_tasks(folder, n: int = 10, seed: int = 0) -> Path:
    """The toy tasks under folder (created); returns the folder for --include_path."""
    folder = Path(folder).resolve()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / "docs.jsonl", "w") as f:
        for i, doc in enumerate(toy_docs(n, seed)):
            path = folder / "images" / f"{i:04d}.png"
            doc.pop("image").save(path)
            f.write(json.dumps({**doc, "image": str(path)}) + "\n")
    (folder / "utils.py").write_text(UTILS)
    for task, body in TASKS.items():
        (folder / f"{task}.yaml").write_text(f"task: {task}\n" + COMMON.format(docs=folder / "docs.jsonl") + body)
    return folder
