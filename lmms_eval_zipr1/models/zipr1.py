"""The lmms-eval `zipr1` model class. Imported by lmms-eval only: it subclasses lmms_eval.api.model.lmms.

Written against lmms-eval 0.7.3 (the version docs/lmms_eval.md installs); the source lines cited below are of that
release.
"""
from __future__ import annotations

from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model

from lmms_eval_zipr1.engine import SIZE_DEFAULTS, SparseQwen

# model_args: name -> (type, default); the input sizes (#22: min_pixels ... max_frames) default to train.py's
# (Video-R1's, media.InputSizes).
MODEL_ARGS = {
    "pretrained": (str, "Qwen/Qwen2.5-VL-3B-Instruct"),
    "keep_p": (float, None),  # Top-p threshold of Eq. 3; None = 0.975 under zipr1 attention
    "attn_implementation": (str, "zipr1"),  # "zipr1" (sparse) or a stock one ("sdpa", "eager", ...): Full attention
    "max_new_tokens": (int, 1024),
    "dtype": (str, None),
    "seed": (int, 0),
    "stats_path": (str, "zipr1_stats.json"),  # τ and KV bytes per task (JSON), rewritten after every batch
    **{name: (type(default), default) for name, default in SIZE_DEFAULTS.items()},  # min_pixels, ..., max_frames
}
CLI_ARGS = ("batch_size", "max_batch_size", "device")  # what lmms-eval's evaluator passes itself (evaluator.py:518)


def parse_model_args(model_args: dict) -> dict:
    """model_args (strings or lmms-eval's parsed values) -> typed keyword arguments; one-line errors."""
    unknown = sorted(set(model_args) - set(MODEL_ARGS))
    if "batch_size" in unknown:
        raise ValueError("zipr1: batch_size is not a model_arg: pass it as --batch_size N on the lmms-eval command line")
    if unknown:
        raise ValueError(f"zipr1: unknown model_args {unknown}; allowed: {', '.join(MODEL_ARGS)}")
    parsed = {name: default for name, (_, default) in MODEL_ARGS.items()}
    for name, value in model_args.items():
        kind = MODEL_ARGS[name][0]
        if value is None:  # a default passed on (create_from_arg_string -> __init__)
            continue
        try:
            parsed[name] = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"zipr1: model_arg {name}={value!r} is not a {kind.__name__}") from None
    return parsed


def parse_batch_size(batch_size) -> int:
    """lmms-eval's --batch_size (an int, a numeric string or 'auto') -> a positive int, or one clear error."""
    if batch_size is None:
        return 1
    if str(batch_size).startswith("auto"):
        raise ValueError("zipr1: --batch_size auto is not supported (no memory probe): pass an integer, e.g. "
                         "--batch_size 8")
    try:
        size = int(batch_size)
    except ValueError:
        raise ValueError(f"zipr1: --batch_size must be a positive integer, got {batch_size!r}") from None
    if size < 1:
        raise ValueError(f"zipr1: --batch_size must be a positive integer, got {size}")
    return size


@register_model("zipr1")
class ZipR1(lmms):
    """A "simple" lmms-eval model: requests carry (context, gen_kwargs, doc_to_visual, doc_id, task, split).

    One process (rank 0 of 1): run lmms-eval without accelerate data parallelism.
    """

    is_simple = True

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        # lmms-eval 0.7.3 api/model.py:142-145 calls cls(**model_args, **cli_config): a batch_size in both would be a
        # bare TypeError, so the model_args are checked here first.
        from lmms_eval import utils
        model_args = parse_model_args(utils.simple_parse_args_string(arg_string))
        cli = {k: v for k, v in (additional_config or {}).items() if k in CLI_ARGS}
        return cls(**model_args, **cli)

    def __init__(self, batch_size=1, max_batch_size=None, device: str | None = None, **model_args) -> None:
        super().__init__()
        args = parse_model_args(model_args)
        self.stats_path = args.pop("stats_path")
        self.engine = SparseQwen(**args, batch_size=parse_batch_size(batch_size), device=device)

    @property
    def batch_size(self) -> int:
        return self.engine.batch_size

    def generate_until(self, requests) -> list[str]:
        answers = self.engine.generate_until(requests, self.task_dict)
        for request, answer in zip(requests, answers):  # lmms-eval's response cache (--use_cache), as its models do
            self.cache_hook.add_partial("generate_until", request.args[:2], answer)
        self.engine.write_stats(self.stats_path)
        return answers

    def loglikelihood(self, requests) -> list[GenerationResult]:
        """One (loss, is_greedy) per request, loss = −log P(continuation | context) summed over its tokens.

        Sign: lmms-eval 0.7.3 scores multiple_choice by `pred = np.argmin(lls)` (api/task.py:1620-1624, "since we
        return the actual loss in many model loglikelihood we just use the argmin"), and its own llava_hf returns
        `(float(loss.item()), bool(max_equal))` (models/simple/llava_hf.py:243). So the value is a loss: lower wins.
        Type: the evaluator passes every response through `unwrap_generation_output` (evaluator.py:1231-1233,
        api/instance.py:44-80), which turns a bare (float, bool) tuple into its str() and breaks
        `lls, is_greedy = zip(*results)` (api/task.py:1606). A GenerationResult is unwrapped to its `.text`
        unchanged (api/instance.py:57-58), so the tuple reaches process_results intact.
        """
        scores = self.engine.loglikelihood(requests, self.task_dict)
        self.engine.write_stats(self.stats_path)
        return [GenerationResult(text=(loss, greedy)) for loss, greedy in scores]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise ValueError("zipr1: multi-round generation is not supported; use single-turn generate_until tasks")
