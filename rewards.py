"""ZipR1 rewards: answer accuracy r_acc, sparsity efficiency r_eff, and their gated sum.

For each question the rollout samples N answers, answer n under its own top-p threshold p_n, and records the token
ratio tau_n in [0, 1] (mean kept fraction over layers). Each answer gets

    r_acc = 1 if the extracted answer matches the ground truth else 0        (binary, as in the paper)
    r_eff = 1 - tau                                                          (fewer tokens kept -> more reward)
    r     = r_acc + C * r_eff,   C = 1 if any answer of the group is correct else 0

r feeds the group-normalised advantage of Eq. 4. C is the later paper version's gate: a group that is all wrong gets
no efficiency reward, so the policy is never paid for sparsity that destroys the answer. `gate_efficiency=False`
gives the v1 form r = r_acc + r_eff.

Answer extraction (`extract_answer`), applied to completions and to the ground-truth `solution` alike (Video-R1
stores solutions as "<answer>X</answer>"):
  * exactly one "<answer>...</answer>" pair (tags case-insensitive) -> the text inside, stripped;
  * no answer tags at all -> the bare text, with any "<think>...</think>" blocks removed, stripped;
  * anything else is malformed -> None (scores 0): an unclosed "<answer>", a stray "</answer>", or several answer
    tags, i.e. more than one "<answer>" or more than one "</answer>" -- even when the copies agree. Several answers
    are a hedge ("<answer>A</answer><answer>B</answer>") and rewarding any of them would teach listing every option.
Empty, None or non-string completions also give None. A malformed ground truth raises ValueError instead.

Matching per Video-R1-260k `problem_type` (anything else -> ValueError naming it):

  | problem_type      | answer parsed as                  | correct when                                           |
  |-------------------|-----------------------------------|--------------------------------------------------------|
  | "multiple choice" | option letter A-Z: "B", "(B)",    | letters equal                                          |
  |                   | "B.", "B) text", "B: text",       |                                                        |
  |                   | "... answer is B"                 |                                                        |
  | "numerical"       | number: "-3", "3.0", "1,234.5"    | |pred - gt| <= NUMERIC_REL_TOL * max(1, |gt|)          |
  |                   | (commas only as thousands groups) | (float noise only, so "3.0" == "3" but 3.14 != 3.1416) |
  | "OCR"             | normalised text (below)           | normalised strings equal                               |
  | "free-form"       | normalised text (below)           | normalised strings equal                               |
  | "regression"      | number, as for "numerical"        | |pred - gt| <= REGRESSION_REL_TOL * |gt| (5%);         |
  |                   |                                   | gt = 0 needs pred = 0                                  |

Normalised text: lowercase, punctuation removed, articles (a, an, the) removed, whitespace collapsed. A yes/no ground
truth is matched on the first word of the normalised answer, so "Yes." and "yes, it is" both match "yes".
Video-R1 scores OCR by 1 - WER, free-form by ROUGE and regression by mean relative accuracy, all continuous; we keep
the paper's binary r_acc because the ZipR1 reward is "1 if the answer is correct": a partial-credit accuracy would
trade off against r_eff at a rate the paper never uses (a sparser, half-right answer could outscore a correct one).
Video-R1 compares numbers after rounding to 2 decimals; we require equality up to float noise.
"""
import math
import re

import torch

NUMERIC_REL_TOL = 1e-6  # "numerical": equal up to float noise
REGRESSION_REL_TOL = 0.05  # "regression": within 5% relative error
PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")

_OPEN, _CLOSE = re.compile(r"<answer>", re.I), re.compile(r"</answer>", re.I)
_INSIDE = re.compile(r"<answer>(.*?)</answer>", re.I | re.S)
_THINK = re.compile(r"<think>.*?</think>", re.I | re.S)
_CHOICE_ONLY = re.compile(r"\(?([A-Z])\)?[.:]?")  # "B", "(B)", "B.", "B:"
_CHOICE_WITH_TEXT = re.compile(r"\(?([A-Z])[).:]\s+\S")  # "B) text", "(B) text", "B. text", "B: text"
_ANSWER_IS = re.compile(r"(?i:answer\s+is)\s*:?\s*\(?([A-Z])(?![A-Za-z])")  # "... the answer is B"
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def extract_answer(text):
    """The answer inside one <answer>...</answer> pair, the bare text when there are no tags, else None."""
    if not isinstance(text, str):
        return None
    n_open, n_close = len(_OPEN.findall(text)), len(_CLOSE.findall(text))
    if n_open == 0 and n_close == 0:
        answer = _THINK.sub("", text).strip()
    elif n_open == 1 and n_close == 1 and (match := _INSIDE.search(text)):
        answer = match.group(1).strip()
    else:
        return None  # unclosed, stray or several answer tags
    return answer or None


def parse_choice(answer):
    """Option letter of a multiple-choice answer ("B", "(B)", "B.", "B) text", "B: text", "answer is B"), or None."""
    answer = answer.strip()
    match = _CHOICE_ONLY.fullmatch(answer) or _CHOICE_WITH_TEXT.match(answer) or _ANSWER_IS.search(answer)
    return match.group(1) if match else None


def parse_number(answer):
    """Float value of "-3", "3.0", "1,234", ".5" (an optional trailing full stop is allowed), or None."""
    answer = answer.strip().replace("\u2212", "-")  # unicode minus sign
    if answer.endswith(".") and not answer.endswith(".."):
        answer = answer[:-1]
    if not _NUMBER.fullmatch(answer):
        return None
    return float(answer.replace(",", ""))


def normalize_text(answer):
    """Lowercase, drop punctuation and articles, collapse whitespace (SQuAD-style exact-match normalisation)."""
    text = re.sub(r"[^\w\s]", "", answer.lower()).replace("_", " ")
    return " ".join(_ARTICLES.sub(" ", text).split())


def _numbers_equal(pred, gt):
    return abs(pred - gt) <= NUMERIC_REL_TOL * max(1.0, abs(gt))


def _within_relative_error(pred, gt):
    return abs(pred - gt) <= REGRESSION_REL_TOL * abs(gt)  # gt = 0 -> only pred = 0


def _texts_equal(pred, gt):
    if gt in ("yes", "no"):
        return pred.split(" ", 1)[0] == gt
    return pred == gt


_PARSE_AND_MATCH = {  # problem_type -> (parse one answer string, compare parsed prediction with parsed truth)
    "multiple choice": (parse_choice, str.__eq__),
    "numerical": (parse_number, _numbers_equal),
    "OCR": (normalize_text, _texts_equal),
    "free-form": (normalize_text, _texts_equal),
    "regression": (parse_number, _within_relative_error),
}


def _parse_solution(solution, problem_type):
    """Ground truth parsed like an answer; a malformed one is a data error, not a zero reward."""
    answer = extract_answer(solution)
    parsed = _PARSE_AND_MATCH[problem_type][0](answer) if answer is not None else None
    if parsed is None or parsed == "":
        raise ValueError(f"solution {solution!r} has no valid {problem_type!r} answer")
    return parsed


def accuracy_reward(completion, solution, problem_type):
    """r_acc in {0.0, 1.0}: 1.0 if the completion's answer matches the solution under `problem_type`'s rule."""
    if problem_type not in _PARSE_AND_MATCH:
        raise ValueError(f"unknown problem_type {problem_type!r}; expected one of {PROBLEM_TYPES}")
    gt = _parse_solution(solution, problem_type)
    parse, match = _PARSE_AND_MATCH[problem_type]
    answer = extract_answer(completion)
    pred = parse(answer) if answer is not None else None
    return 1.0 if pred not in (None, "") and match(pred, gt) else 0.0


def accuracy_rewards(completions, solutions, problem_types):
    """accuracy_reward over parallel lists -> (len,) float tensor."""
    if not len(completions) == len(solutions) == len(problem_types):
        raise ValueError(f"lengths differ: {len(completions)} completions, {len(solutions)} solutions, "
                         f"{len(problem_types)} problem_types")
    rewards = [accuracy_reward(c, s, t) for c, s, t in zip(completions, solutions, problem_types)]
    return torch.tensor(rewards, dtype=torch.float32)  # (len,)


def efficiency_reward(tau):
    """r_eff = 1 - tau for token ratios tau in [0, 1] (any shape)."""
    if not tau.is_floating_point():
        raise ValueError(f"tau must be a floating tensor, got {tau.dtype}")
    if not bool(((tau >= 0) & (tau <= 1)).all()):
        raise ValueError(f"token ratio tau must lie in [0, 1], got min {tau.min().item()}, max {tau.max().item()}")
    return 1.0 - tau


def _check_group_shapes(acc, tau, num_generations):
    if acc.shape != tau.shape:
        raise ValueError(f"acc shape {tuple(acc.shape)} differs from tau shape {tuple(tau.shape)}")
    if num_generations < 1 or acc.dim() not in (1, 2) or acc.shape[-1] % num_generations \
            or (acc.dim() == 2 and acc.shape[1] != num_generations):
        raise ValueError(f"rewards of shape {tuple(acc.shape)} are not groups of num_generations={num_generations}; "
                         f"expected (G*N,) or (G, N)")
    if not bool(((acc == 0) | (acc == 1)).all()):
        raise ValueError("acc must hold binary accuracy rewards (0 or 1)")


def zipr1_rewards(acc, tau, num_generations, gate_efficiency=True):
    """Total ZipR1 reward r = r_acc + C * r_eff per answer; groups are consecutive runs of num_generations answers.

    acc: binary r_acc, (G*N,) or (G, N); tau: token ratios, same shape. C = max over the group of r_acc when
    gate_efficiency (later paper version), else 1 (v1). Returns {"reward", "r_acc", "r_eff", "gate"}, input shape.
    """
    _check_group_shapes(acc, tau, num_generations)
    r_eff = efficiency_reward(tau).reshape(-1, num_generations)  # (G, N)
    r_acc = acc.to(tau.dtype).reshape(-1, num_generations)  # (G, N)
    if gate_efficiency:
        gate = r_acc.amax(dim=1, keepdim=True).expand_as(r_acc)  # (G, N): C = 1 iff any answer is correct
    else:
        gate = torch.ones_like(r_acc)  # (G, N)
    reward = r_acc + gate * r_eff  # (G, N): the paper's reward r = r_acc + C * r_eff (Eq. 4 is the advantage)
    out = {"reward": reward, "r_acc": r_acc, "r_eff": r_eff, "gate": gate}
    return {name: value.reshape(acc.shape) for name, value in out.items()}
