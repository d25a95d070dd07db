"""run_dir.py through train.train on a tiny random Qwen2.5-VL: checkpoints are atomic, --resume falls back past a torn
checkpoint and a torn metrics line, refuses what it cannot continue, and --overwrite_output_dir deletes only once
everything loaded (and never the model the run starts from).
"""
import shutil
from pathlib import Path

import pytest

from zipr1_support import run_dir
import toy
import train

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             vision_hidden_size=32, vision_depth=1, vision_heads=1)
TIMING_KEYS = ("tokens_per_s", "seconds")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_dir")
    model_dir = toy.build_tiny_model_dir(root / "model", seed=0, **SIZES)
    return model_dir, toy.write_toy_dataset(root / "data", 4, seed=3, kinds=("color", "video"))


def config(sources, out, **kw):
    base = dict(model=str(sources[0]), dataset=str(sources[1]), num_generations=4, per_step_questions=1,
                max_completion_length=3, learning_rate=1e-2, max_steps=3, save_steps=2, output_dir=str(out), disable_tqdm=True,
                max_frames=4, gate_efficiency=False, keep_p_grid=(0.9, 0.95))
    return train.check_config(train.Config(**{**base, **kw}))


@pytest.fixture(scope="module")
def finished(sources, tmp_path_factory):
    """A 3-step run (checkpoints 2 and 3) and its metrics; tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    return out, train.train(config(sources, out))


def copy_run(finished, tmp_path):
    return Path(shutil.copytree(finished[0], tmp_path / "run"))


def same_metrics(got, want):
    for key in want:
        if key not in TIMING_KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-5), key


def test_resume_falls_back_past_a_torn_checkpoint_and_a_torn_metrics_line(sources, finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    state = out / "checkpoint-3" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # killed while writing it
    (out / "checkpoint-4.tmp").mkdir()  # a save killed before its rename
    with open(out / "metrics.jsonl", "a") as log:
        log.write('{"step": 4, "reward": 0.')  # killed while logging
    resumed = train.train(config(sources, out, resume_from_checkpoint="last"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("resume:")]
    assert len(lines) == 1 and "checkpoint-3 is incomplete" in lines[0] and "checkpoint-3.incomplete" in lines[0]
    assert [m["step"] for m in resumed] == [1, 2, 3]
    same_metrics(resumed[2], finished[1][2])  # step 3 redone from checkpoint-2 equals the uninterrupted run
    assert run_dir.checkpoint_problem(out / "checkpoint-3") is None and not (out / "checkpoint-4.tmp").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_save_killed_midway_leaves_no_checkpoint(sources, tmp_path, monkeypatch):
    real_save = run_dir.torch.save

    def killed(obj, path):  # half the trainer state reaches the disk, then the process dies
        real_save(obj, path)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(run_dir.torch, "save", killed)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train.train(config(sources, out, max_steps=1))
    assert run_dir.checkpoints(out) == [] and (out / "checkpoint-1.tmp").is_dir()
    monkeypatch.setattr(run_dir.torch, "save", real_save)
    with pytest.raises(run_dir.ResumeError, match="1 logged steps but no complete checkpoint"):
        train.train(config(sources, out, max_steps=1, resume_from_checkpoint="last"))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # nothing deleted


def test_resume_with_nothing_to_resume_is_one_line_and_keeps_the_metrics(sources, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    argv = ["--model", str(sources[0]), "--dataset", str(sources[1]), "--output_dir", str(out), "--resume_from_checkpoint",
            "--disable_tqdm", "true", "--max_steps", "1", "--max_completion_length", "2", "--num_generations", "2"]
    with pytest.raises(SystemExit, match="--resume_from_checkpoint: output_dir .* holds 2 logged steps but no complete checkpoint"
                                         ".*--overwrite_output_dir") as err:
        train.main(argv)
    assert "\n" not in str(err.value.code)
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        train.main([*argv[:5], str(tmp_path / "empty"), *argv[6:]])


def test_resume_behind_the_checkpoint_is_one_line(sources, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    with pytest.raises(run_dir.ResumeError, match="checkpoint-3 is already past --max_steps 2: pass --max_steps larger "
                                                  "than 3"):
        train.train(config(sources, out, resume_from_checkpoint="last", max_steps=2))
    assert train.train(config(sources, out, resume_from_checkpoint="last")) == finished[1]  # --steps 3: nothing more to do


def test_overwrite_deletes_nothing_until_everything_loaded(sources, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    listing = sorted(p.name for p in out.iterdir())
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    failing = {"more questions than rows": dict(per_step_questions=5),
               "a model folder without weights": dict(model=str(tmp_path / "no-weights")),
               "a missing dataset": dict(dataset=str(tmp_path / "nope.jsonl")),
               "the model lies in the run it would clear": dict(model=str(out / "checkpoint-2"))}
    for case, change in failing.items():
        with pytest.raises((train.ConfigError, train.media.ModelNotAvailable, train.data.DatasetError)):
            train.train(config(sources, out, overwrite_output_dir=True, **change))
        assert sorted(p.name for p in out.iterdir()) == listing, case
    run_dir.record_bad_row(out, 2, "row 2: cannot read image x.png", 1)
    train.train(config(sources, out, overwrite_output_dir=True, max_steps=1))
    assert run_dir.checkpoints(out) == [out / "checkpoint-1"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert run_dir.read_bad_rows(out) == {2: "row 2: cannot read image x.png"}  # the data did not change: kept


def test_save_total_limit_keeps_the_newest(sources, tmp_path):
    out = tmp_path / "run"
    train.train(config(sources, out, max_steps=3, save_steps=1, save_total_limit=1))
    assert run_dir.checkpoints(out) == [out / "checkpoint-3"]
    with pytest.raises(train.ConfigError, match="save_total_limit must be >= 1"):
        config(sources, out, save_total_limit=0)


def test_metrics_reader_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "rew')
    assert run_dir.read_metrics(path) == [{"step": 1}, {"step": 2}]
    assert run_dir.read_metrics(path, up_to_step=1) == [{"step": 1}]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(run_dir.ResumeError, match="line 2 is not JSON"):
        run_dir.read_metrics(path)
