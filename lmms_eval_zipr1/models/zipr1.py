"""The lmms-eval `zipr1` model class. Imported by lmms-eval only: it subclasses lmms_eval.api.model.lmms."""
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model

from lmms_eval_zipr1.engine import SIZE_ARGS, SparseQwen


@register_model("zipr1")
class ZipR1(lmms):
    """A "simple" lmms-eval model: requests carry (context, gen_kwargs, doc_to_visual, doc_id, task, split).

    One process (rank 0 of 1): run lmms-eval without accelerate data parallelism.
    """

    is_simple = True

    def __init__(self, pretrained: str = "Qwen/Qwen2.5-VL-3B-Instruct", keep_p: float = 0.975, batch_size: int = 1,
                 max_new_tokens: int = 1024, device: str | None = None, dtype: str | None = None, seed: int = 0,
                 **sizes_and_unknown) -> None:
        super().__init__()
        sizes = {k: v for k, v in sizes_and_unknown.items() if k in SIZE_ARGS}  # min_pixels, ..., max_frames
        unknown = set(sizes_and_unknown) - set(sizes)
        if unknown:
            raise ValueError(f"zipr1: unknown model_args {sorted(unknown)}")
        self.engine = SparseQwen(pretrained, keep_p=keep_p, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                 device=device, dtype=dtype, seed=seed, **sizes)

    @property
    def batch_size(self) -> int:
        return self.engine.batch_size

    def generate_until(self, requests) -> list[str]:
        answers = self.engine.generate_until(requests, self.task_dict)
        for request, answer in zip(requests, answers):  # lmms-eval's response cache (--use_cache), as its models do
            self.cache_hook.add_partial("generate_until", request.args[:2], answer)
        return answers

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.engine.loglikelihood(requests, self.task_dict)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise ValueError("zipr1: multi-round generation is not supported; use single-turn generate_until tasks")
