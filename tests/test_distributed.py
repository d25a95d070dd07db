"""distributed.py: loss weighting against the global-batch loss, work split, metric reduction, and a real 2-process
gloo run (FSDP2 on CPU) checked against the unsharded model and against a single-process run.

The 2-process part launches this file with torchrun; `worker()` below is what each rank runs.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed
import grpo
from distributed import Dist

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- single process
def test_single_process_is_the_plain_path(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = distributed.init_distributed()
    assert (dist.rank, dist.world_size, dist.enabled, dist.is_main) == (0, 1, False, True)
    model = torch.nn.Linear(3, 2)
    weight = model.weight
    assert distributed.shard_model(model, dist) is model and model.weight is weight  # untouched, plain tensors
    with distributed.gathered_weights(model, dist):
        assert model.weight is weight
    assert distributed.rank_questions(3, dist) == range(3)
    assert distributed.all_sum(2.5, dist) == 2.5
    assert distributed.reduce_metrics({"reward": 0.5}, dist) == {"reward": 0.5}
    state = distributed.full_state_dict(model, dist)
    assert torch.equal(state["weight"], weight)


def test_init_distributed_names_the_missing_variable(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="RANK is not set: launch with torchrun"):
        distributed.init_distributed()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_questions_give_each_question_to_exactly_one_rank(world):
    questions = 4 * world
    ranges = [distributed.rank_questions(questions, Dist(rank=r, world_size=world)) for r in range(world)]
    assert [q for r in ranges for q in r] == list(range(questions))  # contiguous, disjoint, complete
    assert {len(r) for r in ranges} == {4}  # the same work on every rank


def test_rank_questions_refuses_an_uneven_split():
    with pytest.raises(ValueError, match="per_step_questions=3 must be a multiple of the 2 processes"):
        distributed.rank_questions(3, Dist(rank=0, world_size=2))


def test_question_seed_depends_on_step_and_position_only():
    seeds = {distributed.question_seed(step, q) for step in range(20) for q in range(8)}
    assert len(seeds) == 160  # distinct across steps and questions


# ----------------------------------------------------------------------------------------------- loss weighting
def _batch(generator, rows=12, steps=6):
    logp = -torch.rand(rows, steps, generator=generator)  # (B, T)
    ref = -torch.rand(rows, steps, generator=generator)
    adv = torch.randn(rows, generator=generator)
    lengths = torch.tensor([6, 1, 3, 6, 2, 5, 0, 4, 6, 1, 2, 3])  # ragged, one empty completion
    mask = (torch.arange(steps)[None] < lengths[:, None]).long()  # (B, T)
    return logp, ref, adv, mask


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_loss_weight_makes_the_rank_average_the_global_gradient(loss_type):
    """W = 3 ranks × 2 micro-batches (groups of 2 answers): FSDP's mean of the ranks' gradients of
    Σ_b w_b L_b equals the gradient of grpo_loss over the whole batch at once."""
    logp, ref, adv, mask = _batch(torch.Generator().manual_seed(0))
    kw = dict(beta=0.04, loss_type=loss_type, max_completion_length=6)
    whole = logp.clone().requires_grad_(True)
    grpo.grpo_loss(whole, None, ref, adv, mask, **kw)[0].backward()  # single process, global batch

    world, groups = 3, [slice(2 * g, 2 * g + 2) for g in range(6)]
    total = sum(distributed.loss_count(mask[g], loss_type) for g in groups)
    averaged, naive = torch.zeros_like(logp), torch.zeros_like(logp)
    for rank in range(world):
        split = logp.clone().requires_grad_(True)
        local = 0.0
        for g in groups[2 * rank: 2 * rank + 2]:
            loss = grpo.grpo_loss(split[g], None, ref[g], adv[g], mask[g], **kw)[0]
            local = local + distributed.loss_weight(distributed.loss_count(mask[g], loss_type), total,
                                                    Dist(rank=rank, world_size=world)) * loss
            naive += torch.autograd.grad(loss / 2, split, retain_graph=True)[0] / world  # plain mean of means
        local.backward()
        averaged += split.grad / world  # FSDP2 reduce-scatter: mean over ranks
    torch.testing.assert_close(averaged, whole.grad, rtol=1e-5, atol=1e-7)
    if loss_type in ("bnpo", "dapo"):  # token-normalised: unequal token counts make the naive mean wrong
        assert not torch.allclose(naive, whole.grad, atol=1e-4)


def test_combine_metrics_means_sums_and_maxes():
    per_rank = [{"step": 3, "reward": 1.0, "tokens_per_s": 10.0, "seconds": 2.0, "kl": None, "tag": "a",
                 "tau_by_keep_p": {"0.940": 0.5, "0.975": 0.9}},
                {"step": 3, "reward": 0.0, "tokens_per_s": 30.0, "seconds": 5.0, "kl": None, "tag": "a",
                 "tau_by_keep_p": {"0.940": 0.7}}]
    assert distributed.combine_metrics(per_rank) == {
        "step": 3, "reward": 0.5, "tokens_per_s": 40.0, "seconds": 5.0, "kl": None, "tag": "a",
        "tau_by_keep_p": {"0.940": 0.6, "0.975": 0.9}}


# ----------------------------------------------------------------------------------------------- 2 processes, gloo
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc, args, env_extra=None, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(Path(__file__).resolve()), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import toy
    return toy.build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def test_fsdp2_on_gloo_matches_the_unsharded_model(tiny_model_dir, tmp_path):
    proc = _torchrun(2, ["mechanics", str(tiny_model_dir), str(tmp_path)])
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["sharded_params"] and res["shard_fraction"] < 0.75  # each rank holds about half of every block
        assert res["logits_max_diff"] < 1e-5  # sharded forward == the unsharded model on the same inputs
        assert res["uneven_forwards"] == r + 2  # rank-dependent forward counts under gathered_weights: no hang
        assert res["resharded_after"]
        assert res["metrics"] == {"reward": 0.5, "tokens_per_s": 3.0, "seconds": 1.0, "step": 1}
    assert results[0]["state_dict_max_diff"] == 0.0 and results[0]["state_dict_keys_match"]  # rank 0: full copy
    assert results[1]["state_dict_is_none"]


def mechanics(model_dir, out_dir):
    """Per rank: shard, compare with the unsharded model, uneven forward counts, full state dict, metrics."""
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForImageTextToText
    dist = distributed.init_distributed()
    full = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = distributed.shard_model(AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32),
                                    dist).eval()
    layer = model.model.language_model.layers[0].mlp.up_proj.weight
    ids = torch.randint(10, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=torch.zeros_like(ids))
    with torch.no_grad():
        diff = (model(**inputs).logits - full(**inputs).logits).abs().max().item()
        with distributed.gathered_weights(model, dist):
            for _ in range(dist.rank + 2):  # rank 1 runs one more forward than rank 0
                model(**inputs)
    resharded = isinstance(model.model.language_model.layers[0].mlp.up_proj.weight, DTensor)
    state = distributed.full_state_dict(model, dist)
    reference = full.state_dict()
    result = {
        "sharded_params": isinstance(layer, DTensor),
        "shard_fraction": layer.to_local().numel() / layer.numel(),
        "logits_max_diff": diff, "uneven_forwards": dist.rank + 2, "resharded_after": resharded,
        "metrics": distributed.reduce_metrics({"reward": float(dist.rank), "tokens_per_s": 1.0 + dist.rank,
                                               "seconds": float(dist.rank), "step": 1}, dist),
        "state_dict_is_none": state is None,
    }
    if state is not None:
        result["state_dict_keys_match"] = set(state) == set(reference)
        result["state_dict_max_diff"] = max((state[k] - reference[k]).abs().max().item() for k in reference)
    Path(out_dir, f"rank{dist.rank}.json").write_text(json.dumps(result))
    distributed.shutdown(dist)


if __name__ == "__main__":  # run by torchrun from the tests above
    torch.set_num_threads(1)
    {"mechanics": mechanics}[sys.argv[1]](*sys.argv[2:])
