"""Rewards: answer extraction and matching per problem_type, malformed outputs, and the gated total (hand-computed)."""
import pytest
import torch

from rewards import (PROBLEM_TYPES, REGRESSION_REL_TOL, accuracy_reward, accuracy_rewards, efficiency_reward,
                     extract_answer, normalize_text, parse_choice, parse_number, zipr1_rewards)


# ---- extraction -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("<think>look at frame 3</think><answer>B</answer>", "B"),
    ("<answer>  B  </answer>", "B"),
    ("<ANSWER>42</Answer>", "42"),
    ("<answer>two\nlines</answer>", "two\nlines"),
    ("B", "B"),  # bare answer, no tags
    ("  the cat \n", "the cat"),
    ("<think>hmm</think> 7", "7"),  # bare answer after a think block
])
def test_extract_answer_valid(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", [
    None, 17, "", "   ", "<answer></answer>", "<answer>  </answer>",
    "<answer>A</answer><answer>B</answer>",  # several answers (hedging)
    "<answer>A</answer> <answer>A</answer>",  # several, even when they agree
    "<answer>A<answer>B</answer>",  # two opening tags
    "<answer>A</answer></answer>",  # two closing tags
    "<answer>B",  # unclosed
    "B</answer>",  # stray closing tag
    "</answer>B<answer>",  # reversed
    "<think>only thinking</think>",
])
def test_extract_answer_malformed_is_none(text):
    assert extract_answer(text) is None


# ---- parsing ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer", ["B", "(B)", "B.", "B:", "B) a red car", "(B) a red car", "B. a red car",
                                    "B: a red car", " B ", "The answer is B", "I think the answer is (B).",
                                    "answer is: B"])
def test_parse_choice_spellings(answer):
    assert parse_choice(answer) == "B"


@pytest.mark.parametrize("answer", ["", "b", "BC", "Bob", "A cat", "none of them", "the answer is", "42"])
def test_parse_choice_rejects_non_letters(answer):
    assert parse_choice(answer) is None


@pytest.mark.parametrize("answer, value", [
    ("3", 3.0), ("3.0", 3.0), ("-3", -3.0), ("+3", 3.0), ("\u22123", -3.0), ("0.25", 0.25), (".5", 0.5),
    ("1,234", 1234.0), ("-1,234,567.5", -1234567.5), ("42.", 42.0), (" 7 ", 7.0),
])
def test_parse_number(answer, value):
    assert parse_number(answer) == value


@pytest.mark.parametrize("answer", ["", "three", "1,23", "12,34,567", "3..", "3 apples", "1.2.3", "--3", "."])
def test_parse_number_rejects(answer):
    assert parse_number(answer) is None


@pytest.mark.parametrize("answer, normalised", [
    ("The Red Car!", "red car"), ("  a  dog,   an apple ", "dog apple"), ("Yes.", "yes"),
    ("theater", "theater"), ("snake_case", "snake case"), ("???", ""),
])
def test_normalize_text(answer, normalised):
    assert normalize_text(answer) == normalised


# ---- accuracy per problem_type ------------------------------------------------------------------------------------

SOLUTION_B = "<answer>B</answer>"


@pytest.mark.parametrize("completion, expected", [
    ("<answer>B</answer>", 1.0), ("<answer>(B)</answer>", 1.0), ("<answer>B.</answer>", 1.0),
    ("<think>the car is red</think><answer>B) red car</answer>", 1.0), ("<answer>B: red car</answer>", 1.0),
    ("B", 1.0), ("(B) red car", 1.0), ("The answer is B.", 1.0),
    ("<answer>C</answer>", 0.0), ("<answer>red car</answer>", 0.0), ("A", 0.0),
])
def test_multiple_choice(completion, expected):
    assert accuracy_reward(completion, SOLUTION_B, "multiple choice") == expected


@pytest.mark.parametrize("completion, solution, expected", [
    ("<answer>3</answer>", "<answer>3.0</answer>", 1.0), ("<answer>3.0</answer>", "<answer>3</answer>", 1.0),
    ("<answer>1,234</answer>", "<answer>1234</answer>", 1.0), ("-2.5", "<answer>-2.5</answer>", 1.0),
    ("<answer>0.30000000000000004</answer>", "<answer>0.3</answer>", 1.0),  # float noise only
    ("<answer>2.5</answer>", "<answer>-2.5</answer>", 0.0), ("<answer>3.14</answer>", "<answer>3.1416</answer>", 0.0),
    ("<answer>3.01</answer>", "<answer>3</answer>", 0.0), ("<answer>three</answer>", "<answer>3</answer>", 0.0),
])
def test_numerical(completion, solution, expected):
    assert accuracy_reward(completion, solution, "numerical") == expected


@pytest.mark.parametrize("problem_type", ["OCR", "free-form"])
@pytest.mark.parametrize("completion, solution, expected", [
    ("<answer>The Red Car.</answer>", "<answer>red car</answer>", 1.0),
    ("<answer>STOP</answer>", "<answer>stop</answer>", 1.0),
    ("<answer>Yes.</answer>", "<answer>yes</answer>", 1.0), ("YES", "<answer>Yes</answer>", 1.0),
    ("<answer>yes, it is</answer>", "<answer>yes</answer>", 1.0), ("<answer>No!</answer>", "<answer>no</answer>", 1.0),
    ("<answer>no</answer>", "<answer>yes</answer>", 0.0), ("<answer>yesterday</answer>", "<answer>yes</answer>", 0.0),
    ("<answer>a blue car</answer>", "<answer>red car</answer>", 0.0),
    ("<answer>red car parked</answer>", "<answer>red car</answer>", 0.0),
    ("<answer>...</answer>", "<answer>red car</answer>", 0.0),
])
def test_text_match(problem_type, completion, solution, expected):
    assert accuracy_reward(completion, solution, problem_type) == expected


@pytest.mark.parametrize("pred, expected", [
    (100.0, 1.0), (105.0, 1.0), (95.0, 1.0), (104.9, 1.0), (105.1, 0.0), (94.9, 0.0), (-100.0, 0.0),
])
def test_regression_relative_error(pred, expected):
    # reference: relative error against the documented 5% tolerance, computed here by hand
    assert REGRESSION_REL_TOL == 0.05
    assert accuracy_reward(f"<answer>{pred}</answer>", "<answer>100</answer>", "regression") == expected


def test_regression_zero_truth_needs_exact_zero():
    assert accuracy_reward("<answer>0</answer>", "<answer>0.0</answer>", "regression") == 1.0
    assert accuracy_reward("<answer>0.001</answer>", "<answer>0</answer>", "regression") == 0.0


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
@pytest.mark.parametrize("completion", [
    None, "", "   ", "<answer>3</answer><answer>3</answer>", "<answer>3", "3</answer>", "@@##!!", "\x00\x01",
])
def test_malformed_completion_scores_zero(problem_type, completion):
    solution = {"multiple choice": "<answer>B</answer>", "OCR": "<answer>stop</answer>",
                "free-form": "<answer>red car</answer>"}.get(problem_type, "<answer>3</answer>")
    assert accuracy_reward(completion, solution, problem_type) == 0.0


def test_unknown_problem_type_is_named():
    with pytest.raises(ValueError, match="'math'"):
        accuracy_reward("<answer>3</answer>", "<answer>3</answer>", "math")


@pytest.mark.parametrize("solution, problem_type", [
    ("<answer>yes</answer>", "multiple choice"), ("<answer>three</answer>", "numerical"),
    ("<answer>!!</answer>", "free-form"), ("<answer>1</answer><answer>2</answer>", "regression"), (None, "OCR"),
])
def test_malformed_solution_raises(solution, problem_type):
    with pytest.raises(ValueError, match="solution"):
        accuracy_reward("<answer>B</answer>", solution, problem_type)


def test_accuracy_rewards_batch():
    out = accuracy_rewards(["<answer>B</answer>", "7", None], [SOLUTION_B, "<answer>7.0</answer>", "<answer>x</answer>"],
                           ["multiple choice", "numerical", "free-form"])
    assert torch.equal(out, torch.tensor([1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="lengths differ"):
        accuracy_rewards(["a"], [], ["OCR"])


# ---- efficiency and total ---------------------------------------------------------------------------------------

def test_efficiency_reward():
    tau = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(efficiency_reward(tau), torch.tensor([1.0, 0.75, 0.0]))
    for bad in (torch.tensor([1.5]), torch.tensor([-0.1]), torch.tensor([float("nan")])):
        with pytest.raises(ValueError, match="tau"):
            efficiency_reward(bad)
    with pytest.raises(ValueError, match="floating"):
        efficiency_reward(torch.tensor([0, 1]))


def test_gate_all_wrong_group_gets_no_efficiency_reward():
    acc, tau = torch.zeros(4), torch.tensor([0.2, 0.4, 0.6, 0.8])
    out = zipr1_rewards(acc, tau, num_generations=4)
    assert torch.equal(out["gate"], torch.zeros(4))
    assert torch.equal(out["reward"], torch.zeros(4))
    assert torch.allclose(out["r_eff"], torch.tensor([0.8, 0.6, 0.4, 0.2]))  # still reported, just not paid


def test_gate_one_correct_pays_every_member():
    acc, tau = torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.5, 0.9, 0.1])
    out = zipr1_rewards(acc, tau, num_generations=3)
    assert torch.equal(out["gate"], torch.ones(3))
    assert torch.allclose(out["reward"], torch.tensor([0.0 + 0.5, 1.0 + 0.1, 0.0 + 0.9]))


def test_hand_computed_groups_flat_and_2d():
    # group 0: answers 1 and 3 correct; group 1: all wrong.
    acc = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    tau = torch.tensor([0.3, 0.5, 1.0, 0.0, 0.25, 0.75])
    gated = torch.tensor([1.7, 0.5, 1.0, 0.0, 0.0, 0.0])
    v1 = torch.tensor([1.7, 0.5, 1.0, 1.0, 0.75, 0.25])
    out = zipr1_rewards(acc, tau, num_generations=3)
    assert torch.allclose(out["reward"], gated)
    assert torch.equal(out["gate"], torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(out["r_acc"], acc)
    out_2d = zipr1_rewards(acc.view(2, 3), tau.view(2, 3), num_generations=3)
    assert out_2d["reward"].shape == (2, 3) and torch.allclose(out_2d["reward"], gated.view(2, 3))
    off = zipr1_rewards(acc, tau, num_generations=3, gate_efficiency=False)  # v1: r = r_acc + r_eff
    assert torch.allclose(off["reward"], v1)
    assert torch.equal(off["gate"], torch.ones(6))


def test_bool_accuracy_is_accepted():
    out = zipr1_rewards(torch.tensor([True, False]), torch.tensor([0.5, 0.5], dtype=torch.float64), 2)
    assert out["reward"].dtype == torch.float64
    assert torch.allclose(out["reward"], torch.tensor([1.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("acc, tau, n, message", [
    (torch.zeros(4), torch.zeros(3), 2, "differs"),
    (torch.zeros(5), torch.zeros(5), 2, "num_generations=2"),
    (torch.zeros(2, 3), torch.zeros(2, 3), 2, "num_generations=2"),
    (torch.zeros(2, 2, 2), torch.zeros(2, 2, 2), 2, "num_generations=2"),
    (torch.zeros(4), torch.zeros(4), 0, "num_generations=0"),
    (torch.tensor([1.5, 1.0]), torch.zeros(2), 2, r"in \[0, 1\]"),
    (torch.zeros(2), torch.tensor([0.5, 2.0]), 2, "tau"),
])
def test_zipr1_rewards_bad_input(acc, tau, n, message):
    with pytest.raises(ValueError, match=message):
        zipr1_rewards(acc, tau, n)
