"""Video-R1-260k-style training data: load rows with `datasets`, validate each one, build model prompts.

A row (Video-R1-260k.json, one JSON object per question):

    {"problem": "What is ...?", "options": ["A. red", "B. blue"] or [], "solution": "<answer>B</answer>",
     "problem_type": "multiple choice" | "numerical" | "OCR" | "free-form" | "regression",
     "data_type": "image" | "video", "path": "./CLEVRER/video_123.mp4", ...}   (other keys are kept, unused)

`path` is relative to a media root (Video-R1 joins it to the directory holding the JSON file, which is our default).
Sources `load_dataset_rows` accepts: a .json/.jsonl file, a local directory (a `save_to_disk` folder, or a folder
whose top level holds the .json/.jsonl/.parquet files), or a hub dataset id already in the local Hugging Face
cache (its snapshot folder is then read like a local directory; nothing is downloaded).

Validation (`check_row`) rejects rows with a missing or unreadable field, an unknown data_type or problem_type, a
solution the reward cannot score (rewards.check_solution; graded accepts every form Video-R1 scores, e.g. multiple
choice "d", "Yes", "AB", numerical "1e3", "1,2345", OCR "!!!"), or media that does not exist; then
`check_media_files` opens every media file (media.check_media: image header and PNG checksums, a video's first
frame), with a progress bar, on threads, and
caches each result by the file's (size, mtime_ns) in a JSON file (`media_check_cache`: `.zipr1-media-check.json` in
the media root, or under ~/.cache/zipr1 when that is not writable), so a second load of 260k rows is a few stats.
`on_bad_row="error"` raises one `DatasetError` naming the row; `"skip"` drops the row and records why:
`Rows.skipped` always says how many were dropped. Media that passes the cheap check but fails when read in full is
a DatasetError from `prompt_item` carrying `.row`; `step_on_readable_rows` records such rows for train.py (see
`replace_bad_rows`).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from zipr1_support import media
from zipr1_support import multi_gpu, run_dir
from zipr1_support.run_dir import write_text_atomically
import rewards

DATA_TYPES = ("image", "video")
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
MEDIA_CHECK_FILE = ".zipr1-media-check.json"
MEDIA_CHECK_VERSION = 2  # bumped when media.check_media rejects more (2: aspect ratio, decompression bombs)


class DatasetError(ValueError):
    """A dataset that cannot be found or read, or a bad row (the message names the row; `.row` its source index)."""

    def __init__(self, message, row: int | None = None):
        super().__init__(message)
        self.row = row


@dataclass
class Rows:
    """Validated rows, each with "media_path" (absolute) and "row" (its 0-based index in the source) added."""

    rows: list[dict]
    skipped: list[str] = field(default_factory=list)  # one message per dropped row
    source: str = ""
    num_source: int = 0  # rows in the source, dropped ones included (0: unknown, `rows` are the source)

    def __len__(self):
        return len(self.rows)

    def summary(self) -> str:
        text = f"{len(self.rows)} rows from {self.source}, {len(self.skipped)} bad rows skipped"
        if self.skipped and self.num_source:
            text += (" (a step that would pick a skipped row takes the next readable row instead; every other step "
                     "picks the questions it would with all rows readable)")
        return text

    def by_source(self) -> tuple[list[dict], dict[int, str]]:
        """(one slot per source row: the row, or {"row": i} for a dropped one; {dropped index: why})."""
        if not self.num_source:
            return self.rows, {}
        slots: list[dict] = [{"row": i} for i in range(self.num_source)]
        for row in self.rows:
            slots[row["row"]] = row
        kept = {row["row"] for row in self.rows}
        return slots, {i: "dropped at load" for i in range(self.num_source) if i not in kept}


def supported_problem_types() -> tuple[str, ...]:
    """Problem types we can both prompt for (media.TYPE_TEMPLATE) and score (rewards.PROBLEM_TYPES)."""
    return tuple(t for t in rewards.PROBLEM_TYPES if t in media.TYPE_TEMPLATE)


def _local_dataset_dir(name: str) -> Path:
    """The snapshot folder of hub dataset `name` in the local HF cache, or DatasetError saying what to do."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, repo_type="dataset", local_files_only=True))
    except Exception:
        raise DatasetError(f"dataset '{name}' is not a local file or directory and not in the Hugging Face cache: "
                           f"download it with `huggingface-cli download --repo-type dataset {name}` or pass a "
                           f"local .json/.jsonl file or directory") from None


def _read_table(source: Path, cache_dir=None):
    """A `datasets.Dataset` from a data file or a directory (save_to_disk folder, or data files at its top)."""
    import datasets
    if source.is_dir() and (source / "state.json").is_file():
        return datasets.load_from_disk(str(source))
    files = [source] if source.is_file() else sorted(  # hidden files (e.g. the media check cache) are not data
        p for p in source.iterdir() if p.suffix in DATA_FILE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DatasetError(f"{source}: no .json / .jsonl / .parquet data file found")
    if all(f.stat().st_size == 0 for f in files):
        raise DatasetError(f"{source}: the data file is empty")
    builder = "parquet" if files[0].suffix == ".parquet" else "json"
    if builder == "json":
        for f in files:
            check_utf8(f)
    if any((f.suffix == ".parquet") != (builder == "parquet") for f in files):
        raise DatasetError(f"{source}: mixes parquet and json data files {[f.name for f in files]}")
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir)
    except Exception as err:  # e.g. a line that is not JSON, or a column whose type changes between rows
        cause = err.__cause__ or err
        first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise DatasetError(f"{source}: cannot be read as {builder}: {first_line}") from None


def check_utf8(path: Path) -> None:
    """DatasetError naming the line and column of the first byte of a JSON / JSONL file that is not UTF-8 (JSON's
    encoding; `datasets` reads such a file and fails later, on the row)."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start, line = raw.rfind(b"\n", 0, err.start) + 1, raw.count(b"\n", 0, err.start) + 1
        raise DatasetError(f"{path}: line {line} is not valid UTF-8 (byte "
                           f"0x{raw[err.start]:02x} at column {err.start - line_start + 1}): re-encode the file as "
                           f"UTF-8") from None


def _field(row: dict, key: str, kind, index: int):
    value = row.get(key)
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        raise DatasetError(f"row {index}: field '{key}' is missing or not a non-empty {getattr(kind, '__name__', kind)}"
                           f" (got {value!r})")
    return value


def check_row(row: dict, index: int, media_root: Path, accuracy: str = "graded") -> dict:
    """The row with "media_path" and "row" added, or DatasetError naming row `index` and what is wrong; its solution
    must be one `accuracy` ("graded" or "binary", rewards.py) can score."""
    problem = _field(row, "problem", str, index)
    data_type, problem_type = _field(row, "data_type", str, index), _field(row, "problem_type", str, index)
    if data_type not in DATA_TYPES:
        raise DatasetError(f"row {index}: unknown data_type {data_type!r}; expected one of {DATA_TYPES}")
    if problem_type not in supported_problem_types():
        raise DatasetError(f"row {index}: unknown problem_type {problem_type!r}; expected one of "
                           f"{supported_problem_types()}")
    options = row.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise DatasetError(f"row {index}: 'options' must be a list of strings, got {options!r}")
    solution = _field(row, "solution", str, index)
    try:  # every solution `accuracy` scoring can pay some answer on; graded: every form Video-R1 scores
        rewards.check_solution(solution, problem_type, accuracy)
    except ValueError as err:
        raise DatasetError(f"row {index}: {err}") from None
    media_path = media_root / _field(row, "path", str, index)
    if not media_path.exists():
        raise DatasetError(f"row {index}: {data_type} not found: {media_path}")
    return {**row, "problem": problem, "options": options, "media_path": str(media_path.resolve()), "row": index}


def media_check_cache(root: Path) -> Path:
    """The JSON file caching media checks of files under `root` (see the module docstring)."""
    if os.access(root, os.W_OK):
        return root / MEDIA_CHECK_FILE
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "zipr1" / f"media-check-{digest}.json"


def _read_json_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
        return cache["files"] if cache.get("version") == MEDIA_CHECK_VERSION else {}  # older checks: redone
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or torn by a killed run: start afresh
        return {}


def _write_json_cache(path: Path, files: dict) -> None:
    try:  # a killed run never leaves a torn cache
        write_text_atomically(path, json.dumps({"version": MEDIA_CHECK_VERSION, "files": files}))
    except OSError:
        pass  # a read-only place: the checks are redone next time


def _media_error(key: tuple[str, str]) -> str | None:
    try:
        media.check_media(key[0], key[1])
    except (OSError, ValueError) as err:
        return str(err)
    return None


def check_media_files(rows: list[dict], cache_file: Path | None, progress: bool = True) -> dict[int, str]:
    """{row index: error} for the rows whose media fails media.check_media; each (file, data_type) is checked once,
    and its result cached in `cache_file` under the file's (size, mtime_ns): an edited or replaced file is rechecked."""
    cached = _read_json_cache(cache_file) if cache_file else {}
    results, todo = {}, {}  # (path, data_type) -> error or None / -> cache entry
    for row in rows:
        key = (row["media_path"], row["data_type"])
        if key in results or key in todo:
            continue
        stat = os.stat(key[0])
        stamp, hit = [stat.st_size, stat.st_mtime_ns], cached.get(f"{key[1]}:{key[0]}")
        if hit is not None and hit[:2] == stamp:
            results[key] = hit[2]
        else:
            todo[key] = stamp
    bar = tqdm(total=len(results) + len(todo), initial=len(results), desc="checking media", unit="file",
               disable=not progress or not todo)
    pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))  # PIL and PyAV decode outside the GIL
    try:
        for key, error in zip(todo, pool.map(_media_error, todo)):
            results[key] = error
            cached[f"{key[1]}:{key[0]}"] = todo[key] + [error]
            bar.update()
    finally:  # also after Ctrl-C: queued checks are dropped, what was checked stays cached
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        if cache_file and todo:
            _write_json_cache(cache_file, cached)
    return {row["row"]: f"row {row['row']}: {results[(row['media_path'], row['data_type'])]}" for row in rows
            if results.get((row["media_path"], row["data_type"])) is not None}


def load_dataset_rows(dataset: str, media_root: str | None = None, on_bad_row: str = "error",
                      cache_dir: str | None = None, check_media: bool = True, progress: bool = True,
                      accuracy: str = "graded") -> Rows:
    """Read and validate every row of `dataset` (file, directory, or cached hub id); see the module docstring.

    media_root defaults to the folder holding the data file (or the directory / cached snapshot itself).
    on_bad_row: "error" raises DatasetError at the first bad row; "skip" drops bad rows and counts them.
    check_media: open every media file (cached, see check_media_files); False checks only that it exists.
    accuracy: the reward the rows will be scored with ("graded" or "binary"): a solution it cannot score is a bad row.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    source = Path(dataset)
    if not source.exists():
        if dataset.startswith((".", "/", "~")) or dataset.endswith(DATA_FILE_SUFFIXES):
            raise DatasetError(f"dataset file or directory not found: {dataset}")
        source = _local_dataset_dir(dataset)
    root = Path(media_root) if media_root is not None else (source if source.is_dir() else source.parent)
    if not root.is_dir():
        raise DatasetError(f"media root is not a directory: {root}")
    rows, bad = [], {}  # bad: row index -> why
    hint = "(pass --skip_bad_rows to skip and count bad rows)"
    num_source = 0
    for index, row in enumerate(_read_table(source, cache_dir)):
        num_source = index + 1
        try:
            rows.append(check_row(row, index, root, accuracy))
        except DatasetError as err:
            if on_bad_row == "error":
                raise DatasetError(f"{source}: {err} {hint}") from None
            bad[index] = str(err)
    unreadable = check_media_files(rows, media_check_cache(root), progress) if check_media else {}
    if unreadable and on_bad_row == "error":
        raise DatasetError(f"{source}: {unreadable[min(unreadable)]} {hint}")
    bad.update(unreadable)
    rows, skipped = [r for r in rows if r["row"] not in unreadable], [bad[i] for i in sorted(bad)]
    if not rows:
        raise DatasetError(f"{source}: no usable rows ({len(skipped)} bad rows skipped)")
    return Rows(rows, skipped, str(source), num_source)


def prompt_item(row: dict, max_frames: int = 16, template: str = "video_r1", sizes=None) -> dict:
    """The prompt of a row (media.chat_item): its question in `template` (media.question_text: Video-R1's prompt, or
    "answer_only") and its image or video, held in the row (toy.toy_examples' in-memory rows: "image", or "video"
    frames + "fps") or read from media_path now (errors name the row). sizes (media.InputSizes): Video-R1's frame
    sampling and the pixel limits the processor applies; None: min(max_frames, total) frames at the processor's own
    sizes."""
    text = media.question_text(row["problem"], row["options"], row["problem_type"], template)
    if "media_path" not in row:  # an in-memory toy row (toy.toy_examples), not one load_dataset_rows read
        images, videos = ([row["image"]] if "image" in row else []), ([row["video"]] if "video" in row else [])
        fps = [row["fps"] for _ in videos]
        return media.chat_item(text, images, videos, fps, sizes=sizes)
    images, videos, fps = [], [], []
    try:
        if row["data_type"] == "image":
            images.append(media.load_image(row["media_path"]))
        else:
            frames, rate = media.load_video(row["media_path"], max_frames=max_frames, sizes=sizes)
            videos.append(frames)
            fps.append(rate)
    except (OSError, ValueError) as err:
        raise DatasetError(f"row {row['row']}: {err}", row=row["row"]) from None
    return media.chat_item(text, images, videos, fps, sizes=sizes)


def checked_prompts(inputs, rows: list[dict], max_prompt_length: int | None, repeats: int = 1):
    """`inputs` (the encoded prompts of `rows`, each `repeats` times) when every prompt fits max_prompt_length; else
    DatasetError carrying the row, which train.py records as a bad row. Never truncated: cutting a prompt from the
    left would cut its image tokens."""
    if max_prompt_length is not None:
        lengths = inputs["attention_mask"].sum(-1)[::repeats].tolist()  # (G,) tokens, text and media
        for row, length in zip(rows, lengths):
            if length > max_prompt_length:
                raise DatasetError(f"row {row['row']}: its prompt is {length} tokens, above max_prompt_length "
                                   f"{max_prompt_length} (prompts are never truncated)", row=row["row"])
    return inputs


def replace_bad_rows(indices: list[int], rows: list[dict], bad) -> list[int]:
    """`indices` (positions in `rows`) with each row whose source index is in `bad` replaced by the next usable
    position after it (wrapping), not picked this step: it depends on (indices, bad) only, so a resumed run that knows
    the same bad rows picks the same questions as the run that found them."""
    if not any(rows[i]["row"] in bad for i in indices):
        return list(indices)
    if sum(r["row"] not in bad for r in rows) < len(indices):
        raise DatasetError(f"only {sum(r['row'] not in bad for r in rows)} readable rows are left ({len(bad)} "
                           f"unreadable) for per_step_questions={len(indices)}: lower it, or repair the media "
                           f"recorded in bad_rows.jsonl")
    picked = []
    for i in indices:
        j = i
        while rows[j]["row"] in bad or (j != i and (j in indices or j in picked)):
            j = (j + 1) % len(rows)
        picked.append(j)
    return picked


def step_rows(table: Rows, step: int, per_step: int, seed: int, bad: dict) -> list[dict]:
    """Step `step`'s questions: question_indices over every source row, rows dropped at load or in `bad` replaced
    (replace_bad_rows). Drawn over the source, not the readable rows, so media deleted between runs changes only
    the steps that pick it: a resumed run replays every other step as the uninterrupted run did."""
    slots, dropped = table.by_source()
    return [slots[i] for i in replace_bad_rows(question_indices(len(slots), step, per_step, seed), slots,
                                               {**dropped, **bad})]


def question_indices(num_rows: int, step: int, per_step: int, seed: int) -> list[int]:
    """Rows for training step `step`: consecutive slices of per-epoch random permutations (epoch e seeded by
    (seed, e)), so the choice depends on (seed, step) only and a resumed run sees the same questions."""
    if per_step > num_rows:
        raise ValueError(f"per_step_questions={per_step} exceeds the {num_rows} usable rows")
    picked, start = [], step * per_step
    while len(picked) < per_step:
        epoch, offset = divmod(start + len(picked), num_rows)
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed((seed * 100_003 + epoch) % 2**64))
        picked += order[offset:offset + per_step - len(picked)].tolist()
    return picked


def step_on_readable_rows(train_step, table: Rows, bad: dict, cfg, step: int, dist) -> dict:
    """train_step(rows, first) on step `step`'s questions for this rank, rows in `bad` replaced (step_rows):
    `first` is the place of the rank's first question in the step's global list. A row whose media fails now joins
    `bad` and the step is redone without it (skip_bad_row; nothing was updated yet), or the run stops."""
    while True:
        picked = step_rows(table, step, cfg.per_step_questions, cfg.seed, bad)  # over the source's rows
        mine = multi_gpu.rank_questions(len(picked), dist)  # whole groups: this rank's block of questions
        try:
            return train_step([picked[q] for q in mine], mine.start)
        except DatasetError as err:
            if err.row is None or err.row in bad:
                raise
            bad[err.row] = str(err)
            skip_bad_row(cfg, err, step, dist)


def skip_bad_row(cfg, err: DatasetError, step: int, dist) -> None:
    """A row whose media failed while sampling step `step`: recorded in output_dir/bad_rows.jsonl (a resume or a
    rerun in that folder replaces it, see replace_bad_rows); then skipped with one line, or the run stops."""
    where = run_dir.record_bad_row(Path(cfg.output_dir), err.row, str(err), step + 1)
    if not cfg.skip_bad_rows or dist.enabled:  # ranks cannot agree on a replacement mid-step: stop them all
        hint = "" if cfg.skip_bad_rows else "; --skip_bad_rows replaces such rows as they come"
        raise DatasetError(f"step {step + 1}: {err}: recorded in {where}, --resume_from_checkpoint continues "
                           f"without it{hint}", row=err.row) from None
    tqdm.write(f"skipping {err} (step {step + 1}; recorded in {where})", file=sys.stderr)
