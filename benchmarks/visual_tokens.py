"""Visual tokens per image and per video at Video-R1's input sizes (the defaults) vs the project's old ones.

    python benchmarks/visual_tokens.py [--samples 400] [--seed 0]

A sample of real-sized media is drawn (sizes only: typical photo, screenshot, document and phone sizes; videos of
typical resolutions, lengths and frame rates) and each item's visual-token count is computed from its size with the
processor's own arithmetic (transformers' Qwen2-VL smart_resize, 14 px patches merged 2x2, 2 frames per temporal
patch), so no pixels are decoded:

    new  images in [min_pixels, max_pixels] = [4, 256] x 28^2; video frames in [128 x 28^2, 105,369] (qwen-vl-utils'
         fetch_video limit), smart_nframes(total, fps) frames (2 per second, 4..16, even)
    old  images and video frames at Qwen2.5-VL's preprocessor max_pixels 12,845,056 (full size below that);
         min(16, total) frames per video

Prints a histogram (items per token range) and summary figures for each; benchmarks/RESULTS.md keeps a run.
"""
import argparse
import math
import platform
import sys
from pathlib import Path

import numpy as np
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from zipr1_support.media_files import InputSizes, smart_nframes  # noqa: E402

OLD_MAX_PIXELS, OLD_MIN_PIXELS, OLD_MAX_FRAMES = 12_845_056, 56 * 56, 16  # Qwen2.5-VL preprocessor_config.json
PHOTOS = [(4000, 3000), (4032, 3024), (3024, 4032), (6000, 4000), (4608, 3456), (1600, 1200), (1024, 768), (800, 600),
          (640, 480), (2048, 1536)]
SCREENS = [(1920, 1080), (2560, 1440), (1366, 768), (1170, 2532), (2880, 1800), (750, 1334), (1280, 720),
           (3840, 2160), (1080, 2400), (1440, 900)]
DOCUMENTS = [(850, 1100), (1654, 2339), (2480, 3508), (512, 512), (336, 336), (224, 224), (1200, 800), (300, 200),
             (640, 640), (1000, 400)]
RESOLUTIONS = [(640, 360), (854, 480), (1280, 720), (1920, 1080), (3840, 2160), (720, 1280), (480, 480), (320, 240)]
SECONDS = [2, 3, 5, 8, 10, 15, 30, 60, 120, 180, 600]
RATES = [24.0, 25.0, 29.97, 30.0, 60.0]
BINS = [0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 10 ** 9]


def image_tokens(width, height, min_pixels, max_pixels):
    h, w = smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    return h * w // (28 * 28)


def video_tokens(width, height, total, fps, new=True, sizes=InputSizes()):
    """Tokens of a `total`-frame video at `fps`: frames kept, padded to pairs, each resized."""
    if new:
        frames = smart_nframes(total, fps, sizes.fps, sizes.min_frames, sizes.max_frames)
        per_frame = image_tokens(width, height, sizes.video_min_pixels, sizes.video_pixel_limit())
    else:
        frames = min(OLD_MAX_FRAMES, total)
        per_frame = image_tokens(width, height, OLD_MIN_PIXELS, OLD_MAX_PIXELS)
    return math.ceil(frames / 2) * per_frame


def sample(n, seed):
    """(images [(w, h)], videos [(w, h, total frames, fps)]), n of each."""
    rng = np.random.default_rng(seed)
    kinds = [PHOTOS, SCREENS, DOCUMENTS]
    images = [kinds[rng.integers(3)][rng.integers(10)] for _ in range(n)]
    videos = []
    for _ in range(n):
        (w, h), seconds, fps = RESOLUTIONS[rng.integers(len(RESOLUTIONS))], SECONDS[rng.integers(len(SECONDS))], \
            RATES[rng.integers(len(RATES))]
        videos.append((w, h, max(1, round(seconds * fps)), fps))
    return images, videos


def histogram(counts):
    hist, _ = np.histogram(counts, BINS)
    return hist


def label(lo, hi):
    return f"{lo:,}-{hi - 1:,}" if hi < 10 ** 9 else f">= {lo:,}"


def report(name, old, new):
    old, new = np.array(old), np.array(new)
    lines = [f"### {name} ({len(old)})", "", "| tokens | old | new |", "|---|---|---|"]
    lines += [f"| {label(lo, hi)} | {a} | {b} |" for lo, hi, a, b in zip(BINS, BINS[1:], histogram(old), histogram(new))
              if a or b]
    ratio = old / new
    lines += ["", f"median old {int(np.median(old)):,} / new {int(np.median(new)):,}; mean old {old.mean():,.0f} / "
              f"new {new.mean():,.0f}; max old {old.max():,} / new {new.max():,}; total ratio old/new "
              f"{old.sum() / new.sum():.1f}x; per-item ratio {ratio.min():.1f}x to {ratio.max():.1f}x", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400, help="images and videos drawn, each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    images, videos = sample(args.samples, args.seed)
    sizes = InputSizes()
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}; "
          f"sample seed {args.seed}")
    print(f"new = {sizes}\n")
    print(report("images", [image_tokens(w, h, OLD_MIN_PIXELS, OLD_MAX_PIXELS) for w, h in images],
                 [image_tokens(w, h, sizes.min_pixels, sizes.max_pixels) for w, h in images]))
    print(report("videos", [video_tokens(*v, new=False) for v in videos], [video_tokens(*v) for v in videos]))
    print("examples (old -> new tokens):")
    print(f"  1920x1080 image: {image_tokens(1920, 1080, OLD_MIN_PIXELS, OLD_MAX_PIXELS):,} -> "
          f"{image_tokens(1920, 1080, sizes.min_pixels, sizes.max_pixels):,}")
    print(f"  4000x3000 photo: {image_tokens(4000, 3000, OLD_MIN_PIXELS, OLD_MAX_PIXELS):,} -> "
          f"{image_tokens(4000, 3000, sizes.min_pixels, sizes.max_pixels):,}")
    for seconds, fps in ((5, 30.0), (10, 30.0), (60, 30.0)):
        total = round(seconds * fps)
        print(f"  {seconds} s 1080p clip at {fps:g} fps ({total} frames): "
              f"{video_tokens(1920, 1080, total, fps, new=False):,} -> {video_tokens(1920, 1080, total, fps):,} "
              f"({smart_nframes(total, fps)} frames)")


if __name__ == "__main__":
    main()
