"""Multi-GPU ZipR1 on PyTorch's own engine: torchrun processes, FSDP2 sharding (`fully_shard`), DCP state dicts.

    torchrun --nproc_per_node 8 train.py --model Qwen/Qwen2.5-VL-7B-Instruct --dataset Video-R1-260k.json ...
    python train.py ...                     # one process: every function here is a no-op or the plain equivalent

Per step, with W ranks and G = per_step_questions questions (G a multiple of W):
  * rank r takes the contiguous block of G/W questions (`rank_questions`); each question's group of N answers stays
    whole on one rank, so the group statistics of Eq. 4 (mean, std of the N rewards) need no communication;
  * every answer is sampled from its own stream, seeded by `question_seed` (the step seed and the question's place
    in the global batch) plus the answer's index, so the completions depend on the global batch only, never on how
    it is split over ranks or rollout batches;
  * the policy is sharded layer by layer with FSDP2 (`shard_model`); the frozen reference is sharded the same way;
    generation runs on gathered weights (`gathered_weights`), because ranks stop decoding after different numbers of
    tokens and a sharded forward per token would need every rank in lock step;
  * gradients: FSDP2 reduce-scatters and averages them over the W ranks; `loss_weight` scales each local loss so
    that this average is the gradient of the single-process loss over the global batch (derivation there);
  * metrics are averaged over ranks (`reduce_metrics`); rank 0 writes one consolidated HF checkpoint from the
    gathered full state dict (`save_pretrained`) and one full optimizer state (`optimizer_state`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

SUM_METRICS = ("tokens_per_s",)  # summed over ranks (throughput of the whole job)
MAX_METRICS = ("seconds",)  # the slowest rank sets the step time


@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank in [0, world_size), its GPU (local_rank) or the CPU, the FSDP device mesh."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object = None  # torch.distributed.device_mesh.DeviceMesh when world_size > 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()  # a plain single process (the default of every train.py function that takes a Dist)


def init_distributed() -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the env).

    NCCL on CUDA, gloo on CPU. Without WORLD_SIZE (plain `python train.py`) or with WORLD_SIZE=1 nothing is
    initialised and the returned Dist is the single process on cuda:0 (or the CPU).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size <= 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE={world_size} but {name} is not set: launch with torchrun")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size,
                                      device_id=device if cuda else None)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world_size,))
    return Dist(rank, world_size, local_rank, device, mesh)


def shutdown(dist: Dist) -> None:
    """Leave the process group (after the last collective)."""
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()


@contextlib.contextmanager
def main_first(dist: Dist):
    """Rank 0 runs the block first (builds caches, writes files); the other ranks run it after, reading them."""
    if not dist.is_main:
        barrier(dist)
    yield
    if dist.is_main:
        barrier(dist)


def broadcast(obj, dist: Dist):
    """Rank 0's value of a picklable `obj` on every rank."""
    if not dist.enabled:
        return obj
    box = [obj if dist.is_main else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------- sharding
def block_modules(model) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: HF's `_no_split_modules` (Qwen2.5-VL: decoder layers, vision blocks)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no _no_split_modules blocks to shard with FSDP")
    return blocks


def shard_model(model, dist: Dist, param_dtype: torch.dtype | None = None, replicate: torch.nn.Module | None = None):
    """FSDP2: shard every block's parameters over the ranks (`fully_shard`), then the rest (embeddings, lm_head).

    Each rank keeps 1/W of every parameter (and of its gradient and AdamW state); a block's weights are
    all-gathered just before it runs and freed after. param_dtype=torch.bfloat16 gathers and computes in bf16
    while the sharded master weights, gradients (reduced in fp32) and optimizer stay fp32. Frozen models (the
    reference) shard the same way. `replicate`: a frozen submodule every rank keeps whole and may call on its own
    (the policy's frozen vision tower, run once per group by batching.repeat_prompts): FSDP ignores its parameters.
    A no-op in a single process. Returns the model (now an FSDPModule).
    """
    if not dist.enabled:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype \
        else MixedPrecisionPolicy()
    kept = set(replicate.parameters()) if replicate is not None else set()
    for block in block_modules(model):
        if not kept.intersection(block.parameters()):
            fully_shard(block, mesh=dist.mesh, mp_policy=policy)
    fully_shard(model, mesh=dist.mesh, mp_policy=policy, ignored_params=kept or None)
    return model


@contextlib.contextmanager
def gathered_weights(model, dist: Dist):
    """Run the block with every FSDP parameter gathered once and kept (no collective per forward).

    Generation calls the model once per new token, and ranks stop at different lengths (EOS), so a sharded model
    would wait forever in an all-gather the finished rank never joins. Gathering costs one full copy of the
    weights (in param_dtype) per rank for the duration of the rollout. A no-op in a single process.
    """
    from torch.distributed.fsdp import FSDPModule
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)] if dist.enabled else []
    for module in fsdp:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield model
    finally:
        for module in fsdp:
            module.reshard()
            module.set_reshard_after_forward(module is not model, recurse=False)  # FSDP2 default: root stays gathered


# ----------------------------------------------------------------------------------------------- work split
def rank_questions(num_questions: int, dist: Dist) -> range:
    """Positions (in the step's global question list) of the questions this rank rolls out and trains on.

    Whole groups only: question q's N answers all go to one rank. FSDP needs the same number of forwards on every
    rank, so num_questions must be a multiple of world_size.
    """
    if num_questions % dist.world_size:
        raise ValueError(f"per_step_questions={num_questions} must be a multiple of the {dist.world_size} processes "
                         f"(each rank takes whole groups, the same number of them)")
    per_rank = num_questions // dist.world_size
    return range(dist.rank * per_rank, (dist.rank + 1) * per_rank)


def question_seed(step_seed: int, position: int) -> int:
    """Sampling seed of the question at `position` of a step's global question list (answer j samples from seed + j):
    independent of the rank split and of which questions share a rollout batch."""
    return (step_seed + 1_000_000_007 * position) % 2**62


# ----------------------------------------------------------------------------------------------- loss, metrics
def all_sum(value: float, dist: Dist) -> float:
    """Σ over ranks of a number."""
    if not dist.enabled:
        return float(value)
    total = torch.tensor(float(value), dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(total)
    return float(total)


def loss_weight(local_count: int, global_count: int, dist: Dist) -> float:
    """Factor for a micro-batch loss so that FSDP's gradient average is the gradient of the global-batch loss.

    grpo.grpo_loss normalises a micro-batch b by its own count n_b (grpo.loss_normalizer: sequences or tokens):
    L_b = S_b / n_b. The loss of the global batch is the same sum over every micro-batch of every rank, normalised
    by the global count n = Σ n_b:   L = Σ_b S_b / n = Σ_b (n_b / n) L_b.
    Each rank backpropagates Σ_{b on rank} w_b L_b and FSDP averages the W gradients (÷ W), so w_b = W n_b / n
    gives exactly ∇L. With one process and one micro-batch w = 1: train.py's single-process loss is unchanged.
    """
    if global_count <= 0:
        return 0.0
    return dist.world_size * local_count / global_count


def clip_grad_norm(parameters, max_norm: float) -> float:
    """torch's clip_grad_norm_ (the norm over every rank's shards when the grads are FSDP DTensors), as a float."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def reduce_metrics(metrics: dict, dist: Dist) -> dict:
    """Metrics of the global batch from each rank's: mean over ranks (every rank has the same number of groups),
    sum for SUM_METRICS, max for MAX_METRICS; nested dicts key by key; None stays None."""
    if not dist.enabled:
        return metrics
    gathered = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, metrics)
    return combine_metrics(gathered)


def combine_metrics(values: list, key: str = ""):
    """One value from the ranks' values of metric `key` (dicts: key by key; see `reduce_metrics`)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if isinstance(present[0], dict):
        keys = list(dict.fromkeys(k for v in present for k in v))
        return {k: combine_metrics([v.get(k) for v in present], k) for k in keys}
    if isinstance(present[0], bool) or not isinstance(present[0], (int, float)):
        return present[0]
    if key in SUM_METRICS:
        return sum(present)
    if key in MAX_METRICS or key == "step":
        return max(present)
    return sum(present) / len(present)


# ----------------------------------------------------------------------------------------------- checkpoints
def full_state_dict(model, dist: Dist) -> dict | None:
    """The whole model's weights on rank 0's CPU (a collective: every rank must call it); None elsewhere.

    Single process: the module's own state_dict.
    """
    if not dist.enabled:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.is_main else None


def save_pretrained(model, path, dist: Dist, **kwargs) -> None:
    """One consolidated Hugging Face folder written by rank 0 (loadable by plain `from_pretrained`). Learned probe
    scorers (--probe_scorer) go to their own file beside it (sparse_qwen.SCORER_FILE), which make_sparse loads."""
    from sparse_qwen import SCORER_FILE, split_probe_scorers
    state = full_state_dict(model, dist)
    if dist.is_main:
        rest, scorers = split_probe_scorers(state)
        if dist.enabled or scorers:
            model.save_pretrained(path, state_dict=rest, **kwargs)
        else:
            model.save_pretrained(path, **kwargs)  # single process, no scorer: exactly transformers' own save
        if scorers:
            from safetensors.torch import save_file
            save_file(scorers, os.path.join(path, SCORER_FILE))
    barrier(dist)


def optimizer_state(model, optimizer, dist: Dist) -> dict | None:
    """The full optimizer state keyed by parameter names (a collective); on rank 0, None elsewhere.

    The same format from 1 or W processes, so a run may resume on a different number of GPUs.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=dist.enabled))
    return state if dist.is_main else None


def load_optimizer_state(model, optimizer, state: dict, dist: Dist) -> None:
    """Load `optimizer_state`'s full state (every rank passes the same dict; each keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=dist.enabled))


__all__ = [
    "Dist", "SINGLE", "init_distributed", "shutdown", "barrier", "main_first", "broadcast", "block_modules",
    "shard_model", "gathered_weights", "rank_questions", "question_seed", "all_sum", "loss_weight",
    "clip_grad_norm", "reduce_metrics", "combine_metrics", "full_state_dict", "save_pretrained", "optimizer_state",
    "load_optimizer_state",
]
