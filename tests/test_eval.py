"""eval.py and the lmms-eval adapter on a tiny random Qwen2.5-VL and a few toy questions (image and video).

Checks: metrics from hand-written answers with known truth; at keep_p = 1 ZipVL answers exactly as Full, with τ = 1
and the same KV bytes (Full's = Σ_j ℓ·2·Hkv·d·bytes by hand); eval's answers are HF generate's (Full) and
rollout.generate's (ZipVL); eval.py does not import train.py; visual token layout against transformers' own mRoPE
and vision position ids; the darkening of dropped tokens; an end-to-end run writes the table, JSON and non-blank
pictures; bad input is one clear error. Adapter: lmms-eval-style requests (a fake Instance) answered as
rollout.generate answers hand-built prompts, `until` cutting, batching in order, loglikelihood against a stock dense
forward, and the lmms subclass with a stand-in lmms_eval package.
"""
import ast
import importlib
import io
import json
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText
from transformers.vision_utils import get_vision_position_ids

from zipr1_support import data
import eval as ev
from zipr1_support import media
from zipr1_support import run_dir
import toy
import train
from lmms_eval_zipr1 import engine
from zipr1_support.pictures import dim_dropped, kept_token_picture, visual_token_grid
from rollout import SamplingConfig, generate
from sparse_qwen import make_sparse

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             vision_hidden_size=32, vision_depth=1, vision_heads=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, jsonl of 4 toy rows: image, image, video, image, processor, encoded batch of all 4)."""
    root = tmp_path_factory.mktemp("eval")
    model_dir = toy.build_tiny_model_dir(root / "model", seed=0, **SIZES)
    jsonl = toy.write_toy_dataset(root / "data", 4, seed=5, kinds=("color", "count", "video", "position"))
    rows = data.load_dataset_rows(str(jsonl)).rows
    processor = media.load_processor(model_dir)
    inputs = media.encode_prompts(processor, [data.prompt_item(r, 4) for r in rows])
    return SimpleNamespace(dir=model_dir, jsonl=jsonl, rows=rows, processor=processor, inputs=inputs)


def test_metrics_on_answers_with_known_truth():
    rows = [dict(row=0, solution="<answer>B</answer>", problem_type="multiple choice"),
            dict(row=1, solution="<answer>3</answer>", problem_type="numerical"),
            dict(row=2, solution="<answer>A</answer>", problem_type="multiple choice"),
            dict(row=3, solution="<answer>red</answer>", problem_type="free-form")]
    answers = ["<answer>B</answer>", "<answer>4</answer>", "<answer>A</answer><answer>B</answer>",
               "<answer>Red.</answer>"]
    batch = lambda prefill, decode, tokens: dict(prefill_s=prefill, decode_s=decode, decode_tokens=tokens)  # noqa
    full = ev.summarize(ev.score(rows, answers, [1.0] * 4, [400] * 4),
                        [batch(0.2, 2.0, 100), batch(0.3, 1.0, 40), batch(0.1, 1.0, 60)], None)
    sparse = ev.summarize(ev.score(rows, answers[:1] + ["<answer>3</answer>"] + answers[2:], [0.5, 0.25, 0.75, 0.5],
                                   [200, 100, 300, 200]), [batch(0.1, 1.0, 150), batch(9.0, 9.0, 9),
                                                           batch(0.05, 0.5, 60)], 0.9)
    methods = ev.add_ratios({"Full": full, "ZipVL": sparse, "ZipR1": {"status": ev.NOT_TRAINED}})
    assert [r["correct"] for r in full["records"]] == [1.0, 0.0, 0.0, 1.0]  # hedged double answer scores 0
    assert full["accuracy"] == 0.5 and sparse["accuracy"] == 0.75
    assert sparse["token_ratio"] == 0.5 and sparse["kv_bytes"] == 200 and sparse["kv_vs_full"] == 0.5
    assert full["prefill_ms"] == pytest.approx(200) and sparse["prefill_ms"] == pytest.approx(100)  # medians
    assert full["decode_tokens_per_s"] == 50 and sparse["decode_tokens_per_s"] == 120  # of 50, 40, 60 / 150, 1, 120
    assert sparse["prefill_speedup"] == pytest.approx(2.0)  # median of 0.2/0.1, 0.3/9, 0.1/0.05 (batch by batch)
    assert sparse["decode_speedup"] == pytest.approx(2.0)  # median of 150/50, 1/40, 120/60
    table = ev.markdown_table(methods, batch_size=2).splitlines()
    assert len(table) == 5 and "| ZipVL | 0.9 | 0.750 | 0.500 | 0.2 KiB | 0.500 | 100.0 | 2.00× | 120.0 | 2.00× |" \
        in table[3]
    assert ev.NOT_TRAINED in table[4] and all(line.count("|") == 11 for line in table)


def hf_greedy_texts(tiny, inputs, max_new_tokens):
    """Transformers' own greedy `generate` on the stock model (placeholder tokens suppressed, as rollout.py does)."""
    stock = AutoModelForImageTextToText.from_pretrained(tiny.dir, attn_implementation="sdpa").eval()
    placeholders = [stock.config.image_token_id, stock.config.video_token_id]
    with torch.no_grad():
        out = stock.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, suppress_tokens=placeholders)
    return tiny.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_keep_p_one_answers_exactly_as_full(tiny):
    model = ev.load_model(tiny.dir, "cpu", torch.float32, sparse=False)
    full = ev.greedy(model, tiny.inputs, None, max_new_tokens=4)
    cfg = model.config.text_config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    by_hand = tiny.inputs["attention_mask"].sum(-1) * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4
    assert torch.equal(full.kv_bytes, by_hand)  # Σ_j ℓ·2·Hkv·d·bytes, fp32
    sparse = ev.greedy(model, tiny.inputs, 1.0, max_new_tokens=4)
    assert torch.equal(sparse.completion_ids, full.completion_ids)
    assert torch.equal(sparse.token_ratio, torch.ones(4)) and torch.equal(sparse.kv_bytes, full.kv_bytes)
    assert torch.equal(full.token_ratio, torch.ones(4)) and torch.equal(sparse.selection, full.selection)
    texts = tiny.processor.batch_decode(full.completion_ids, skip_special_tokens=True)
    records = [ev.score(tiny.rows, texts, o.token_ratio.tolist(), o.kv_bytes.tolist()) for o in (full, sparse)]
    assert records[0] == records[1]


def test_eval_greedy_answers_equal_rollout_generate_and_hf_generate(tiny):
    """evaluate_methods' answers: Full's are transformers' greedy `generate`, ZipVL's rollout.generate's (greedy, same
    probe seed); τ, KV bytes and the decode token count are those of the same rollouts."""
    model = ev.load_model(tiny.dir, "cpu", torch.float32, sparse=True)
    methods = ev.evaluate_methods({"Full": (model, None), "ZipVL": (model, 0.6)}, tiny.processor, [tiny.rows],
                                  [tiny.inputs], max_new_tokens=5, seed=3, warmup=False)
    ref = generate(make_sparse(model), tiny.inputs, 0.6, SamplingConfig(max_new_tokens=5, do_sample=False), seed=3)
    zipvl = methods["ZipVL"]
    assert [r["completion"] for r in zipvl["records"]] == tiny.processor.batch_decode(ref.completion_ids,
                                                                                      skip_special_tokens=True)
    assert [r["tau"] for r in zipvl["records"]] == ref.token_ratio.tolist() and zipvl["token_ratio"] < 1
    assert [r["kv_bytes"] for r in zipvl["records"]] == ref.kv_bytes.tolist()
    assert zipvl["timings"][0]["decode_tokens"] == 4 * (ref.completion_ids.shape[1] - 1)
    assert [r["completion"] for r in methods["Full"]["records"]] == hf_greedy_texts(tiny, tiny.inputs, 5)
    assert methods["Full"]["token_ratio"] == 1.0


@pytest.mark.parametrize("index", [1, 2])  # an image row, a video row
def test_visual_token_grid_matches_transformers_positions(tiny, index):
    model = ev.load_model(tiny.dir, "cpu", torch.float32, sparse=False)
    inputs = media.encode_prompts(tiny.processor, [data.prompt_item(tiny.rows[index], 4)])
    video = tiny.rows[index]["data_type"] == "video"
    grid = inputs["video_grid_thw" if video else "image_grid_thw"]
    token_id = model.config.video_token_id if video else model.config.image_token_id
    positions, (t, gh, gw) = visual_token_grid(inputs["input_ids"][0], grid, token_id, 2)
    assert (t, gh, gw) == (2 if video else 1, grid[0, 1] // 2, grid[0, 2] // 2) and len(positions) == t * gh * gw
    rope, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs.get(
        "image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"), second_per_grid_ts=inputs.get(
        "second_per_grid_ts"), attention_mask=inputs["attention_mask"])
    at = rope[:, 0, positions]  # (3, t·gh·gw): the decoder's (t, h, w) ids of each visual token
    slot, row, col = np.unravel_index(np.arange(t * gh * gw), (t, gh, gw))
    assert torch.equal(at[1] - at[1].min(), torch.tensor(row)) and torch.equal(at[2] - at[2].min(), torch.tensor(col))
    assert torch.equal(torch.unique(at[0], return_inverse=True)[1], torch.tensor(slot))
    patch_hw = get_vision_position_ids(grid, 2).view(-1, 4, 2)[:, 0] // 2  # vision tower: first patch of each token
    assert torch.equal(patch_hw, torch.tensor(np.stack([row, col], 1)))


def test_dim_dropped_darkens_exactly_the_dropped_cells():
    image = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    kept = np.array([[True, False, True], [False, True, False]])
    out = dim_dropped(image, kept, cell=3)
    for r in range(2):
        for c in range(3):
            block, got = image[3 * r:3 * r + 3, 3 * c:3 * c + 3], out[3 * r:3 * r + 3, 3 * c:3 * c + 3]
            assert np.array_equal(got, block if kept[r, c] else (block * 0.25).astype(np.uint8))


def png(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def other_vocabulary_checkpoint(tiny, path):
    """A copy of the tiny model whose config claims one more token (as a checkpoint of another base would)."""
    shutil.copytree(tiny.dir, path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["vocab_size"] += 1
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_eval_does_not_import_train():
    """eval.py reads its defaults from toy.py and run_dir.py; train.py's default folder is run_dir's."""
    tree = ast.parse(Path(ev.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "train" not in imported and {"toy", "zipr1_support.run_dir"} <= imported
    assert train.Config.output_dir == run_dir.DEFAULT_OUTPUT_DIR and train.parse_config([]).max_steps == toy.TOY_PRESET["max_steps"]


def test_zipr1_checkpoint_discovery(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ev.parse_args(["--model", str(tiny.dir)])
    assert ev.zipr1_checkpoint(args) is None  # nothing under train.py's default folder
    assert ev.matching_checkpoint(None, tiny.dir, explicit=False) == (None, ev.NOT_TRAINED)
    for step in (3, 12):
        shutil.copytree(tiny.dir, tmp_path / train.Config.output_dir / f"checkpoint-{step}")
    assert ev.zipr1_checkpoint(args) == Path(train.Config.output_dir) / "checkpoint-12"  # the newest step
    assert ev.matching_checkpoint(tiny.dir, tiny.dir, explicit=False) == (tiny.dir, "")
    other = other_vocabulary_checkpoint(tiny, tmp_path / "other")
    assert "rerun `python train.py`" in ev.matching_checkpoint(other, tiny.dir, explicit=False)[1]


def test_end_to_end_run_writes_table_json_and_pictures(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # train.py's default run folder is empty here: ZipR1 "not trained yet"
    results = ev.main(["--model", str(tiny.dir), "--dataset", str(tiny.jsonl), "--sweep", "0.5,1", "--keep-p", "0.9",
                       "--max-new-tokens", "2", "--max-frames", "4", "--batch-size", "3", "--out", "out"])
    assert results["methods"]["ZipR1"] == {"status": ev.NOT_TRAINED}
    assert json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["ZipVL"]["questions"] == 4
    assert "| Full | — |" in (tmp_path / "out" / "results.md").read_text()
    assert [p["keep_p"] for p in results["sweep"]["ZipVL"]] == [0.5, 1.0] and results["sweep"]["ZipVL"][1][
        "token_ratio"] == 1.0
    for key in ("pareto", "kept_ZipVL_image", "kept_ZipVL_video"):
        pixels = png(results["files"][key])
        assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100, key  # not blank
    blue = png(results["files"]["pareto"])
    assert ((abs(blue - [31, 119, 180]).sum(-1)) < 30).sum() > 50  # the ZipVL line is drawn (matplotlib's C0)


def test_kept_token_picture_returns_the_layers_selection(tiny, tmp_path):
    model = ev.load_model(tiny.dir, "cpu", torch.float32, sparse=True)
    kept = kept_token_picture(model, tiny.processor, tiny.rows[2], 0.3, tmp_path / "v.png", "video", max_frames=4)
    inputs = media.encode_prompts(tiny.processor, [data.prompt_item(tiny.rows[2], 4)])
    ref = generate(model, inputs, 0.3, SamplingConfig(max_new_tokens=1, do_sample=False))
    visual = inputs["input_ids"][0] == model.config.video_token_id
    _, h, w = inputs["video_grid_thw"][0].tolist()
    assert kept.shape == (2, 2, h // 2, w // 2)  # (layers, 4 frames / temporal patch 2, rows, columns)
    assert np.array_equal(kept.reshape(2, -1), ref.selection[0][:, visual].numpy())
    assert not kept.all()  # at keep_p 0.3 some visual tokens are dropped


@pytest.mark.parametrize("argv, message", [
    (["--keep-p", "0"], "keep_p must lie in"), (["--keep-p", "1.5"], "keep_p must lie in"),
    (["--sweep", "0.9,2"], "keep_p must lie in"), (["--zipr1", "no/such/checkpoint"], "no/such/checkpoint"),
    (["--zipr1", "TMP"], "holds no config.json"), (["--zipr1", "OTHER"], "was not trained from"),
    (["--dataset", "EMPTY"], "empty.jsonl is empty"), (["--dataset", "BLANK"], "blank.jsonl"),
    (["--dataset", "missing.jsonl"], "not found")])
def test_bad_input_is_one_clear_error(tiny, tmp_path, argv, message):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("[]\n")
    other = other_vocabulary_checkpoint(tiny, tmp_path / "other")
    argv = [str(tmp_path / f"{a.lower()}.jsonl") if a in ("EMPTY", "BLANK") else str(tmp_path) if a == "TMP" else
            str(other) if a == "OTHER" else a for a in argv]
    with pytest.raises(SystemExit) as err:
        ev.main(["--model", str(tiny.dir), "--out", str(tmp_path / "out"), *argv])
    assert str(err.value).startswith("eval.py: error:") and message in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_of_another_architecture_is_one_line(tiny, tmp_path):
    """Same vocabulary, other decoder: before, only vocabularies were compared and it was scored as ZipR1."""
    for change, words in ((dict(num_hidden_layers=1), "num_hidden_layers 1 vs 2"),
                          (dict(num_key_value_heads=2), "num_key_value_heads 2 vs 1")):
        other = toy.build_tiny_model_dir(tmp_path / str(change), seed=0, **{**SIZES, **change})
        with pytest.raises(SystemExit) as err:
            ev.main(["--model", str(tiny.dir), "--zipr1", str(other), "--dataset", str(tiny.jsonl), "--limit", "1",
                     "--sweep", "", "--max-new-tokens", "2", "--out", str(tmp_path / "out")])
        message = str(err.value)
        assert "was not trained from" in message and words in message and "\n" not in message
    vocab = json.loads((tiny.dir / "config.json").read_text())["text_config"]["vocab_size"]
    assert ev.text_architecture(tiny.dir) == {"model_type": "qwen2_5_vl", "num_hidden_layers": 2,
                                              "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 32,
                                              "vocab_size": vocab}


def test_skip_bad_rows_skips_corrupt_media(tiny, tmp_path):
    folder = Path(shutil.copytree(tiny.jsonl.parent, tmp_path / "data"))
    rows = [json.loads(line) for line in (folder / "toy.jsonl").read_text().splitlines()]
    png_bytes = (folder / rows[0]["path"]).read_bytes()
    (folder / rows[0]["path"]).write_bytes(png_bytes[:40] + b"\xff" * 8 + png_bytes[48:])  # fails the load-time check
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (folder / rows[3]["path"]).write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])  # fails only when read
    argv = ["--model", str(tiny.dir), "--dataset", str(folder / "toy.jsonl"), "--sweep", "", "--max-new-tokens", "2",
            "--max-frames", "4", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="row 0: cannot read image"):
        ev.main(argv)
    results = ev.main(argv + ["--skip-bad-rows"])
    assert [r["row"] for r in results["methods"]["Full"]["records"]] == [1, 2]


# ------------------------------------------------------------------------------------------ lmms-eval adapter
class FakeInstance:
    """What the adapter reads from lmms-eval's Instance: the request payload in .args."""

    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def lmms(tiny, tmp_path_factory):
    """Documents of a task "toy"/"test" (two images, one .npy video), and requests for them."""
    frames, fps = media.load_video(tiny.rows[2]["media_path"], max_frames=4)
    video = tmp_path_factory.mktemp("lmms") / "clip.npy"
    np.save(video, np.stack([np.asarray(f) for f in frames]))
    docs = [{"visual": media.load_image(tiny.rows[0]["media_path"])}, {"visual": str(video)},
            {"visual": media.load_image(tiny.rows[3]["media_path"])}]
    to_visual = lambda doc: [doc["visual"]]  # noqa: E731
    greedy3, greedy2 = {"max_new_tokens": 3, "temperature": 0, "until": ["\n\n"]}, {"max_new_tokens": 2}
    requests = [FakeInstance("<image>What color is the square?", greedy3, to_visual, 0, "toy", "test"),
                FakeInstance("When does the square appear?", greedy3, to_visual, 1, "toy", "test"),
                FakeInstance("Where is the square?", greedy2, to_visual, 2, "toy", "test")]
    return SimpleNamespace(task_dict={"toy": {"test": docs}}, requests=requests, frames=frames, fps=fps)


def test_adapter_answers_as_rollout_generate_on_hand_built_prompts(tiny, lmms):
    eng = engine.SparseQwen(str(tiny.dir), keep_p=0.8, batch_size=2, max_new_tokens=9, device="cpu")
    answers = eng.generate_until(lmms.requests, lmms.task_dict)  # requests 0+1 share a batch, 2 runs alone
    items = []
    for request, media_entry in zip(lmms.requests, ("image", "video", "image")):
        context, gen_kwargs, to_visual, doc_id = request.args[:4]
        messages = [{"role": "user", "content": [{"type": media_entry},
                                                 {"type": "text", "text": context.removeprefix("<image>")}]}]
        visual = to_visual(lmms.task_dict["toy"]["test"][doc_id])[0]
        frames, fps = media.load_video(visual, sizes=eng.sizes) if media_entry == "video" else ([], 0)
        items.append({"messages": messages, "images": [visual] if media_entry == "image" else [],
                      "videos": [frames] if media_entry == "video" else [], "fps": [fps] * (media_entry == "video"),
                      "sizes": eng.sizes})
    expected, ratios = [], []
    for batch, request in ((items[:2], lmms.requests[0]), (items[2:], lmms.requests[2])):  # the engine's batches
        ref = generate(eng.model, media.encode_prompts(tiny.processor, batch), 0.8,
                       SamplingConfig(max_new_tokens=request.args[1]["max_new_tokens"], do_sample=False))
        expected += tiny.processor.batch_decode(ref.completion_ids, skip_special_tokens=True)
        ratios += ref.token_ratio.tolist()
    assert eng.stats["toy"]["token_ratio"] == pytest.approx(ratios)
    assert answers == expected and len(eng.stats["toy"]["kv_bytes"]) == 3


def test_adapter_generation_settings_and_stop_strings():
    assert engine.sampling_config({}, 7) == SamplingConfig(max_new_tokens=7, do_sample=False)
    assert engine.sampling_config({"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 5}, 7) == SamplingConfig(
        max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9)
    stops = engine.stop_strings({"until": ["\n\n", "Because", ""]})
    assert stops == ["Because"]  # "\n\n" is ignored as in lmms-eval's Qwen2.5-VL model
    assert engine.cut_at_stops("A.\n\nBecause red.", stops) == "A.\n\n"
    assert engine.stop_strings({"until": "ASSISTANT:"}) == ["ASSISTANT:"] and engine.stop_strings({}) == []
    with pytest.raises(ValueError, match="until"):
        engine.stop_strings({"until": 3})
    with pytest.raises(ValueError, match="unsupported visual"):
        engine.request_item("q", [np.zeros((2, 2, 3))])


def test_adapter_loglikelihood_equals_a_stock_dense_forward_at_keep_p_one(tiny, lmms):
    eng = engine.SparseQwen(str(tiny.dir), keep_p=1.0, device="cpu")
    dense = AutoModelForImageTextToText.from_pretrained(tiny.dir, attn_implementation="sdpa").eval()
    image = lmms.task_dict["toy"]["test"][0]["visual"]
    item = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]}],
            "images": [image], "videos": [], "fps": []}
    inputs = media.encode_prompts(tiny.processor, [item])
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        first = dense(**inputs).logits[0, -1].argmax()
    targets = [tiny.processor.tokenizer.decode([int(first)]), " red square"]
    for target in targets:
        ids = tiny.processor.tokenizer(target, add_special_tokens=False, return_tensors="pt")["input_ids"]
        batch = dict(inputs, input_ids=torch.cat([inputs["input_ids"], ids], 1),
                     attention_mask=torch.ones(1, prompt_len + ids.shape[1], dtype=torch.long),
                     mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], 1))
        with torch.no_grad():
            logits = dense(**batch).logits[0, prompt_len - 1:-1]  # (T, V): the predictions of the target tokens
        ref_logp = torch.log_softmax(logits, -1).gather(-1, ids[0][:, None]).sum()
        requests = [FakeInstance("Color?", lambda doc, t=target: t, lambda doc: [doc["visual"]], 0, "toy", "test")]
        (loss, greedy), = eng.loglikelihood(requests, lmms.task_dict)
        assert loss == pytest.approx(-float(ref_logp), abs=1e-4)  # a loss, as lmms-eval's argmin expects
        assert greedy == bool((logits.argmax(-1) == ids[0]).all())
    assert eng.loglikelihood([FakeInstance("Color?", targets[0], lambda d: [d["visual"]], 0, "toy", "test")],
                             lmms.task_dict)[0][1]  # the model's own first token is its greedy continuation


def fake_lmms_eval(monkeypatch, registry):
    """A stand-in for the parts of lmms-eval the `zipr1` class touches: the lmms base class and register_model."""
    class BaseLMMs:
        is_simple = True

        def __init__(self):
            self.task_dict, self.cache_hook = {}, SimpleNamespace(add_partial=lambda *entry: registry.setdefault(
                "cached", []).append(entry))

    def register_model(*names):
        def decorate(cls):
            registry.update({name: cls for name in names})
            return cls
        return decorate
    modules = {name: types.ModuleType(name) for name in ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model",
                                                         "lmms_eval.api.registry", "lmms_eval.api.instance")}
    modules["lmms_eval.api.model"].lmms = BaseLMMs
    modules["lmms_eval.api.instance"].GenerationResult = lambda text: SimpleNamespace(text=text)
    modules["lmms_eval"].utils = SimpleNamespace(simple_parse_args_string=lambda s: dict(
        kv.split("=", 1) for kv in s.split(",")))
    modules["lmms_eval.api.registry"].register_model = register_model
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return BaseLMMs


def test_lmms_subclass_registers_as_zipr1_and_delegates(tiny, lmms, monkeypatch, tmp_path):
    registry = {}
    base = fake_lmms_eval(monkeypatch, registry)
    plugin = importlib.import_module("lmms_eval_zipr1.models")
    (name, cls_name), = plugin.AVAILABLE_MODELS.items()  # LMMS_EVAL_PLUGINS: <plugin>.models.<name>.<class>
    sys.modules.pop(f"lmms_eval_zipr1.models.{name}", None)
    try:
        cls = getattr(importlib.import_module(f"lmms_eval_zipr1.models.{name}"), cls_name)
    finally:
        sys.modules.pop(f"lmms_eval_zipr1.models.{name}", None)  # bound to the stand-in: do not keep it
    assert name == "zipr1" and registry == {"zipr1": cls} and issubclass(cls, base) and cls.is_simple
    assert importlib.util.find_spec("lmms_eval_zipr1.tasks").submodule_search_locations  # lmms-eval's CLI needs it
    model = cls(pretrained=str(tiny.dir), keep_p=0.8, batch_size=2, max_new_tokens=9, device="cpu",
                stats_path=str(tmp_path / "stats.json"))
    model.task_dict = lmms.task_dict  # lmms-eval's evaluator sets it before calling the model
    reference = engine.SparseQwen(str(tiny.dir), keep_p=0.8, batch_size=1, max_new_tokens=9, device="cpu")
    answers = model.generate_until(lmms.requests)
    assert answers == reference.generate_until(lmms.requests, lmms.task_dict)
    assert registry.pop("cached") == [("generate_until", r.args[:2], a) for r, a in zip(lmms.requests, answers)]
    assert model.batch_size == 2 and model.loglikelihood(lmms.requests[:0]) == []
    stats = json.loads((tmp_path / "stats.json").read_text())["toy"]  # τ and KV bytes per task, beside the results
    assert stats["requests"] == 3 and stats["token_ratio"] == pytest.approx(
        sum(reference.stats["toy"]["token_ratio"]) / 3, rel=1e-6) and stats["kv_bytes"] > 0
    with pytest.raises(ValueError, match="unknown model_args"):
        cls(pretrained=str(tiny.dir), temprature=0.1)
    with pytest.raises(ValueError, match="batch_size is not a model_arg: pass it as --batch_size"):
        cls.__dict__["create_from_arg_string"].__func__(cls, f"pretrained={tiny.dir},batch_size=2", {"batch_size": 1})
    with pytest.raises(ValueError, match="--batch_size auto is not supported"):
        cls(pretrained=str(tiny.dir), batch_size="auto")
    with pytest.raises(ValueError, match="model_arg keep_p='x' is not a float"):
        cls(pretrained=str(tiny.dir), keep_p="x")
    with pytest.raises(ValueError, match="keep_p=0.9 needs attn_implementation=zipr1"):
        cls(pretrained=str(tiny.dir), keep_p=0.9, attn_implementation="sdpa")


def test_eval_flags_share_train_py_style(capsys):
    """HfArgumentParser over EvalConfig: --keep_p and --keep-p alike, bare booleans, the old --max_new_tokens name."""
    a = ev.parse_args(["--keep_p", "0.9", "--skip_bad_rows", "--max_completion_length", "4", "--batch_size", "2"])
    b = ev.parse_args(["--keep-p", "0.9", "--skip-bad-rows", "true", "--max_new_tokens", "4", "--batch-size", "2"])
    assert a == b and (a.keep_p, a.skip_bad_rows, a.max_completion_length, a.batch_size) == (0.9, True, 4, 2)
    assert "deprecated" in capsys.readouterr().err
    assert ev.parse_args([]) == ev.EvalConfig()
