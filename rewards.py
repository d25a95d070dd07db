"""ZipR1 rewards: answer accuracy r_acc, sparsity efficiency r_eff, and their gated sum.

For each question the rollout samples N answers, answer n under its own top-p threshold p_n, and records the token
ratio tau_n in [0, 1] (mean kept fraction over layers). Each answer gets

    r_acc = 1 if the extracted answer matches the ground truth else 0        (binary, as in the paper;
            or graded in [0, 1] per problem type as Video-R1 scores it, below)
    r_eff = 1 - tau                                                          (fewer tokens kept -> more reward)
    r     = r_acc + w_f * r_format + C * r_eff,   C = 1 if some answer of the group scores >= gate_threshold

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
That is `accuracy_reward="binary"`, the paper's "1 if the answer is correct" and the toy's reward.

Graded accuracy (`graded_accuracy_reward`, the default for real data): Video-R1's per-type rewards
(github.com/tulerfeng/Video-R1, src/r1-v/src/open_r1/grpo.py: accuracy_reward), in [0, 1]; the answer must sit in
one <answer>...</answer> pair (no tags -> 0, as there):

  | problem_type      | graded r_acc                                                                            |
  |-------------------|-----------------------------------------------------------------------------------------|
  | "multiple choice" | 1 if the answer equals the ground truth exactly ("B" == "B"; "(B)", "b", "B or C": 0)   |
  | "numerical"       | 1 if both are numbers (commas dropped, float()) equal after rounding to 2 decimals      |
  | "OCR"             | 1 - WER (word edit distance / reference words), clipped at 0                            |
  | "free-form"       | mean F-score of ROUGE-1, ROUGE-2, ROUGE-L (rouge-score package, Porter stemming)        |
  | "regression"      | 1 - |pred - gt| / |gt|, clipped to [0, 1]                                               |

Deliberate deviations from Video-R1 (docs/video_r1.md lists them with the reason): each row's own problem_type
(Video-R1 takes the first row's for the batch); numbers compared as numbers ("3.0" == "3"; Video-R1 first requires
both or neither to contain "." or ","); a non-finite number ("nan", "inf") is no answer (Video-R1 pays a regression
"nan" 1.0); regression without Video-R1's 1e-9 terms (an exact answer scores exactly 1, and gt 0 needs pred 0:
Video-R1 scores every answer to gt 0 with 0); ROUGE-2 is left out of the mean when the reference has one token (it
has no bigram, so Video-R1 caps a perfect one-word answer at 2/3); several <answer> pairs score 0 (Video-R1 takes
the first: a hedge); an empty or unscorable ground truth is a load-time error, not a reward of 1 for empty answers.

`format_reward`: Video-R1's, 1 if the whole completion is "<think>...</think> <answer>...</answer>" (whitespace
between), else 0; it joins r with `format_weight` (0 by default, as in the ZipR1 paper).
Gate C for graded rewards: C = 1 iff some answer of the group scores >= gate_threshold (default 0.5); for binary
rewards any threshold in (0, 1] is "some answer is correct", the paper's gate.
"""
import functools
import math
import re

import torch

NUMERIC_REL_TOL = 1e-6  # "numerical": equal up to float noise
REGRESSION_REL_TOL = 0.05  # "regression": within 5% relative error
PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")
ACCURACY_REWARDS = ("graded", "binary")  # Video-R1's per-type scores / the paper's 0-1 correctness
GATE_THRESHOLD = 0.5  # C = 1 iff some answer of the group scores >= this; any value in (0, 1] is binary's "correct"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")  # Video-R1 grpo.py, accuracy_reward.compute_rouge_score
_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.S)  # Video-R1 grpo.py: format_reward

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


# ----------------------------------------------------------------------------------------------- graded (Video-R1)
def tagged_answer(text):
    """The answer inside exactly one <answer>...</answer> pair, else None. Graded scoring needs the tags: Video-R1's
    extract_answer gives "" without them, which scores 0 for every problem type."""
    if not isinstance(text, str) or not _OPEN.search(text):
        return None
    return extract_answer(text)


def video_r1_number(answer):
    """Video-R1's normalize_number (commas dropped, then Python's float: "1e3", "1,2345" -> 12345.0), None for
    anything else and for "nan" / "inf" (deviation: a non-finite number is no answer)."""
    try:
        value = float(answer.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def word_error_rate(reference, hypothesis):
    """Word-level Levenshtein distance (substitution, insertion, deletion: 1 each) over the reference's word count
    (at least 1); words are whitespace-separated and case-sensitive, as in Video-R1's accuracy_reward.wer."""
    ref, hyp = reference.split(), hypothesis.split()
    previous = list(range(len(hyp) + 1))  # distances from ref[:0] to every prefix of hyp
    for i, word in enumerate(ref, 1):
        current = [i]
        for j, other in enumerate(hyp, 1):
            current.append(previous[j - 1] if word == other else 1 + min(previous[j], current[j - 1], previous[j - 1]))
        previous = current
    return previous[-1] / max(1, len(ref))


@functools.lru_cache(maxsize=1)
def _rouge():
    """(scorer, tokenizer) of the rouge-score package, imported on first use: only free-form rows need it."""
    from rouge_score import rouge_scorer, tokenizers
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True), tokenizers.DefaultTokenizer(use_stemmer=True)


def rouge_tokens(text):
    """The tokens ROUGE compares: lowercase runs of letters and digits, Porter-stemmed (rouge-score's tokenizer)."""
    return _rouge()[1].tokenize(text)


def rouge_f(reference, hypothesis):
    """Mean F-score of ROUGE-1, ROUGE-2 and ROUGE-L (Video-R1's compute_rouge_score), ROUGE-2 left out when the
    reference has a single token (deviation: it has no bigram, and Video-R1 caps a perfect answer at 2/3)."""
    scorer, _ = _rouge()
    scores = scorer.score(reference, hypothesis)
    kinds = ROUGE_TYPES if len(rouge_tokens(reference)) > 1 else ("rouge1", "rougeL")
    return sum(scores[k].fmeasure for k in kinds) / len(kinds)


def relative_accuracy(pred, gt):
    """1 - |pred - gt| / |gt| clipped to [0, 1] (Video-R1's regression reward without its 1e-9 terms); gt = 0: 1
    only for pred = 0."""
    if gt == 0:
        return 1.0 if pred == 0 else 0.0
    return 1.0 - min(1.0, abs(pred - gt) / abs(gt))


def _number_score(match):
    def score(answer, gt):
        pred = video_r1_number(answer)
        return 0.0 if pred is None else match(pred, gt)
    return score


_GRADED = {  # problem_type -> (ground truth from its answer text or None, score of an answer text against it)
    "multiple choice": (lambda a: a, lambda answer, gt: float(answer == gt)),
    "numerical": (video_r1_number, _number_score(lambda pred, gt: float(round(pred, 2) == round(gt, 2)))),
    "OCR": (lambda a: a, lambda answer, gt: max(0.0, 1.0 - word_error_rate(gt, answer))),
    "free-form": (lambda a: a if rouge_tokens(a) else None, lambda answer, gt: min(1.0, max(0.0, rouge_f(gt, answer)))),
    "regression": (video_r1_number, _number_score(relative_accuracy)),
}
_UNSCORABLE = {"numerical": "is not a finite number (e.g. 42, 3.14, 1e3, 1,234)",
               "regression": "is not a finite number (e.g. 42, 3.14, 1e3, 1,234)",
               "free-form": "holds no letter or digit, so ROUGE gives every answer 0"}


def _check_type(problem_type):
    if problem_type not in _GRADED:
        raise ValueError(f"unknown problem_type {problem_type!r}; expected one of {PROBLEM_TYPES}")


def _graded_truth(solution, problem_type):
    """The ground truth graded scoring compares with; ValueError (one line) when no answer could score on it."""
    answer = extract_answer(solution)
    if answer is None:
        raise ValueError(f"solution {solution!r} has no answer (one <answer>...</answer> pair or bare text)")
    truth = _GRADED[problem_type][0](answer)
    if truth is None:
        raise ValueError(f"solution {solution!r}: {answer!r} {_UNSCORABLE[problem_type]}, which a "
                         f"{problem_type!r} row needs")
    return truth


def graded_accuracy_reward(completion, solution, problem_type):
    """r_acc in [0, 1] as Video-R1's accuracy_reward computes it for `problem_type` (module docstring, deviations
    included); 0 when the completion has no single <answer>...</answer> pair."""
    _check_type(problem_type)
    truth, answer = _graded_truth(solution, problem_type), tagged_answer(completion)
    return 0.0 if answer is None else float(_GRADED[problem_type][1](answer, truth))


def check_solution(solution, problem_type, accuracy="graded"):
    """ValueError (one line, naming the solution and why) unless `accuracy` scoring can pay some answer on it."""
    _check_type(problem_type)
    if accuracy not in ACCURACY_REWARDS:
        raise ValueError(f"accuracy_reward must be one of {ACCURACY_REWARDS}, got {accuracy!r}")
    if accuracy == "graded":
        _graded_truth(solution, problem_type)
    elif accuracy_reward(solution, solution, problem_type) != 1.0:  # binary: a valid truth matches itself
        raise ValueError(f"solution {solution!r} has no usable {problem_type!r} answer")


def format_reward(completion):
    """1.0 if the whole completion is <think>...</think>, optional whitespace, <answer>...</answer> (Video-R1's
    format_reward, re.fullmatch with DOTALL), else 0.0."""
    return 1.0 if isinstance(completion, str) and _FORMAT.fullmatch(completion) else 0.0


def format_rewards(completions):
    """format_reward of each completion.  (len,)"""
    return torch.tensor([format_reward(c) for c in completions], dtype=torch.float32)  # (len,)


def accuracy_rewards(completions, solutions, problem_types, accuracy="binary"):
    """accuracy_reward ("binary") or graded_accuracy_reward ("graded") over parallel lists -> (len,) float tensor.

    Each row is scored under its own problem_type (Video-R1 takes the first row's for the whole batch)."""
    if accuracy not in ACCURACY_REWARDS:
        raise ValueError(f"accuracy_reward must be one of {ACCURACY_REWARDS}, got {accuracy!r}")
    if not len(completions) == len(solutions) == len(problem_types):
        raise ValueError(f"lengths differ: {len(completions)} completions, {len(solutions)} solutions, "
                         f"{len(problem_types)} problem_types")
    score = graded_accuracy_reward if accuracy == "graded" else accuracy_reward
    rewards = [score(c, s, t) for c, s, t in zip(completions, solutions, problem_types)]
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
    if not bool(((acc >= 0) & (acc <= 1)).all()):
        raise ValueError("acc must hold accuracy rewards in [0, 1] (binary 0 / 1, or graded)")


def group_gate(r_acc, threshold=GATE_THRESHOLD):
    """C per answer: 1 iff some answer of its group scores r_acc >= threshold, else 0.  (G, N) -> (G, N)

    The later paper version's gate ("some answer of the group is correct"), for graded rewards "correct" meaning a
    score of at least `threshold`. Binary rewards give the same C for every threshold in (0, 1]."""
    if not 0 < threshold <= 1:
        raise ValueError(f"gate_threshold must lie in (0, 1], got {threshold}")
    opened = r_acc.amax(dim=1, keepdim=True) >= threshold  # (G, 1)
    return opened.to(r_acc.dtype).expand_as(r_acc)  # (G, N)


def zipr1_rewards(acc, tau, num_generations, gate_efficiency=True, gate_threshold=GATE_THRESHOLD, r_format=None,
                  format_weight=0.0):
    """Total ZipR1 reward r = r_acc + w_f * r_format + C * r_eff per answer; groups are consecutive runs of
    num_generations answers.

    acc: r_acc in [0, 1] (binary or graded), (G*N,) or (G, N); tau: token ratios, same shape; r_format: format
    rewards, same shape (None: 0), weighted by format_weight (0: the paper's reward). C = group_gate(r_acc,
    gate_threshold) when gate_efficiency (later paper version), else 1 (v1).
    Returns {"reward", "r_acc", "r_eff", "r_format", "gate"}, input shape.
    """
    _check_group_shapes(acc, tau, num_generations)
    r_eff = efficiency_reward(tau).reshape(-1, num_generations)  # (G, N)
    r_acc = acc.to(tau.dtype).reshape(-1, num_generations)  # (G, N)
    r_fmt = torch.zeros_like(r_acc) if r_format is None else r_format.to(tau.dtype).reshape(r_acc.shape)  # (G, N)
    gate = group_gate(r_acc, gate_threshold) if gate_efficiency else torch.ones_like(r_acc)  # (G, N)
    reward = r_acc + format_weight * r_fmt + gate * r_eff  # (G, N): r = r_acc + C * r_eff when w_f = 0 (Eq. 4: adv.)
    out = {"reward": reward, "r_acc": r_acc, "r_eff": r_eff, "r_format": r_fmt, "gate": gate}
    return {name: value.reshape(acc.shape) for name, value in out.items()}
