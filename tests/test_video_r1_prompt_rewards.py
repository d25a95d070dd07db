"""Video-R1's prompt, graded rewards and loader rules, checked against Video-R1's own formulas.

The references here are written from the text of github.com/tulerfeng/Video-R1, src/r1-v/src/open_r1/grpo.py
(snapshot 59d65c3): `QUESTION_TEMPLATE`, `TYPE_TEMPLATE` and `make_conversation_image_and_video` in `main` for the
prompt; `accuracy_reward` (its `extract_answer`, `normalize_number`, `wer`, `compute_rouge_score` and the per-type
branches) and `format_reward` for the rewards. They are re-expressed independently of rewards.py / media.py: the
word error rate by a recursive edit distance, ROUGE by calling rouge_score directly. Where we deviate on purpose
(docs/video_r1.md, "Prompt, rewards and loader"), the test asserts both values: ours and Video-R1's.
"""
import functools
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from rouge_score import rouge_scorer  # a pinned requirement: a missing package fails here, it is not skipped
from transformers import AutoTokenizer

from zipr1_support import data
import eval as zipr1_eval
import rewards
import toy
from zipr1_support.train_config import Config, ConfigError, check_config, parse_config

# ------------------------------------------------------------------------------------------ Video-R1's prompt
# Quoted from Video-R1 src/r1-v/src/open_r1/grpo.py, main(): QUESTION_TEMPLATE and TYPE_TEMPLATE, verbatim.
VIDEO_R1_QUESTION_TEMPLATE = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or other natural language thought expressions "  # noqa: E501
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer between the <answer> </answer> tags."  # noqa: E501
)
VIDEO_R1_TYPE_TEMPLATE = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.",  # noqa: E501
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the <answer> </answer> tags.",  # noqa: E501
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags."
}


def video_r1_prompt(example):
    """make_conversation_image_and_video (grpo.py): a multiple-choice problem gets "Options:\\n" and each option
    followed by a newline appended directly; the text is the question template, then the type's instruction."""
    question = example["problem"]
    if example["problem_type"] == "multiple choice":
        question += "Options:\n"
        for option in example["options"]:
            question += option + "\n"
    text = VIDEO_R1_QUESTION_TEMPLATE.format(Question=question) + VIDEO_R1_TYPE_TEMPLATE[example["problem_type"]]
    return [{"role": "user", "content": [{"type": example["data_type"]}, {"type": "text", "text": text}]}]


PROBLEMS = {"multiple choice": "What is the person in the video doing?", "numerical": "How many cups are there?",
            "OCR": "What is written on the sign?", "free-form": "Describe what happens after the door opens.",
            "regression": "How many meters is the car from the camera?"}


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    Image.new("RGB", (56, 56), (200, 10, 10)).save(root / "a.png")
    (root / "clip").mkdir()
    for t in range(4):
        Image.fromarray(np.full((56, 56, 3), 40 * t, np.uint8)).save(root / "clip" / f"{t:03d}.png")
    return root


@pytest.mark.parametrize("problem_type", sorted(PROBLEMS))
@pytest.mark.parametrize("data_type", ["image", "video"])
@pytest.mark.parametrize("options", [["A. running", "B. sitting", "C. eating"], []])
def test_prompt_equals_video_r1s(media_files, problem_type, data_type, options):
    row = {"problem": PROBLEMS[problem_type], "options": options, "problem_type": problem_type,
           "data_type": data_type, "row": 0,
           "media_path": str(media_files / ("a.png" if data_type == "image" else "clip"))}
    item = data.prompt_item(row)  # the default template: Video-R1's
    expected = video_r1_prompt(row)
    assert item["messages"] == expected
    tokenizer = AutoTokenizer.from_pretrained(toy.SHIPPED_MODEL)  # rendered by a Qwen chat template
    render = lambda m: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)  # noqa: E731
    assert render(item["messages"]) == render(expected)
    assert len(item["images" if data_type == "image" else "videos"]) == 1


def test_answer_only_prompt_is_the_toys_short_prompt():
    """answer_only: no reasoning instruction; it is the toy's prompt, unchanged (so `python train.py` is too)."""
    from zipr1_support import media
    text = media.question_text("What color?", ["A. red", "B. blue"], "multiple choice", template="answer_only")
    assert text == ("What color? Options:\nA. red\nB. blue\nPlease provide only the single option letter (e.g., A, B, "
                    "C, D, etc.) within the <answer> </answer> tags.")
    row = toy.toy_examples(1)[0]
    item = data.prompt_item(row, template=toy.TOY_PRESET["prompt_template"])  # how train.py prompts the toy
    assert item["messages"][0]["content"][-1]["text"] == media.question_text(
        row["problem"], row["options"], row["problem_type"], template="answer_only")
    with pytest.raises(ValueError, match="prompt_template"):
        media.question_text("x", problem_type="OCR", template="chatty")


# ------------------------------------------------------------------------------------------ Video-R1's rewards
def vr1_extract(text):
    """extract_answer: the first <answer>\\s*(.*?)\\s*</answer> (DOTALL), stripped; "" when there is none."""
    match = re.search(r"<answer>\s*(.*?)\s*</answer>", text, re.DOTALL)
    return match.group(1).strip() if match else ""


def vr1_number(text):
    """normalize_number: float of the text with commas removed, None when that fails."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def edit_distance(a, b):
    """Levenshtein distance of two word tuples, by recursion (a different route from rewards.py's table)."""
    @functools.lru_cache(maxsize=None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


def vr1_accuracy(content, solution, question_type):
    """accuracy_reward's value for one completion under one question type (grpo.py), exceptions scoring 0."""
    out, gt = vr1_extract(content), vr1_extract(solution)
    if question_type == "multiple choice":
        return 1.0 if out.strip() == gt.strip() else 0.0
    if question_type == "numerical":
        if ("." in gt or "," in gt) != ("." in out or "," in out):
            return 0.0
        g, o = vr1_number(gt), vr1_number(out)
        return 0.0 if g is None or o is None else float(round(g, 2) == round(o, 2))
    if question_type == "OCR":
        wer = edit_distance(tuple(gt.split()), tuple(out.split())) / max(1, len(gt.split()))
        return max(0.0, min(1.0, 1 - wer))
    if question_type == "free-form":
        scores = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(gt, out)
        return max(0.0, min(1.0, sum(scores[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")) / 3))
    g, o = vr1_number(gt), vr1_number(out)  # regression
    if g is None or o is None:
        return 0.0  # Video-R1 falls through to a TypeError, caught: 0
    return 1 - min(1.0, max(0.0, (abs(o - g) + 1e-9) / (abs(g) + 1e-9)))


def tag(text):
    return f"<answer>{text}</answer>"


AGREE = [  # (problem_type, completion, solution): ours equals Video-R1's value
    ("multiple choice", "<think>It is red.</think>\n<answer>B</answer>", tag("B")),
    ("multiple choice", tag("B, or maybe C"), tag("B")),  # a hedge earns nothing
    ("multiple choice", tag(" C "), tag("B")),
    ("multiple choice", "B", tag("B")),  # no tags
    ("multiple choice", tag("b"), tag("B")),
    ("multiple choice", tag("(B)"), tag("B")),
    ("multiple choice", tag("AB"), tag("AB")),
    ("multiple choice", tag("Yes"), tag("Yes")),
    ("multiple choice", tag("d"), tag("d")),
    ("numerical", tag("3.14159"), tag("3.14")),
    ("numerical", tag("3.15"), tag("3.14")),
    ("numerical", tag("1,234"), tag("1234.0")),
    ("numerical", tag("1e3"), tag("1000")),
    ("numerical", tag("12,345"), tag("1,2345")),
    ("numerical", tag("three"), tag("3")),
    ("numerical", "3", tag("3")),
    ("numerical", tag("-0.5"), tag("-.5")),
    ("OCR", tag("the quick brown fox"), tag("the quick brown dog")),
    ("OCR", tag("quick brown"), tag("the quick brown dog")),
    ("OCR", tag("The Quick brown dog"), tag("the quick brown dog")),  # case counts
    ("OCR", tag("a b c d e f g h"), tag("x y")),  # WER 4: clipped to 0
    ("OCR", tag("!!!"), tag("!!!")),
    ("OCR", "STOP", tag("STOP")),
    ("free-form", tag("A cat runs in the park."), tag("The cats are running in a park")),
    ("free-form", tag("completely different words"), tag("the cats are running")),
    ("free-form", tag("the cats are running"), tag("the cats are running")),
    ("free-form", tag("running cats"), tag("the cats are running")),
    ("regression", tag("9"), tag("10")),
    ("regression", tag("25"), tag("10")),
    ("regression", tag("-4"), tag("10")),
    ("regression", tag("1,000"), tag("1100")),
    ("regression", tag("10.5"), tag("10")),
    ("regression", tag("ten"), tag("10")),
]


@pytest.mark.parametrize("problem_type, completion, solution", AGREE)
def test_graded_reward_equals_video_r1s(problem_type, completion, solution):
    ours = rewards.graded_accuracy_reward(completion, solution, problem_type)
    theirs = vr1_accuracy(completion, solution, problem_type)
    assert ours == pytest.approx(theirs, rel=1e-8, abs=1e-8)  # Video-R1's 1e-9 terms move regression by <= 1e-10


def test_agreeing_table_spans_values_strictly_between_0_and_1():
    values = {round(rewards.graded_accuracy_reward(c, s, t), 3) for t, c, s in AGREE}
    assert {0.0, 1.0} < values and len([v for v in values if 0 < v < 1]) >= 5  # graded, not binary


DEVIATIONS = [  # (problem_type, completion, solution, ours, Video-R1's, why)
    ("numerical", tag("3.0"), tag("3"), 1.0, 0.0, "numbers compared as numbers"),
    ("numerical", tag("1,000"), tag("1000"), 1.0, 0.0, "a thousands comma is not a decimal mark"),
    ("regression", tag("0"), tag("0"), 1.0, 0.0, "gt 0: Video-R1's (0 + 1e-9) / (0 + 1e-9) = 1"),
    ("regression", tag("nan"), tag("10"), 0.0, 1.0, "nan slips through Video-R1's clip"),
    ("regression", tag("10"), tag("10"), 1.0, 1 - 1e-9 / (10 + 1e-9), "an exact answer scores exactly 1"),
    ("free-form", tag("dogs"), tag("dog"), 1.0, 2 / 3, "one-token reference has no bigram"),
    ("free-form", tag("the dog"), tag("dog"), 2 / 3, 4 / 9, "one-token reference has no bigram"),
    ("multiple choice", tag("A") + tag("B"), tag("A"), 0.0, 1.0, "several answers are a hedge"),
    ("multiple choice", "<ANSWER>B</ANSWER>", tag("B"), 1.0, 0.0, "answer tags case-insensitive"),
    ("multiple choice", tag("B"), "B", 1.0, 0.0, "a bare solution is its own answer"),
]


@pytest.mark.parametrize("problem_type, completion, solution, ours, theirs, why", DEVIATIONS)
def test_deliberate_deviations_from_video_r1(problem_type, completion, solution, ours, theirs, why):
    assert vr1_accuracy(completion, solution, problem_type) == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    assert rewards.graded_accuracy_reward(completion, solution, problem_type) == pytest.approx(ours, rel=1e-12)
    assert ours != theirs, why


def test_each_row_is_scored_under_its_own_problem_type():
    """Video-R1 scores a whole batch under kwargs['problem_type'][0]; we use each row's type."""
    completions, solutions = [tag("B"), tag("3.00")], [tag("B"), tag("3.0")]
    types = ["multiple choice", "numerical"]
    ours = rewards.accuracy_rewards(completions, solutions, types, "graded")
    theirs = [vr1_accuracy(c, s, types[0]) for c, s in zip(completions, solutions)]  # the first row's type
    assert ours.tolist() == [1.0, 1.0] and theirs == [1.0, 0.0]


def test_empty_ground_truth_is_unscorable_not_a_free_reward():
    """Video-R1: WER against an empty reference is len(hyp) / 1, so any answer-less completion scores 1."""
    assert vr1_accuracy("I do not know", tag(""), "OCR") == 1.0
    with pytest.raises(ValueError, match="no answer"):
        rewards.graded_accuracy_reward("I do not know", tag(""), "OCR")


def test_binary_setting_keeps_todays_scores():
    completions = [tag("(B)"), tag("B or C"), tag("3.0"), tag("Yes, it is"), tag("10.4")]
    solutions = [tag("B"), tag("B"), tag("3"), tag("yes"), tag("10")]
    types = ["multiple choice", "multiple choice", "numerical", "free-form", "regression"]
    binary = rewards.accuracy_rewards(completions, solutions, types, "binary")
    assert binary.tolist() == [rewards.accuracy_reward(c, s, t) for c, s, t in zip(completions, solutions, types)]
    assert binary.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]  # the rules in rewards.py's binary table
    graded = rewards.accuracy_rewards(completions, solutions, types, "graded")
    assert graded[:3].tolist() == [0.0, 0.0, 1.0] and 0 < graded[3] < 1 and graded[4] == pytest.approx(0.96)
    with pytest.raises(ValueError, match="accuracy_reward"):
        rewards.accuracy_rewards(completions, solutions, types, "partial")


# ------------------------------------------------------------------------------------------ format reward and gate C
@pytest.mark.parametrize("completion, expected", [
    ("<think>red, so B</think><answer>B</answer>", 1.0),
    ("<think>a\nb</think>\n\n<answer>B</answer>", 1.0),  # DOTALL, whitespace between
    ("<answer>B</answer>", 0.0),  # no reasoning
    ("<think>a</think>", 0.0),
    (" <think>a</think><answer>B</answer>", 0.0),  # fullmatch: nothing before
    ("<think>a</think><answer>B</answer>\n", 0.0),  # nor after
    ("<think>a</think> so <answer>B</answer>", 0.0),  # only whitespace between
])
def test_format_reward_is_video_r1s(completion, expected):
    pattern = r"<think>.*?</think>\s*<answer>.*?</answer>"  # Video-R1 grpo.py, format_reward
    assert (1.0 if re.fullmatch(pattern, completion, re.DOTALL) else 0.0) == expected
    assert rewards.format_reward(completion) == expected


def test_gate_c_for_graded_rewards_by_hand():
    acc = torch.tensor([[0.3, 0.6], [0.2, 0.45], [0.0, 0.5]])  # (G=3, N=2)
    tau = torch.tensor([[0.5, 0.25], [0.5, 0.5], [1.0, 0.75]])
    out = rewards.zipr1_rewards(acc, tau, 2, gate_threshold=0.5)
    assert out["gate"].tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]  # max 0.6 >= .5, 0.45 < .5, 0.5 >= .5
    expected = torch.tensor([[0.3 + 0.5, 0.6 + 0.75], [0.2, 0.45], [0.0 + 0.0, 0.5 + 0.25]])
    torch.testing.assert_close(out["reward"], expected, rtol=1e-6, atol=0)
    lax = rewards.zipr1_rewards(acc, tau, 2, gate_threshold=0.2)
    assert lax["gate"].tolist() == [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    with pytest.raises(ValueError, match="gate_threshold"):
        rewards.zipr1_rewards(acc, tau, 2, gate_threshold=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rewards.zipr1_rewards(acc + 1, tau, 2)


@pytest.mark.parametrize("threshold", [1e-3, 0.5, 1.0])
def test_gate_c_on_binary_rewards_is_todays_any_correct(threshold):
    acc = (torch.rand(64, 8, generator=torch.Generator().manual_seed(1)) < 0.15).float()  # (G, N), some all-wrong
    tau = torch.rand(64, 8, generator=torch.Generator().manual_seed(2))
    out = rewards.zipr1_rewards(acc, tau, 8, gate_threshold=threshold)
    any_correct = acc.amax(1, keepdim=True).expand_as(acc)  # the paper's C, computed directly
    assert 0 < any_correct.mean() < 1
    assert torch.equal(out["gate"], any_correct)
    assert torch.equal(out["reward"], acc + any_correct * (1 - tau))  # bit for bit


def test_format_reward_weight_adds_to_r():
    acc, tau = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    fmt = rewards.format_rewards(["<think>x</think><answer>A</answer>", "<answer>B</answer>"])
    assert fmt.tolist() == [1.0, 0.0]
    assert rewards.zipr1_rewards(acc, tau, 2, r_format=fmt)["reward"].tolist() == [1.5, 0.5]  # weight 0: unchanged
    weighted = rewards.zipr1_rewards(acc, tau, 2, r_format=fmt, format_weight=0.5)
    assert weighted["reward"].tolist() == [2.0, 0.5] and weighted["r_format"].tolist() == [1.0, 0.0]


# ------------------------------------------------------------------------------------------ the loader
def _row(solution, problem_type, path="a.png"):
    return {"problem": "q?", "options": [], "solution": solution, "problem_type": problem_type,
            "data_type": "image", "path": path}


ACCEPTED = [(tag("d"), "multiple choice"), (tag("Yes"), "multiple choice"), (tag("AB"), "multiple choice"),
            (tag("1e3"), "numerical"), (tag("1,2345"), "numerical"), (tag("!!!"), "OCR"), (tag("0"), "regression"),
            (tag("a dog"), "free-form"), ("B", "multiple choice")]


def test_loader_accepts_every_form_video_r1_scores(media_files):
    path = media_files / "forms.jsonl"
    path.write_text("".join(json.dumps(_row(s, t)) + "\n" for s, t in ACCEPTED))
    table = data.load_dataset_rows(str(path))
    assert [r["solution"] for r in table.rows] == [s for s, _ in ACCEPTED] and not table.skipped
    for solution, problem_type in ACCEPTED:  # each scores 1 against its own answer
        answer = solution if solution.startswith("<answer>") else tag(solution)
        assert rewards.graded_accuracy_reward(answer, solution, problem_type) == 1.0


@pytest.mark.parametrize("solution, problem_type, words", [
    (tag("abc"), "numerical", "not a finite number"), (tag("nan"), "regression", "not a finite number"),
    (tag("!!!"), "free-form", "no letter or digit"), (tag(""), "OCR", "no answer"),
    ("<answer>A", "multiple choice", "no answer"),
])
def test_loader_rejects_an_unscorable_row_naming_file_and_row(media_files, solution, problem_type, words):
    path = media_files / "bad.jsonl"
    rows = [_row(s, t) for s, t in ACCEPTED[:3]] + [_row(solution, problem_type)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(data.DatasetError) as err:
        data.load_dataset_rows(str(path))
    message = str(err.value)
    assert "row 3" in message and str(path) in message and words in message and "\n" not in message
    kept = data.load_dataset_rows(str(path), on_bad_row="skip")
    assert len(kept) == 3 and len(kept.skipped) == 1 and "row 3" in kept.skipped[0]


def test_binary_loader_keeps_todays_rules(media_files):
    path = media_files / "binary.jsonl"
    path.write_text(json.dumps(_row(tag("AB"), "multiple choice")) + "\n")
    with pytest.raises(data.DatasetError, match="row 0"):
        data.load_dataset_rows(str(path), accuracy="binary")
    assert len(data.load_dataset_rows(str(path), accuracy="graded")) == 1


# ------------------------------------------------------------------------------------------ settings
def test_real_model_defaults_are_video_r1s_and_the_toy_keeps_its_own():
    real = check_config(Config(model="some/model"))
    assert (real.prompt_template, real.accuracy_reward, real.max_completion_length) == ("video_r1", "graded", 768)
    assert real.format_reward_weight == 0.0 and real.gate_threshold == 0.5
    toy_cfg = parse_config([])
    assert (toy_cfg.prompt_template, toy_cfg.accuracy_reward, toy_cfg.max_completion_length) == \
        ("answer_only", "binary", 8)
    for bad in (dict(gate_threshold=0.0), dict(gate_threshold=1.5), dict(format_reward_weight=-1.0),
                dict(prompt_template="chatty"), dict(accuracy_reward="partial")):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            check_config(Config(**bad))
    args = zipr1_eval.parse_args(["--model", "some/model"])
    assert (zipr1_eval.prompt_template_of(args), zipr1_eval.accuracy_of(args)) == ("video_r1", "graded")
    toy_args = zipr1_eval.parse_args([])
    assert (zipr1_eval.prompt_template_of(toy_args), zipr1_eval.accuracy_of(toy_args)) == ("answer_only", "binary")


def test_graded_rouge_import_is_lazy():
    """rewards.py copies out alone: rouge-score is imported on first free-form score, not at import."""
    source = open(rewards.__file__).read()
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert top_level == ["import functools", "import math", "import re", "import torch"]
    assert math.isclose(rewards.rouge_f("the cats are running", "the cats are running"), 1.0)


def test_train_step_scores_graded_with_the_format_reward_and_the_video_r1_prompt(tmp_path, monkeypatch):
    """train.py's wiring: its rows prompted with Video-R1's template, answers scored graded, r = r_acc + w_f r_format
    + C (1 - tau) with one question per step (so C is one value and the means separate)."""
    import train
    model_dir = toy.build_tiny_model_dir(tmp_path / "model", seed=0, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         vision_hidden_size=32, vision_depth=1, vision_heads=1)
    jsonl = toy.write_toy_dataset(tmp_path / "data", 2, seed=3, kinds=("color",))
    calls = {"accuracy_rewards": [], "prompt_item": []}

    def spy(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name].append((*args, *kwargs.values()))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)
    spy(rewards, "accuracy_rewards")
    spy(data, "prompt_item")
    cfg = check_config(Config(model=str(model_dir), dataset=str(jsonl), num_generations=2, max_completion_length=3,
                              max_steps=1, output_dir=str(tmp_path / "out"), disable_tqdm=True, max_frames=4,
                              format_reward_weight=0.5))
    m = train.train(cfg)[0]
    assert calls["accuracy_rewards"] and all("graded" in c for c in calls["accuracy_rewards"])
    assert calls["prompt_item"] and all("video_r1" in c for c in calls["prompt_item"])
    assert 0 <= m["r_format"] <= 1 and m["gate"] in (0.0, 1.0)
    assert m["reward"] == pytest.approx(m["accuracy"] + 0.5 * m["r_format"] + m["gate"] * m["r_eff"], rel=1e-6)
