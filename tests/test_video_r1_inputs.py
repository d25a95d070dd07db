"""Input sizes and frame sampling against Video-R1's bundled qwen-vl-utils.

The references below are written here from the published rules of
github.com/tulerfeng/Video-R1 src/qwen-vl-utils/src/qwen_vl_utils/vision_process.py (smart_resize, smart_nframes,
fetch_video, _read_video_decord), not imported: CI does not need qwen-vl-utils.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ImagesKwargs, VideosKwargs

import eval as evaluate
from zipr1_support import media
from zipr1_support import media_files
import toy
from lmms_eval_zipr1 import engine
from zipr1_support.train_config import ConfigError, parse_config

# Video-R1's constants (vision_process.py, module top), typed in again
REF_MIN, REF_MAX, REF_VIDEO_MIN, REF_VIDEO_MAX = 4 * 784, 256 * 784, 128 * 784, 128 * 784


def ref_smart_resize(height, width, min_pixels=REF_MIN, max_pixels=REF_MAX, factor=28):
    """qwen-vl-utils' smart_resize: round sides to 28; too many pixels: scale down, floor; too few: scale up, ceil."""
    h_bar, w_bar = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        return math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    if h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        return math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def ref_frame_indices(total, video_fps, fps=2.0, min_frames=4, max_frames=None):
    """qwen-vl-utils' smart_nframes (fps branch, max_frames defaulting to min(16, total)) and the decord reader's
    torch.linspace(0, total - 1, n).round()."""
    min_frames = math.ceil(min_frames / 2) * 2
    max_frames = math.floor((max_frames if max_frames is not None else min(16, total)) / 2) * 2
    n = min(min(max(total / video_fps * fps, min_frames), max_frames), total)
    n = math.floor(n / 2) * 2
    return torch.linspace(0, total - 1, n).round().long().tolist()


def ref_video_max_pixels(min_pixels=REF_VIDEO_MIN, n_frames=16):
    """fetch_video's per-frame limit: max(min(VIDEO_MAX_PIXELS, total_pixels / n x 2), int(1.05 min_pixels))."""
    return max(min(REF_VIDEO_MAX, int(128000 * 28 * 28 * 0.9) / n_frames * 2), int(min_pixels * 1.05))


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return media.load_processor(toy.build_tiny_model_dir(tmp_path_factory.mktemp("tiny")))


IMAGE_SIZES = [(28, 28), (56, 56), (100, 150), (224, 224), (480, 640), (720, 1280), (1080, 1920), (1440, 2560),
               (3000, 4000), (2160, 3840), (6000, 8000), (8000, 6000), (4032, 3024), (333, 777), (1, 1), (10, 10),
               (28, 5600), (5600, 28), (40, 7999), (7000, 36), (30, 5000), (3136, 16), (64, 12000)]


def test_defaults_are_video_r1s():
    sizes = media.InputSizes()
    assert (sizes.min_pixels, sizes.max_pixels, sizes.video_min_pixels, sizes.video_max_pixels) == (
        REF_MIN, REF_MAX, REF_VIDEO_MIN, REF_VIDEO_MAX)
    assert (sizes.fps, sizes.min_frames, sizes.max_frames, media_files.MAX_RATIO) == (2.0, 4, 16, 200)
    assert sizes.video_pixel_limit() == ref_video_max_pixels() == 105369  # not 100352: qwen-vl-utils' 1.05 floor


@pytest.mark.parametrize("height,width", IMAGE_SIZES)
def test_image_size_and_tokens_equal_qwen_vl_utils_smart_resize(processor, height, width):
    """End to end through the fallback processor: pixels of the resized image and its <|image_pad|> count."""
    image = Image.new("RGB", (width, height), (200, 30, 30))
    out = media.encode_prompts(processor, [media.chat_item("q", [image], sizes=media.InputSizes())])
    h, w = ref_smart_resize(height, width)
    grid = out["image_grid_thw"][0].tolist()
    assert [grid[1] * 14, grid[2] * 14] == [h, w]
    assert int((out["input_ids"] == processor.image_token_id).sum()) == h * w // 784
    assert out["pixel_values"].shape[0] == h * w // 196


@pytest.mark.parametrize("height,width", [(1080, 1920), (28, 5600), (3000, 4000)])
def test_transformers_processor_takes_the_sizes_as_images_kwargs(processor, height, width):
    """The full AutoProcessor path: transformers' own Qwen2_5_VLProcessor (images only; its video processor needs
    torchvision) given the same call resizes to the same grid."""
    class ImageOnly(Qwen2_5_VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]
    real = ImageOnly(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                     chat_template=processor.tokenizer.chat_template)
    image = Image.new("RGB", (width, height), (0, 90, 200))
    out = media.encode_prompts(real, [media.chat_item("q", [image], sizes=media.InputSizes())])
    h, w = ref_smart_resize(height, width)
    assert out["image_grid_thw"][0].tolist() == [1, h // 14, w // 14]
    for modality, typed in (("images_kwargs", ImagesKwargs), ("videos_kwargs", VideosKwargs)):  # what
        # encode_prompts passes is what transformers' processors take (their typed per-modality kwargs)
        assert set(getattr(media.InputSizes(), modality)()) <= set(typed.__annotations__), modality


class Recording:
    """A processor that records the keyword arguments of each call and answers with the fallback's output."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def apply_chat_template(self, *args, **kwargs):
        return self.inner.apply_chat_template(*args, **kwargs)

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.inner(**kwargs)


def test_real_path_receives_the_settings_as_processor_kwargs(processor):
    sizes = media.InputSizes(min_pixels=8 * 784, max_pixels=64 * 784, video_min_pixels=16 * 784,
                             video_max_pixels=32 * 784, fps=1.0, min_frames=2, max_frames=8)
    frames = [Image.new("RGB", (64, 48), (i, 0, 0)) for i in range(4)]
    recording = Recording(processor)
    media.encode_prompts(recording, [media.chat_item("q", [frames[0]], [frames], [0.5], sizes=sizes)])
    call = recording.calls[0]
    assert call["images_kwargs"] == {"size": {"shortest_edge": 8 * 784, "longest_edge": 64 * 784}}
    assert call["videos_kwargs"] == {"size": {"shortest_edge": 16 * 784, "longest_edge": 32 * 784}}
    assert call["do_sample_frames"] is False and call["video_metadata"][0]["fps"] == 0.5
    recording.calls.clear()
    media.encode_prompts(recording, [media.chat_item("q", [frames[0]])])  # no sizes: the processor's own
    assert "images_kwargs" not in recording.calls[0] and "videos_kwargs" not in recording.calls[0]
    with pytest.raises(ValueError, match="mixes input sizes"):
        media.encode_prompts(recording, [media.chat_item("q", sizes=sizes), media.chat_item("q")])


FRAME_CASES = [  # (total frames, video fps): short clips, 1 fps, 24/25/30/60 fps, long videos
    (1, 2.0), (2, 30.0), (3, 30.0), (4, 30.0), (5, 1.0), (7, 2.0), (8, 2.0), (9, 2.0), (10, 30.0), (16, 1.0),
    (17, 1.0), (31, 1.0), (60, 1.0), (75, 25.0), (100, 24.0), (150, 30.0), (240, 30.0), (299, 29.97), (600, 60.0),
    (1800, 30.0), (18000, 30.0), (216000, 60.0)]


@pytest.mark.parametrize("total,video_fps", FRAME_CASES)
def test_frame_indices_follow_smart_nframes(total, video_fps):
    ours = media_files.frame_picker(sizes=media.InputSizes())(total, video_fps)
    if total == 1:  # deliberate deviation: qwen-vl-utils raises (nframes 0 outside [2, 1]); we keep the one frame
        assert ours == [0]
        return
    assert ours == ref_frame_indices(total, video_fps)
    assert media_files.smart_nframes(total, video_fps) == len(ours)


@pytest.mark.parametrize("fps,min_frames,max_frames", [(1.0, 4, 16), (0.5, 2, 8), (4.0, 5, 31), (2.0, 3, 3)])
@pytest.mark.parametrize("total,video_fps", [(6, 2.0), (40, 10.0), (300, 30.0), (9000, 25.0)])
def test_frame_indices_follow_smart_nframes_at_other_settings(fps, min_frames, max_frames, total, video_fps):
    sizes = media.InputSizes(fps=fps, min_frames=min_frames, max_frames=max_frames)
    ours = media_files.frame_picker(sizes=sizes)(total, video_fps)
    assert ours == ref_frame_indices(total, video_fps, fps, min_frames, max_frames)


def write_webp(path, n, duration_ms, size=(96, 64)):
    frames = [Image.new("RGB", size, (i * 7 % 256, 255 - i % 256, 40)) for i in range(n)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0, lossless=True)


@pytest.mark.parametrize("n,duration_ms,size", [(5, 500, (96, 64)), (40, 40, (320, 240)), (60, 1000, (64, 480)),
                                                 (9, 100, (1280, 720))])
def test_video_grid_and_second_per_grid_equal_video_r1s(processor, tmp_path, n, duration_ms, size):
    """A video file end to end (fallback path): kept frames, video_grid_thw (frames / 2, sides of smart_resize at
    [128*28*28, fetch_video's limit] / 14) and second_per_grid_ts = 2 / sample_fps of the kept frames."""
    write_webp(tmp_path / "v.webp", n, duration_ms, size)
    sizes = media.InputSizes()
    frames, rate = media.load_video(tmp_path / "v.webp", sizes=sizes)
    video_fps = 1000 / duration_ms
    keep = ref_frame_indices(n, video_fps)
    assert [f.getpixel((0, 0))[0] for f in frames] == [i * 7 % 256 for i in keep]
    assert rate == pytest.approx(len(keep) / n * video_fps, rel=1e-12)  # qwen-vl-utils' sample_fps
    out = media.encode_prompts(processor, [media.chat_item("q", videos=[frames], fps=[rate], sizes=sizes)])
    h, w = ref_smart_resize(size[1], size[0], REF_VIDEO_MIN, ref_video_max_pixels(n_frames=len(keep)))
    assert out["video_grid_thw"][0].tolist() == [len(keep) // 2, h // 14, w // 14]
    assert out["second_per_grid_ts"][0] == pytest.approx(2 / (len(keep) / n * video_fps), rel=1e-6)
    assert int((out["input_ids"] == processor.video_token_id).sum()) == len(keep) // 2 * h * w // 784


def test_extreme_aspect_ratios_are_rejected_naming_the_file(tmp_path):
    Image.new("RGB", (201, 1)).save(tmp_path / "wide.png")
    Image.new("RGB", (200, 1)).save(tmp_path / "ok.png")
    with pytest.raises(ValueError, match=r"wide\.png is 201x1 pixels: its aspect ratio 201 exceeds 200 "
                                         r"\(qwen-vl-utils' MAX_RATIO\)") as err:
        media.load_image(tmp_path / "wide.png")
    assert "\n" not in str(err.value)
    assert media.load_image(tmp_path / "ok.png").size == (200, 1)
    np.save(tmp_path / "tall.npy", np.zeros((4, 300, 1, 3), np.uint8))
    with pytest.raises(ValueError, match=r"video .*tall\.npy is 1x300 pixels: its aspect ratio 300 exceeds 200 "
                                         r"\(qwen-vl-utils' MAX_RATIO\)"):
        media.load_video(tmp_path / "tall.npy", sizes=media.InputSizes())


@pytest.mark.parametrize("flag,value,message", [
    ("min_pixels", "300000", "min_pixels must be in [784, max_pixels=200704], got 300000"),
    ("max_pixels", "100", "max_pixels must be >= 784, got 100"),
    ("video_min_pixels", "200000", "video_min_pixels must be in [784, video_max_pixels=100352], got 200000"),
    ("fps", "0", "fps must be > 0 (frames kept per second of video), got 0.0"),
    ("fps", "-1", "fps must be > 0 (frames kept per second of video), got -1.0"),
    ("min_frames", "20", "min_frames must be in [1, max_frames=16], got 20"),
    ("min_frames", "0", "min_frames must be in [1, max_frames=16], got 0"),
    ("max_frames", "1", "max_frames must be >= 2 (frames are kept in pairs), got 1")])
def test_bad_settings_fail_at_parse_time_with_the_allowed_range(flag, value, message):
    args = ["--model", "some/model", "--dataset", "rows.jsonl", f"--{flag}", value]
    if flag == "max_frames":
        args += ["--min_frames", "1"]
    with pytest.raises(ConfigError) as err:
        parse_config(args)
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:  # eval.py: the same check among its cheap ones, before anything loads
        evaluate.check_args(evaluate.parse_args(args))
    assert str(err.value) == message
    kwargs = {flag: float(value) if flag == "fps" else int(value)}
    kwargs.update({"min_frames": 1} if flag == "max_frames" else {})
    with pytest.raises(ValueError) as err:  # lmms-eval model_args: before the model is looked up
        engine.SparseQwen("no/such-model", **kwargs)
    assert str(err.value) == message


def test_the_toy_keeps_its_sizes_and_frames(tmp_path):
    """The toy's preset equals its processor's limits, and its 8-frame 2 fps videos keep all frames, as before."""
    import json
    config = json.loads((toy.SHIPPED_MODEL / "preprocessor_config.json").read_text())["size"]
    sizes = media.InputSizes(**toy.TOY_INPUT_SIZES)
    assert sizes.images_kwargs()["size"] == config and sizes.videos_kwargs()["size"] == config
    assert media_files.frame_picker(sizes=sizes)(8, toy.VIDEO_FPS) == media_files.kept_frame_indices(8, 8)
    cfg = parse_config([])
    assert media_files.input_sizes(cfg) == sizes
    toy.write_toy_dataset(tmp_path / "q", 6, seed=1)
    from zipr1_support import data
    for row in data.load_dataset_rows(str(tmp_path / "q")).rows:
        new, old = data.prompt_item(row, sizes=sizes), data.prompt_item(row, 8)
        assert [len(v) for v in new["videos"]] == [len(v) for v in old["videos"]] and new["fps"] == old["fps"]
        assert all(a.tobytes() == b.tobytes() for v, u in zip(new["videos"], old["videos"]) for a, b in zip(v, u))


@pytest.mark.parametrize("n,fps", [(90, 10), (25, 10), (12, 4), (300, 25)])
def test_mp4_keeps_video_r1s_frames(tmp_path, n, fps):
    """PyAV path (.mp4, fps from the stream): the kept frames are the reference indices of all decoded frames."""
    import av
    from test_media import write_mp4
    path = write_mp4(tmp_path / "clip.mp4", n=n, fps=fps)
    with av.open(str(path)) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    keep = ref_frame_indices(len(every), fps)
    frames, rate = media.load_video(path, sizes=media.InputSizes())
    assert len(every) == n and len(frames) == len(keep)
    assert all(np.array_equal(np.asarray(f), every[i]) for f, i in zip(frames, keep))
    assert rate == pytest.approx(fps * len(keep) / n, rel=1e-9)
