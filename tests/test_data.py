"""data.py: Video-R1-schema rows from JSONL / JSON / folders, row validation (error or counted skip), prompts.

The fixture is made here: tiny PNG images, a tiny animated WebP video and a folder of frames, with rows written the
way Video-R1-260k.json stores them ("./"-relative paths, "<answer>X</answer>" solutions).
"""
import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from zipr1_support import data

IMAGE_COLOURS = {"red.png": (255, 0, 0), "blue.png": (0, 0, 255)}


def _frames(n=4, size=56):
    """Frames whose pixel value encodes the frame index, so the loader's frame order can be checked."""
    return [Image.fromarray(np.full((size, size, 3), 40 * t + 10, np.uint8)) for t in range(n)]


@pytest.fixture
def fixture_dir(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name, colour in IMAGE_COLOURS.items():
        Image.new("RGB", (56, 84), colour).save(tmp_path / "imgs" / name)
    frames = _frames()
    frames[0].save(tmp_path / "clip.webp", save_all=True, append_images=frames[1:], lossless=True, duration=500)
    (tmp_path / "frames").mkdir()
    for t, frame in enumerate(frames):
        frame.save(tmp_path / "frames" / f"{t:03d}.png")
    return tmp_path


def good_rows():
    return [
        {"problem_id": 0, "problem": "What colour?", "options": ["A. red", "B. blue"], "solution": "<answer>A</answer>",
         "problem_type": "multiple choice", "data_type": "image", "path": "./imgs/red.png"},
        {"problem_id": 1, "problem": "How many frames?", "options": [], "solution": "<answer>4</answer>",
         "problem_type": "numerical", "data_type": "video", "path": "./clip.webp"},
        {"problem_id": 2, "problem": "Name the colour.", "options": [], "solution": "<answer>blue</answer>",
         "problem_type": "free-form", "data_type": "image", "path": "imgs/blue.png"},
        {"problem_id": 3, "problem": "Which came first?", "options": ["A. dark", "B. light"],
         "solution": "<answer>A</answer>", "problem_type": "multiple choice", "data_type": "video", "path": "frames"},
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_rows_are_validated_and_media_resolved(fixture_dir, tmp_path):
    rows = good_rows()
    table = data.load_dataset_rows(str(write_jsonl(fixture_dir / "train.jsonl", rows)), cache_dir=str(tmp_path / "c"))
    assert len(table) == 4 and table.skipped == []
    for index, (got, want) in enumerate(zip(table.rows, rows)):
        assert got["row"] == index
        assert got["media_path"] == str((fixture_dir / want["path"]).resolve())
        for key in ("problem", "options", "solution", "problem_type", "data_type", "problem_id"):
            assert got[key] == want[key]


def test_json_array_folder_and_saved_dataset_give_the_same_rows(fixture_dir, tmp_path):
    rows = good_rows()
    (fixture_dir / "Video-R1-260k.json").write_text(json.dumps(rows))  # Video-R1 ships one JSON array
    from_file = data.load_dataset_rows(str(fixture_dir / "Video-R1-260k.json"), cache_dir=str(tmp_path / "c"))
    from_folder = data.load_dataset_rows(str(fixture_dir), cache_dir=str(tmp_path / "c"))  # media root = folder
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    from_disk = data.load_dataset_rows(str(saved), media_root=str(fixture_dir))
    for table in (from_folder, from_disk):
        assert [r["media_path"] for r in table.rows] == [r["media_path"] for r in from_file.rows]
        assert [r["solution"] for r in table.rows] == [r["solution"] for r in rows]


def test_prompt_item_reads_the_media_of_each_row(fixture_dir, tmp_path):
    table = data.load_dataset_rows(str(write_jsonl(fixture_dir / "t.jsonl", good_rows())),
                                   cache_dir=str(tmp_path / "c"))
    image = data.prompt_item(table.rows[0])
    assert image["videos"] == [] and len(image["images"]) == 1
    assert np.asarray(image["images"][0]).shape == (84, 56, 3)
    assert (np.asarray(image["images"][0]) == IMAGE_COLOURS["red.png"]).all()
    assert [c["type"] for c in image["messages"][-1]["content"]] == ["image", "text"]
    assert "A. red\nB. blue" in image["messages"][-1]["content"][-1]["text"]
    want = [np.asarray(f) for f in _frames()]
    for row, fps in ((table.rows[1], 2.0), (table.rows[3], 2.0)):  # WebP at 500 ms per frame; folder: 2 fps default
        item = data.prompt_item(row)
        assert item["images"] == [] and item["fps"] == [pytest.approx(fps)]
        assert [np.asarray(f).tolist() for f in item["videos"][0]] == [w.tolist() for w in want]
    assert len(data.prompt_item(table.rows[1], max_frames=2)["videos"][0]) == 2


BAD_ROWS = {  # what is wrong -> (row, words the message must contain)
    "missing media": ({"path": "./imgs/green.png"}, "green.png"),
    "unknown data_type": ({"data_type": "audio"}, "audio"),
    "unknown problem_type": ({"problem_type": "essay"}, "essay"),
    "no answer": ({"solution": "<answer></answer>"}, "solution"),
    "unclosed answer": ({"solution": "<answer>A"}, "solution"),
    "missing problem": ({"problem": None}, "problem"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_is_an_error_naming_its_row(fixture_dir, tmp_path, case):
    change, words = BAD_ROWS[case]
    rows = good_rows()
    rows[2] = {**rows[2], **change}
    path = write_jsonl(fixture_dir / "bad.jsonl", rows)
    with pytest.raises(data.DatasetError, match="row 2") as err:
        data.load_dataset_rows(str(path), cache_dir=str(tmp_path / "c"))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_bad_rows_are_skipped_and_counted(fixture_dir, tmp_path):
    rows = good_rows()
    rows[0] = {**rows[0], "path": "./missing.png"}
    rows[3] = {**rows[3], "data_type": "audio"}
    table = data.load_dataset_rows(str(write_jsonl(fixture_dir / "bad.jsonl", rows)), on_bad_row="skip",
                                   cache_dir=str(tmp_path / "c"))
    assert [r["row"] for r in table.rows] == [1, 2]
    assert len(table.skipped) == 2 and table.skipped[0].startswith("row 0") and table.skipped[1].startswith("row 3")
    assert "2 bad rows skipped" in table.summary()


def test_missing_sources_give_one_line_errors(fixture_dir, tmp_path):
    with pytest.raises(data.DatasetError, match="not found"):
        data.load_dataset_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(data.DatasetError, match="someone/not-cached.*huggingface-cli download"):
        data.load_dataset_rows("someone/not-cached")
    (fixture_dir / "broken.jsonl").write_text('{"problem": "x"}\nnot json\n')
    with pytest.raises(data.DatasetError, match="broken.jsonl"):
        data.load_dataset_rows(str(fixture_dir / "broken.jsonl"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="on_bad_row"):
        data.load_dataset_rows(str(fixture_dir), on_bad_row="ignore")


def test_unreadable_media_at_batch_time_names_the_row(fixture_dir, tmp_path):
    table = data.load_dataset_rows(str(write_jsonl(fixture_dir / "t.jsonl", good_rows())),
                                   cache_dir=str(tmp_path / "c"))
    (fixture_dir / "imgs" / "blue.png").write_bytes(b"not a png")
    with pytest.raises(data.DatasetError, match="row 2.*blue.png"):
        data.prompt_item(table.rows[2])


def test_question_indices_walk_seeded_permutations():
    n, per_step, seed = 10, 3, 7
    walk = [i for step in range(10) for i in data.question_indices(n, step, per_step, seed)]  # 3 epochs
    for epoch in range(3):
        assert sorted(walk[epoch * n:(epoch + 1) * n]) == list(range(n))  # every row once per epoch
    assert walk[:n] != walk[n:2 * n]  # a fresh order each epoch
    assert data.question_indices(n, 4, per_step, seed) == walk[12:15]  # depends on (seed, step) only
    assert data.question_indices(n, 0, per_step, seed + 1) != walk[:3]
    with pytest.raises(ValueError, match="per_step_questions"):
        data.question_indices(2, 0, 3, seed)


def test_empty_data_file_is_one_clear_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(data.DatasetError, match="empty"):
        data.load_dataset_rows(str(empty))


def corrupt_media(folder):
    """A PNG with a flipped byte (its checksum fails), and random bytes named .mp4 and .webp."""
    png = (folder / "imgs" / "red.png").read_bytes()
    (folder / "imgs" / "corrupt.png").write_bytes(png[:40] + bytes(b ^ 0xFF for b in png[40:48]) + png[48:])
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (folder / "noise.mp4").write_bytes(noise)
    (folder / "noise.webp").write_bytes(noise)
    return {1: "imgs/corrupt.png", 2: "noise.mp4", 3: "noise.webp"}


@pytest.mark.parametrize("row", [1, 2, 3])
def test_unreadable_media_is_caught_at_load_time_naming_its_row(fixture_dir, tmp_path, row):
    rows, paths = good_rows(), corrupt_media(fixture_dir)
    rows[row] = {**rows[row], "path": paths[row], "data_type": "image" if row == 1 else "video"}
    path = write_jsonl(fixture_dir / "bad.jsonl", rows)
    with pytest.raises(data.DatasetError, match=f"row {row}: cannot read .*{Path(paths[row]).name}") as err:
        data.load_dataset_rows(str(path), cache_dir=str(tmp_path / "c"))
    assert "\n" not in str(err.value) and "--skip_bad_rows" in str(err.value)


def test_unreadable_media_rows_are_skipped_and_counted(fixture_dir, tmp_path):
    rows, paths = good_rows() * 2, corrupt_media(fixture_dir)  # rows 4..7 repeat rows 0..3
    for row, kind in ((1, "image"), (2, "video"), (7, "video")):
        rows[row] = {**rows[row], "path": paths[min(row, 3)], "data_type": kind}
    rows[5] = {**rows[5], "data_type": "audio"}  # a row bad for another reason, counted in order
    table = data.load_dataset_rows(str(write_jsonl(fixture_dir / "bad.jsonl", rows)), on_bad_row="skip",
                                   cache_dir=str(tmp_path / "c"))
    assert [r["row"] for r in table.rows] == [0, 3, 4, 6]
    assert [m.split(":")[0] for m in table.skipped] == ["row 1", "row 2", "row 5", "row 7"]
    for row in table.rows:  # what passed the check reads
        data.prompt_item(row)


def test_media_checks_are_cached_by_size_and_mtime(fixture_dir, tmp_path, monkeypatch):
    path = write_jsonl(fixture_dir / "t.jsonl", good_rows() + good_rows())  # each file used by two rows
    checked = []
    real = data.media.check_media
    monkeypatch.setattr(data.media, "check_media", lambda p, kind: checked.append(Path(p).name) or real(p, kind))
    data.load_dataset_rows(str(path), cache_dir=str(tmp_path / "c"))
    assert sorted(checked) == sorted(["red.png", "clip.webp", "blue.png", "frames"])  # once per file, not per row
    cache = fixture_dir / data.MEDIA_CHECK_FILE
    assert data.media_check_cache(fixture_dir) == cache and cache.is_file()
    checked.clear()
    data.load_dataset_rows(str(path), cache_dir=str(tmp_path / "c"))
    assert checked == []  # all from the cache
    blue = fixture_dir / "imgs" / "blue.png"
    blue.write_bytes(blue.read_bytes()[:30])  # the file changes (size and mtime): checked again, and now bad
    with pytest.raises(data.DatasetError, match="row 2: .*blue.png"):
        data.load_dataset_rows(str(path), cache_dir=str(tmp_path / "c"))
    assert checked == ["blue.png"]
    cache.write_text('{"version": 1, "files": {"image:')  # a torn cache (a killed run) is ignored, then rewritten
    table = data.load_dataset_rows(str(path), on_bad_row="skip", cache_dir=str(tmp_path / "c"))
    assert len(table) == 6 and json.loads(cache.read_text())["version"] == data.MEDIA_CHECK_VERSION


def test_media_failing_only_when_read_in_full_names_its_row(fixture_dir, tmp_path):
    """A truncated JPEG passes the header check; reading it for a prompt is a DatasetError carrying the row."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (fixture_dir / "imgs" / "cut.jpg").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    rows = good_rows()
    rows[2] = {**rows[2], "path": "imgs/cut.jpg"}
    table = data.load_dataset_rows(str(write_jsonl(fixture_dir / "t.jsonl", rows)), cache_dir=str(tmp_path / "c"))
    with pytest.raises(data.DatasetError, match="row 2: cannot read image .*cut.jpg") as err:
        data.prompt_item(table.rows[2])
    assert err.value.row == 2
