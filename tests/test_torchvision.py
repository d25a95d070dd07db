"""With torchvision installed, transformers builds its real Qwen2.5-VL processor (torchvision image and video
processors) and media.load_processor returns it; without torchvision it returns FallbackProcessor. The two paths must
give the model the same inputs. This file compares them against transformers' real processor wherever torchvision
imports: CI's second leg installs it and sets ZIPR1_REQUIRE_TORCHVISION=1, so these tests fail there instead of
skipping (docs/lmms_eval.md, "With torchvision")."""
import importlib.util
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from zipr1_support import media

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
if os.environ.get("ZIPR1_REQUIRE_TORCHVISION") == "1" and not HAS_TORCHVISION:
    raise RuntimeError("ZIPR1_REQUIRE_TORCHVISION=1 but torchvision is not installed")
needs_torchvision = pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision not installed (CI's second leg "
                                                                   "runs these with ZIPR1_REQUIRE_TORCHVISION=1)")


@pytest.fixture(scope="module")
def real(tiny_model_dir):
    """media.load_processor's choice: transformers' own processor wherever torchvision imports."""
    return media.load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def fallback(tiny_model_dir):
    return media.FallbackProcessor.from_pretrained(tiny_model_dir)


def smooth_frames(n, height, width, seed):
    """Frames of smooth colour gradients, different per frame and channel: interpolation changes them little, a
    wrong patch layout (time, channel or space swapped) changes them a lot."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    frames = []
    for _ in range(n):
        a, b, c = rng.uniform(0.2, 1.0, (3, 3))
        rgb = np.stack([128 + 100 * np.sin(a[k] * 6 * x + b[k] * 6 * y + c[k] * 6) for k in range(3)], -1)
        frames.append(Image.fromarray(rgb.round().astype(np.uint8)))
    return frames


def item(images=(), videos=(), fps=None, sizes=None):
    return media.chat_item(media.question_text("what moves?", ["A. yes", "B. no"]), images, videos, fps,
                           sizes=sizes)


def ref_grid(height, width, min_pixels, max_pixels, factor=28):
    """qwen-vl-utils' smart_resize (Video-R1's vision_process.py), typed in again, as (h/14, w/14)."""
    h_bar, w_bar = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar // 14, w_bar // 14


def assert_same_tokens(ours, theirs):
    assert set(ours) == set(theirs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "video_grid_thw"):
        if key in theirs:
            assert torch.equal(ours[key], theirs[key]), key
    if "second_per_grid_ts" in theirs:
        assert torch.allclose(torch.as_tensor(ours["second_per_grid_ts"], dtype=torch.float64),
                              torch.as_tensor(theirs["second_per_grid_ts"], dtype=torch.float64)), "second_per_grid_ts"


def test_load_processor_takes_the_real_processor_exactly_when_torchvision_exists(real):
    if HAS_TORCHVISION:
        assert not isinstance(real, media.FallbackProcessor)
        assert type(real).__name__ == "Qwen2_5_VLProcessor" and real.video_processor is not None
    else:
        assert isinstance(real, media.FallbackProcessor)


@needs_torchvision
def test_video_without_resize_equals_transformers_video_processor(real, fallback):
    """Frames already on the 28-pixel grid inside the per-frame limits (wider than Video-R1's 128·28², which
    resizes every frame): no resize, so only the patch layout, the padding of T to the temporal patch and the
    normalisation remain, and they must agree to float rounding."""
    sizes = media.InputSizes(video_min_pixels=4 * 784, video_max_pixels=256 * 784)
    batch = [item(videos=[smooth_frames(4, 224, 224, 0)], fps=[2.0], sizes=sizes),
             item(videos=[smooth_frames(5, 56, 84, 1), smooth_frames(2, 112, 56, 2)], fps=[1.0, 0.5], sizes=sizes)]
    theirs, ours = media.encode_prompts(real, batch), media.encode_prompts(fallback, batch)
    assert_same_tokens(ours, theirs)
    assert theirs["video_grid_thw"].tolist() == [[2, 16, 16], [3, 4, 6], [1, 8, 4]]
    assert theirs["second_per_grid_ts"].tolist() == pytest.approx([1.0, 2.0, 4.0])
    scale = float(theirs["pixel_values_videos"].abs().max())
    torch.testing.assert_close(ours["pixel_values_videos"], theirs["pixel_values_videos"], rtol=0,
                               atol=1e-5 * scale)


@needs_torchvision
@pytest.mark.parametrize("height,width", [(224, 224), (300, 500), (1080, 1920), (50, 700)])
def test_video_resize_gives_transformers_grid_and_close_pixels(real, fallback, height, width):
    """Frames that must be resized (Video-R1's 128·28² per frame): the same grid as qwen-vl-utils' smart_resize in
    both paths; pixels differ only by interpolation (torchvision's bicubic against PIL's), far below a layout error."""
    sizes = media.InputSizes()
    batch = [item(videos=[smooth_frames(4, height, width, 3)], fps=[2.0], sizes=sizes)]
    theirs, ours = media.encode_prompts(real, batch), media.encode_prompts(fallback, batch)
    assert_same_tokens(ours, theirs)
    limit = max(sizes.video_max_pixels, int(1.05 * sizes.video_min_pixels))  # qwen-vl-utils' per-frame cap
    assert theirs["video_grid_thw"][0, 1:].tolist() == list(ref_grid(height, width, sizes.video_min_pixels, limit))
    a, b = ours["pixel_values_videos"], theirs["pixel_values_videos"]
    scrambled = b.view(b.shape[0], 3, 2, -1).flip(2).reshape(b.shape)  # the two frames of each patch swapped
    level = 1 / 255 / min(fallback.video_processor.image_std)  # one uint8 step after normalisation
    assert (a - b).abs().max().item() <= 3 * level  # interpolation: at most a few uint8 steps on a pixel
    error, layout_error = (a - b).abs().mean().item(), (scrambled - b).abs().mean().item()
    assert error < 1e-3 * b.abs().mean().item() < layout_error / 100, (error, layout_error)


@needs_torchvision
@pytest.mark.parametrize("height,width", [(224, 224), (333, 517), (1080, 1920)])
def test_images_give_transformers_grid_and_close_pixels(real, fallback, height, width):
    """Images at Video-R1's sizes through the torchvision image processor and the PIL one."""
    batch = [item(images=smooth_frames(1, height, width, 4), sizes=media.InputSizes())]
    theirs, ours = media.encode_prompts(real, batch), media.encode_prompts(fallback, batch)
    assert_same_tokens(ours, theirs)
    sizes = media.InputSizes()
    assert theirs["image_grid_thw"][0, 1:].tolist() == list(ref_grid(height, width, sizes.min_pixels,
                                                                     sizes.max_pixels))
    a, b = ours["pixel_values"], theirs["pixel_values"]
    if (height, width) == (224, 224):  # no resize: equal to float rounding
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
    level = 1 / 255 / min(fallback.image_processor.image_std)  # one uint8 step after normalisation
    assert (a - b).abs().max().item() <= 3 * level
    assert (a - b).abs().mean().item() < 1e-3 * b.abs().mean().item()


@needs_torchvision
def test_model_logits_equal_on_both_paths_without_resize(tiny_model_dir, real, fallback):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    sizes = media.InputSizes(video_min_pixels=4 * 784, video_max_pixels=256 * 784)
    batch = [item(images=smooth_frames(1, 112, 140, 5), videos=[smooth_frames(4, 84, 112, 6)], fps=[2.0],
                  sizes=sizes)]
    with torch.no_grad():
        theirs = model(**media.encode_prompts(real, batch)).logits  # (1, L, V)
        ours = model(**media.encode_prompts(fallback, batch)).logits  # (1, L, V)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * float(theirs.abs().max()))
