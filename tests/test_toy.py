"""toy.py: tokenizer/config agreement, save/load round trip, rendered answers checked from the pixels, the
Video-R1 JSONL round trip, and a short warm-up that lowers the answer loss."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

from zipr1_support import data
from zipr1_support import media
import rewards
import toy

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, vision_hidden_size=32, vision_depth=1, vision_heads=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return toy.build_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def test_tokenizer_ids_match_the_config(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config["video_token_id"] == tok.convert_tokens_to_ids("<|video_pad|>")
    assert config["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config["text_config"]["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert config["text_config"]["vocab_size"] == len(tok)
    ids = tok("<answer>B</answer><|im_end|>")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<answer>", "B", "</answer>", "<|im_end|>"]
    assert tok.decode(ids, skip_special_tokens=True) == "<answer>B</answer>"  # answer tags survive decoding
    for word in [*toy.COLORS, *toy.SHAPES, *toy.POSITIONS, "half", "square"]:
        assert len(tok(" " + word)["input_ids"]) == 1, word  # word-level for every toy word


def test_config_sizes_and_visual_tokens(model_dir):
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    text, vision = model.config.text_config, model.config.vision_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert (text.num_attention_heads, text.num_key_value_heads, vision.out_hidden_size) == (4, 2, text.hidden_size)
    assert 3e5 < sum(p.numel() for p in model.parameters()) < 2e6
    processor = media.load_processor(model_dir)
    row = toy.toy_examples(1, kinds=("color",))[0]
    inputs = media.encode_prompts(processor, [data.prompt_item(row)])
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]] and int((inputs["mm_token_type_ids"] == 1).sum()) == 64


def test_saved_model_gives_identical_logits(model_dir):
    torch.manual_seed(0)
    fresh = toy.Qwen2_5_VLForConditionalGeneration(toy.tiny_config(toy.build_tokenizer())).eval()
    loaded = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = media.load_processor(model_dir)
    rows = toy.toy_examples(2, seed=3, kinds=("shape", "video"))
    inputs = media.encode_prompts(processor, [data.prompt_item(r) for r in rows])
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, loaded(**inputs).logits)


def test_qwen2_vl_variant_runs(tmp_path):
    path = toy.build_tiny_model_dir(tmp_path, arch="qwen2_vl", **SMALL)
    model, processor = AutoModelForImageTextToText.from_pretrained(path), media.load_processor(path)
    assert model.config.model_type == "qwen2_vl"
    inputs = media.encode_prompts(processor, [data.prompt_item(r) for r in toy.toy_examples(2, kinds=("video",))])
    assert "second_per_grid_ts" not in inputs  # Qwen2-VL's processor has no temporal spacing
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
    with pytest.raises(ValueError, match="unknown size"):
        toy.build_tiny_model_dir(tmp_path / "bad", hidden=3)


def colored(image):
    """Mask of saturated pixels: background, noise and clutter are grey (r = g = b)."""
    rgb = np.asarray(image).astype(int)
    return rgb.max(-1) - rgb.min(-1) > 60  # (H, W)


def option(row, letter):
    return dict(o.split(". ", 1) for o in row["options"])[letter]


def answer(row):
    return rewards.extract_answer(row["solution"])


def test_answers_agree_with_the_pixels():
    rows = toy.toy_examples(60, seed=7)
    assert {r["kind"] for r in rows} == set(toy.KINDS)
    for row in rows:
        kind = row["kind"]
        if kind == "color":
            rgb = np.asarray(row["image"])[colored(row["image"])]
            color = option(row, answer(row))
            assert np.all(rgb == toy.COLORS[color]) and len(rgb) >= 30 * 30
        elif kind == "shape":
            ys, xs = np.nonzero(colored(row["image"]))
            fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # area / bounding box: 1, pi/4, 1/2
            assert option(row, answer(row)) == ("square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle")
        elif kind == "position":
            ys, xs = np.nonzero(colored(row["image"]))
            dy, dx = ys.mean() - 111.5, xs.mean() - 111.5
            side = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("bottom" if dy > 0 else "top")
            assert option(row, answer(row)) == side
        elif kind == "count":
            mask = colored(row["image"])
            cells = sum(mask[75 * r:75 * r + 75, 75 * c:75 * c + 75].any() for r in range(3) for c in range(3))
            assert row["problem_type"] == "numerical" and row["options"] == [] and answer(row) == str(cells)
        else:
            shown = [i for i, frame in enumerate(row["video"]) if colored(frame).any()]
            assert len(shown) == 2 and shown[1] == shown[0] + 1 and 4 <= len(row["video"]) <= 8
            half = "first half" if shown[1] < len(row["video"]) // 2 else "second half"
            assert option(row, answer(row)) == half and row["data_type"] == "video"


def test_toy_dataset_jsonl_round_trip(tmp_path):
    jsonl = toy.write_toy_dataset(tmp_path, n=10, seed=5)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    originals = toy.toy_examples(10, seed=5)
    assert len(rows) == 10
    for row, original in zip(rows, originals):
        for key in ("problem", "options", "solution", "problem_type", "data_type"):
            assert row[key] == original[key]
        if row["data_type"] == "image":
            assert np.array_equal(np.asarray(media.load_image(tmp_path / row["path"])), np.asarray(original["image"]))
        else:
            frames, fps = media.load_video(tmp_path / row["path"])
            assert fps == toy.VIDEO_FPS and len(frames) == len(original["video"])
            assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, original["video"]))


def test_answer_batch_labels_only_the_completion(model_dir):
    processor = media.load_processor(model_dir)
    rows = toy.toy_examples(3, seed=1, kinds=("color", "count", "video"))
    inputs, labels = toy.answer_batch(processor, rows)
    for i, row in enumerate(rows):
        labelled = labels[i][labels[i] != -100]
        assert processor.tokenizer.decode(labelled) == row["solution"] + "<|im_end|>"
        assert torch.equal(labelled, inputs["input_ids"][i, -len(labelled):])


def test_short_warm_up_lowers_the_answer_loss(tmp_path):
    path = toy.build_tiny_model_dir(tmp_path, **SMALL)
    model, processor = AutoModelForImageTextToText.from_pretrained(path), media.load_processor(path)
    losses = toy.train_answers(model, processor, steps=12, batch_size=4, lr=1e-2, kinds=("color",), progress=False)
    assert np.mean(losses[-3:]) < 0.6 * losses[0]


def test_ensure_toy_model_caches_by_settings(tmp_path):
    first = toy.ensure_toy_model(tmp_path / "m", steps=1, batch_size=2, progress=False, eval_per_kind=2, **SMALL)
    weights = (first / "model.safetensors").stat().st_mtime_ns
    again = toy.ensure_toy_model(tmp_path / "m", steps=1, batch_size=2, progress=False, eval_per_kind=2, **SMALL)
    assert again == first
    assert (first / "model.safetensors").stat().st_mtime_ns == weights  # not rebuilt
    marker = json.loads((first / "toy_settings.json").read_text())
    assert marker["settings"]["steps"] == 1 and marker["settings"]["sizes"]["hidden_size"] == 32
    assert set(marker["accuracy"]) == set(toy.KINDS) and marker["machine"] == toy.machine_description()
    toy.ensure_toy_model(tmp_path / "m", steps=2, batch_size=2, progress=False, eval_per_kind=2, **SMALL)
    assert json.loads((first / "toy_settings.json").read_text())["settings"]["steps"] == 2


def test_the_default_warm_up_is_the_shipped_model_and_nothing_is_built(tmp_path, monkeypatch):
    """The default settings resolve to the repository's toy_model/ (the same weights on every machine): no warm-up
    runs and the cache folder is not touched. use_shipped=False rebuilds on this machine instead."""
    assert toy.built_with(toy.SHIPPED_MODEL, toy.warmup_settings())  # re-ship toy_model/ when a default changes
    monkeypatch.setattr(toy, "train_answers", lambda *a, **k: pytest.fail("the default warm-up must not be rebuilt"))
    assert toy.ensure_toy_model(tmp_path / "cache") == toy.SHIPPED_MODEL and not (tmp_path / "cache").exists()
    with pytest.raises(pytest.fail.Exception, match="must not be rebuilt"):
        toy.ensure_toy_model(tmp_path / "cache", progress=False, use_shipped=False)


def test_the_shipped_model_answers_as_its_marker_records():
    """toy_model/ holds the warmed-up weights its marker describes: greedy accuracy per kind on the marker's
    questions matches the recorded one (up to 2 of 50 answers a kind that another CPU's rounding may flip)."""
    marker = json.loads((toy.SHIPPED_MODEL / "toy_settings.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(toy.SHIPPED_MODEL).eval()
    with toy.cpu_threads(1):
        accuracy = toy.toy_accuracy(model, media.load_processor(toy.SHIPPED_MODEL), n_per_kind=50)
    assert accuracy.keys() == marker["accuracy"].keys()
    assert all(abs(accuracy[k] - marker["accuracy"][k]) <= 2 / 50 + 1e-9 for k in accuracy), (accuracy, marker)
    assert sum(accuracy.values()) / len(accuracy) > 0.8  # a warmed-up model, not an initialisation


def test_toy_dataset_built_by_two_processes_at_once(tmp_path, monkeypatch):
    """Two runs started together both build the RL data: another process starts, writes and finishes while this one
    is writing. Neither may write into or delete the other's files (the bug: a shared `.building` folder, so the
    second builder deleted the first one's half-written images); the first to finish wins, the other drops its copy."""
    folder = tmp_path / "toy-data"
    examples = toy.toy_examples

    def examples_while_another_process_builds(n, seed=0, kinds=toy.KINDS):
        rows = examples(n, seed, kinds)
        yield from rows[:3]  # this process has written 3 rows when the other one starts, builds and finishes
        subprocess.run([sys.executable, "-c", f"import toy; toy.ensure_toy_dataset({str(folder)!r}, {n}, {seed})"],
                       cwd=Path(toy.__file__).parent, check=True, capture_output=True)
        yield from rows[3:]

    monkeypatch.setattr(toy, "toy_examples", examples_while_another_process_builds)
    jsonl = toy.ensure_toy_dataset(folder, 6, seed=5)
    assert jsonl == folder / "toy.jsonl"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy-data"]  # no build folder left by either process
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["problem"] for r in rows] == [r["problem"] for r in examples(6, seed=5)]
    assert all((folder / r["path"]).is_file() for r in rows)
    monkeypatch.setattr(toy, "toy_examples", None)  # a built folder is reused without writing anything
    assert toy.ensure_toy_dataset(folder, 6, seed=5) == jsonl
