"""multi_gpu.py: loss weighting against the global-batch loss, work split, metric reduction, and a real 2-process
gloo run (FSDP2 on CPU) checked against the unsharded model and against a single-process run.

The 2-process part launches this file with torchrun; `worker()` below is what each rank runs.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zipr1_support import multi_gpu
import grpo
from zipr1_support.multi_gpu import Dist

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- single process
def test_single_process_is_the_plain_path(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = multi_gpu.init_distributed()
    assert (dist.rank, dist.world_size, dist.enabled, dist.is_main) == (0, 1, False, True)
    model = torch.nn.Linear(3, 2)
    weight = model.weight
    assert multi_gpu.shard_model(model, dist) is model and model.weight is weight  # untouched, plain tensors
    with multi_gpu.gathered_weights(model, dist):
        assert model.weight is weight
    assert multi_gpu.rank_questions(3, dist) == range(3)
    assert multi_gpu.all_sum(2.5, dist) == 2.5
    assert multi_gpu.reduce_metrics({"reward": 0.5}, dist) == {"reward": 0.5}
    state = multi_gpu.full_state_dict(model, dist)
    assert torch.equal(state["weight"], weight)


def test_init_distributed_names_the_missing_variable(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="RANK is not set: launch with torchrun"):
        multi_gpu.init_distributed()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_questions_give_each_question_to_exactly_one_rank(world):
    questions = 4 * world
    ranges = [multi_gpu.rank_questions(questions, Dist(rank=r, world_size=world)) for r in range(world)]
    assert [q for r in ranges for q in r] == list(range(questions))  # contiguous, disjoint, complete
    assert {len(r) for r in ranges} == {4}  # the same work on every rank


def test_rank_questions_refuses_an_uneven_split():
    with pytest.raises(ValueError, match="per_step_questions=3 must be a multiple of the 2 processes"):
        multi_gpu.rank_questions(3, Dist(rank=0, world_size=2))


def test_question_seed_depends_on_step_and_position_only():
    seeds = {multi_gpu.question_seed(step, q) for step in range(20) for q in range(8)}
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
    total = sum(grpo.loss_normalizer(mask[g], loss_type, 6) for g in groups)
    averaged, naive = torch.zeros_like(logp), torch.zeros_like(logp)
    for rank in range(world):
        split = logp.clone().requires_grad_(True)
        local = 0.0
        for g in groups[2 * rank: 2 * rank + 2]:
            loss = grpo.grpo_loss(split[g], None, ref[g], adv[g], mask[g], **kw)[0]
            local = local + multi_gpu.loss_weight(grpo.loss_normalizer(mask[g], loss_type, 6), total,
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
    assert multi_gpu.combine_metrics(per_rank) == {
        "step": 3, "reward": 0.5, "tokens_per_s": 40.0, "seconds": 5.0, "kl": None, "tag": "a",
        "tau_by_keep_p": {"0.940": 0.6, "0.975": 0.9}}


# ----------------------------------------------------------------------------------------------- 2 processes, gloo
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             vision_hidden_size=32, vision_depth=1, vision_heads=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(model_dir, jsonl, out_dir) -> list[str]:
    """A deterministic 2-step run: 2 questions × 4 answers per step, sharded reference (beta > 0), checkpointing,
    clipping active (‖g‖ > max_grad_norm = 1), v1 reward so the untrained model still gets nonzero advantages,
    the relaxed-τ̃ sparsity term on (its per-row weighting across ranks), and a learned probe scorer (a parameter
    FSDP2 shards with its layer, saved to its own file)."""
    return ["--model", str(model_dir), "--dataset", str(jsonl), "--output_dir", str(out_dir), "--max_steps", "2",
            "--save_steps", "1", "--per_step_questions", "2", "--num_generations", "4", "--max_completion_length", "4",
            "--learning_rate", "1e-2", "--gate_efficiency", "false", "--gradient_checkpointing", "true",
            "--max_frames", "4", "--disable_tqdm", "true", "--sparsity_coef", "1.0", "--sparsity_temperature", "0.05",
            "--selection_straight_through", "1.0", "--probe_scorer", "true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One torchrun launch of 2 gloo processes (this file's worker: FSDP checks, then train.py's main), and the
    same training in this process alone, run while the launch is under way."""
    import toy
    import train
    root = tmp_path_factory.mktemp("dist")
    model_dir = toy.build_tiny_model_dir(root / "model", **SIZES)
    jsonl = toy.write_toy_dataset(root / "data", 4, seed=3, kinds=("color", "video"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", __file__, str(model_dir), str(root / "checks"),
           *train_args(model_dir, jsonl, root / "two")]
    (root / "checks").mkdir()
    launch = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    one = train.train(train.parse_config(train_args(model_dir, jsonl, root / "one")))
    log, _ = launch.communicate(timeout=300)
    assert launch.returncode == 0, log[-5000:]
    return {"root": root, "one": one, "model_dir": model_dir, "jsonl": jsonl, "log": log}


def weights(path):
    from safetensors.torch import load_file
    return load_file(str(Path(path) / "model.safetensors"))


def scorers(path):
    from safetensors.torch import load_file
    import sparse_qwen
    return load_file(str(Path(path) / sparse_qwen.SCORER_FILE))


def test_two_processes_make_the_same_update_as_one(runs):
    root = runs["root"]
    initial = weights(runs["model_dir"])
    for step in (1, 2):
        one, two = weights(root / "one" / f"checkpoint-{step}"), weights(root / "two" / f"checkpoint-{step}")
        assert one.keys() == two.keys() == initial.keys()  # one consolidated HF checkpoint, the same tensors
        moved = max((one[k] - initial[k]).abs().max().item() for k in one)
        assert moved > 1e-3  # the step really changed the policy
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
        one, two = (scorers(root / run / f"checkpoint-{step}") for run in ("one", "two"))
        assert one.keys() == {"layers.0", "layers.1"} and all(w.abs().max() > 0 for w in one.values())  # trained
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    logged = [json.loads(line) for line in (root / "two" / "metrics.jsonl").read_text().splitlines()]
    for mine, alone in zip(logged, runs["one"]):  # rank-averaged metrics == the single process's global ones
        for key in ("reward", "accuracy", "tau", "r_eff", "completion_length", "loss", "kl", "grad_norm",
                    "tau_relaxed", "sparsity_loss"):
            assert mine[key] == pytest.approx(alone[key], rel=1e-4, abs=1e-6), key
    assert logged[0]["grad_norm"] > 1.0  # clipping was active, so the global norm had to be right


def test_a_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    import train
    shutil.copytree(runs["root"] / "two", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoint-2")
    cfg = train.parse_config(train_args(runs["model_dir"], runs["jsonl"], tmp_path / "run") + ["--resume_from_checkpoint"])
    resumed = train.train(cfg)
    assert resumed[1]["loss"] == pytest.approx(runs["one"][1]["loss"], rel=1e-4)
    one, again = weights(runs["root"] / "one" / "checkpoint-2"), weights(tmp_path / "run" / "checkpoint-2")
    for name in one:  # step 2 from the consolidated weights + AdamW state == the uninterrupted run
        torch.testing.assert_close(again[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    one, again = scorers(runs["root"] / "one" / "checkpoint-2"), scorers(tmp_path / "run" / "checkpoint-2")
    for name in one:  # the probe scorers and their AdamW state too
        torch.testing.assert_close(again[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp2_on_gloo_matches_the_unsharded_model(runs):
    results = [json.loads((runs["root"] / "checks" / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["sharded_params"] and res["shard_fraction"] < 0.75  # each rank holds about half of every block
        assert res["logits_max_diff"] < 1e-5  # sharded forward == the unsharded model on the same inputs
        assert res["uneven_forwards"] == r + 2  # rank-dependent forward counts under gathered_weights: no hang
        assert res["resharded_after"]
        assert res["metrics"] == {"reward": 0.5, "tokens_per_s": 3.0, "seconds": 1.0, "step": 1}
    assert results[0]["state_dict_max_diff"] == 0.0 and results[0]["state_dict_keys_match"]  # rank 0: full copy
    assert results[1]["state_dict_is_none"]


def test_uneven_question_split_is_a_config_error(monkeypatch):
    import train
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: checked before any process group is joined
    with pytest.raises(train.ConfigError, match="per_step_questions=3 must be a multiple of the 2 processes"):
        train.parse_config(["--model", "some/model", "--per_step_questions", "3"])
    assert train.parse_config(["--model", "some/model", "--per_step_questions", "4"]).per_step_questions == 4


def mechanics(model_dir, out_dir):
    """Per rank: shard, compare with the unsharded model, uneven forward counts, full state dict, metrics."""
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForImageTextToText
    dist = multi_gpu.init_distributed()
    full = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = multi_gpu.shard_model(AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32),
                                    dist).eval()
    layer = model.model.language_model.layers[0].mlp.up_proj.weight
    ids = torch.randint(10, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=torch.zeros_like(ids))
    with torch.no_grad():
        diff = (model(**inputs).logits - full(**inputs).logits).abs().max().item()
        with multi_gpu.gathered_weights(model, dist):
            for _ in range(dist.rank + 2):  # rank 1 runs one more forward than rank 0
                model(**inputs)
    resharded = isinstance(model.model.language_model.layers[0].mlp.up_proj.weight, DTensor)
    state = multi_gpu.full_state_dict(model, dist)
    reference = full.state_dict()
    result = {
        "sharded_params": isinstance(layer, DTensor),
        "shard_fraction": layer.to_local().numel() / layer.numel(),
        "logits_max_diff": diff, "uneven_forwards": dist.rank + 2, "resharded_after": resharded,
        "metrics": multi_gpu.reduce_metrics({"reward": float(dist.rank), "tokens_per_s": 1.0 + dist.rank,
                                               "seconds": float(dist.rank), "step": 1}, dist),
        "state_dict_is_none": state is None,
    }
    if state is not None:
        result["state_dict_keys_match"] = set(state) == set(reference)
        result["state_dict_max_diff"] = max((state[k] - reference[k]).abs().max().item() for k in reference)
    Path(out_dir, f"rank{dist.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":  # each torchrun rank: FSDP checks, then `train.py <args>` exactly as the command line
    torch.set_num_threads(1)
    mechanics(sys.argv[1], sys.argv[2])
    import train
    train.main(sys.argv[3:])
