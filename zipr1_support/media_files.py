"""Images and videos from disk: RGB PIL images, and uniformly subsampled video frames where only the kept frames are
decoded; plus the cheap check data.py runs on every media file at load time.

    load_image(path)                 RGB PIL image (to_rgb: every PIL mode, 16-bit and float scaled, alpha on white)
    load_video(path, max_frames, sizes)  (frames, fps of the kept frames): a folder of frames, .gif/.webp, .npy, or
                                     any container PyAV decodes (.mp4, ...)
    InputSizes                       Video-R1's input sizes (pixels per image / frame, frames per video), checked
    smart_nframes(...)               how many frames Video-R1 keeps of a video
    check_media(path, data_type)     the image header (and PNG checksums), or a video's first frame; an aspect ratio
                                     above MAX_RATIO, or more pixels than PIL allows, is a bad row here already

Errors are one line naming the file: FileNotFoundError when missing, ValueError when unreadable.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_FPS = 2.0  # frames per second assumed for frame folders and .npy videos (no timing stored)
WIDE_GREY_MAX = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}  # white


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB of an image in any PIL mode. 16-bit and 32-bit grey (I;16*, I: 16-bit samples, as PIL opens 16-bit PNG
    and TIFF) are scaled from 0..65535 and float grey (F) from 0..1 to 0..255, not clipped (PIL's own convert clips
    them: a 16-bit image turns white); transparent pixels are laid on white (qwen-vl-utils' to_rgb); the other modes
    (1, L, P, RGB, CMYK, YCbCr, ...) by PIL's convert."""
    if img.mode in WIDE_GREY_MAX:
        grey = np.asarray(img, dtype=np.float64) * (255 / WIDE_GREY_MAX[img.mode])  # (H, W) on 0..255
        return Image.fromarray(np.rint(np.clip(grey, 0, 255)).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")

# Video-R1's input sizes: the constants of its bundled qwen-vl-utils (src/qwen-vl-utils/src/qwen_vl_utils/
# vision_process.py, module top), which its trainer uses unchanged (grpo_trainer.py calls process_vision_info on
# messages that set no sizes). Names as there.
IMAGE_FACTOR = 28  # sides are multiples of patch 14 x merge 2
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 256 * 28 * 28  # per image
MAX_RATIO = 200  # longest / shortest side; Qwen2-VL's smart_resize rejects more
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 128 * 28 * 28  # per frame
FRAME_FACTOR, FPS, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 2, 2.0, 4, 16  # frames: even count, 2 per second, 4..16


@dataclass(frozen=True)
class InputSizes:
    """Pixels per image and per video frame, and the frame sampling of videos; Video-R1's values by default.

    Images are resized by the processor's smart_resize into [min_pixels, max_pixels]; video frames into
    [video_min_pixels, video_pixel_limit()]; a video keeps smart_nframes(total, its fps, fps, min_frames, max_frames)
    frames. A ValueError of one line names the first setting outside its range.
    """
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    video_min_pixels: int = VIDEO_MIN_PIXELS
    video_max_pixels: int = VIDEO_MAX_PIXELS
    fps: float = FPS
    min_frames: int = FPS_MIN_FRAMES
    max_frames: int = FPS_MAX_FRAMES

    def __post_init__(self):
        for name, message in self.problems().items():
            raise ValueError(f"{name} must be {message}, got {getattr(self, name)}")

    def problems(self) -> dict:
        """{setting: allowed range} of each setting outside its range (an upper limit before the lower one)."""
        one = IMAGE_FACTOR * IMAGE_FACTOR
        checks = {"max_pixels": (self.max_pixels >= one, f">= {one}"),
                  "min_pixels": (one <= self.min_pixels <= self.max_pixels,
                                 f"in [{one}, max_pixels={self.max_pixels}]"),
                  "video_max_pixels": (self.video_max_pixels >= one, f">= {one}"),
                  "video_min_pixels": (one <= self.video_min_pixels <= self.video_max_pixels,
                                       f"in [{one}, video_max_pixels={self.video_max_pixels}]"),
                  "fps": (self.fps > 0 and math.isfinite(self.fps), "> 0 (frames kept per second of video)"),
                  "min_frames": (1 <= self.min_frames <= self.max_frames, f"in [1, max_frames={self.max_frames}]"),
                  "max_frames": (self.max_frames >= FRAME_FACTOR, f">= {FRAME_FACTOR} (frames are kept in pairs)")}
        return {name: allowed for name, (ok, allowed) in checks.items() if not ok}

    def video_pixel_limit(self) -> int:
        """The per-frame max_pixels qwen-vl-utils really applies (vision_process.py, fetch_video): max(video_max_pixels,
        int(1.05 video_min_pixels)), at the defaults 105,369, not 100,352. (Its per-video budget, total_pixels / frames
        x 2 with total_pixels ~ 90M, is left out: it binds only above 1,800 frames or 11M pixels per frame.)"""
        return max(self.video_max_pixels, int(self.video_min_pixels * 1.05))

    def images_kwargs(self) -> dict:
        """The processor's per-call image settings (HF: images_kwargs=...; size, since min/max_pixels are deprecated
        there): its smart_resize keeps shortest_edge <= height x width <= longest_edge."""
        return {"size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}

    def videos_kwargs(self) -> dict:
        """The processor's per-call video-frame settings (HF: videos_kwargs=...)."""
        return {"size": {"shortest_edge": self.video_min_pixels, "longest_edge": self.video_pixel_limit()}}


def input_sizes(settings) -> InputSizes:
    """The InputSizes of a settings object holding its fields (train_config.Config, eval.EvalConfig)."""
    return InputSizes(**{name: getattr(settings, name) for name in InputSizes.__dataclass_fields__})


def smart_nframes(total, video_fps, fps=FPS, min_frames=FPS_MIN_FRAMES, max_frames=FPS_MAX_FRAMES) -> int:
    """Frames Video-R1 keeps of a `total`-frame video recorded at `video_fps` (qwen-vl-utils vision_process.py,
    smart_nframes, the `fps` branch): `fps` frames per second of video, clamped to [min_frames rounded up to even,
    max_frames and total rounded down to even], rounded down to even. Deliberate deviation: a 1-frame video keeps its
    frame (qwen-vl-utils raises; the processor repeats it to fill the temporal patch)."""
    if total < FRAME_FACTOR:
        return total
    low = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    high = math.floor(min(max_frames, total) / FRAME_FACTOR) * FRAME_FACTOR
    wanted = total / video_fps * fps
    return math.floor(min(max(wanted, low), high) / FRAME_FACTOR) * FRAME_FACTOR


def load_image(path):
    """RGB PIL image (to_rgb); FileNotFoundError / ValueError naming the path when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            image = to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None  # PIL's errors for a corrupt file
    check_shape(path, image.size)
    return image


FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # a folder of frames: these files, sorted by name
SEEK_AHEAD_S = 4.0  # PyAV: a kept frame more than this far ahead is reached by seeking to its keyframe


def kept_frame_indices(total, max_frames):
    """Uniform sampling of <= max_frames of `total` frames: round(linspace(0, total - 1, k))."""
    return np.linspace(0, total - 1, min(max_frames, total)).round().astype(int).tolist()


def frame_picker(max_frames=16, sizes=None):
    """pick(total, video_fps) -> kept frame indices: Video-R1's rule when `sizes` (InputSizes) is given, n =
    smart_nframes(...) and indices round(linspace(0, total - 1, n)) as qwen-vl-utils' video readers
    (_read_video_decord / _read_video_torchvision: torch.linspace(...).round()); else the toy's min(max_frames,
    total). (linspace in float64 here, float32 there: with n even no index lies within 1/30 of a .5 tie.)"""
    if sizes is None:
        return lambda total, video_fps: kept_frame_indices(total, max_frames)
    def pick(total, video_fps):
        n = smart_nframes(total, video_fps, sizes.fps, sizes.min_frames, sizes.max_frames)
        return np.linspace(0, total - 1, n).round().astype(int).tolist()
    return pick


def _pyav():
    try:
        import av
    except ImportError:
        return None
    return av


def _no_pyav(path):
    return ValueError(f"cannot read video {path}: decoding {path.suffix or 'this format'} needs PyAV (`pip install "
                      "av`, pinned in requirements.txt); or pass a folder of frames, a .gif/.webp or a .npy")


def _frame_count(container, stream):
    """Frames in the stream: the container's count when it stores one, else its packets (demuxed, not decoded)."""
    if stream.frames:
        return int(stream.frames)
    count = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return count


def _pyav_frames(path, pick):
    """(kept RGB frames, fps, total frames, frames decoded): only the kept frames become PIL images, and a kept frame
    far ahead is reached by seeking to the keyframe before it rather than decoding everything in between."""
    av = _pyav()
    if av is None:
        raise _no_pyav(path)
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} holds no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
        total = _frame_count(container, stream)
        start, base = stream.start_time or 0, stream.time_base
        frames, decoded, index, decoder, timed = [], 0, -1, None, None  # timed: frames carry timestamps
        for target in pick(total, fps) if total else []:
            if decoder is None or (timed and target - index > SEEK_AHEAD_S * fps):
                if decoder is not None:  # to the keyframe at or before the target's timestamp
                    container.seek(start + int(target / fps / base), stream=stream, backward=True)
                decoder = container.decode(stream)
            for frame in decoder:
                decoded += 1
                if timed is None:
                    timed = frame.pts is not None and base is not None
                index = round(float((frame.pts - start) * base) * fps) if timed else index + 1  # this frame's index
                if index >= target:
                    frames.append(frame.to_image().convert("RGB"))
                    break
            else:  # the stream ended before its count said: keep what was found
                break
        return frames, fps, total, decoded


def _animated_frames(path, pick):
    """(kept RGB frames, fps, total) of an animated GIF/WebP: only the kept frames are converted."""
    with Image.open(path) as img:
        total = getattr(img, "n_frames", 1)
        img.load()  # WebP reports the first frame's duration only once it is loaded (GIF at open)
        duration_ms = img.info.get("duration") or 0
        fps = 1000.0 / duration_ms if duration_ms else DEFAULT_FPS
        frames = []
        for i in pick(total, fps):
            img.seek(i)
            frames.append(img.convert("RGB"))
    return frames, fps, total


def _npy_frames(path, pick):
    array = np.load(path, mmap_mode="r")  # the header only; the kept frames are read below
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"{path}: expected a (T,H,W,3) uint8 array, got {array.shape} {array.dtype}")
    keep = pick(len(array), DEFAULT_FPS) if len(array) else []
    return [Image.fromarray(np.asarray(array[i])) for i in keep], DEFAULT_FPS, len(array)


def _read_video(path, pick):
    """(kept frames, fps, total frames) of any source load_video accepts."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        keep = pick(len(files), DEFAULT_FPS) if files else []
        return [load_image(files[i]) for i in keep], DEFAULT_FPS, len(files)
    suffix = path.suffix.lower()
    if suffix in (".gif", ".webp"):
        return _animated_frames(path, pick)
    if suffix == ".npy":
        return _npy_frames(path, pick)
    return _pyav_frames(path, pick)[:3]


def _first_frame(total, fps):
    return [0]


def load_video(path, max_frames=16, sizes=None):
    """(frames, fps): RGB PIL frames, uniformly subsampled, and the fps of the kept frames.

    Kept frames: with `sizes` (InputSizes) Video-R1's rule (frame_picker: smart_nframes of the video's length and
    fps); without, min(max_frames, total) (the toy's rule). The fps of the kept frames is the video's fps x kept /
    total, qwen-vl-utils' sample_fps (the processor turns it into second_per_grid_ts, see media.encode_prompts).

    Sources: a folder of frame images (sorted by name, fps = DEFAULT_FPS), animated .gif/.webp (fps from the frame
    duration), .npy (T,H,W,3) uint8 (fps = DEFAULT_FPS), other containers (mp4, ...) through PyAV. Only the kept
    frames are decoded to images (a 10-minute 30 fps mp4 does not become 18k PIL frames).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video not found: {path}")
    av = _pyav()
    errors = (UnidentifiedImageError, OSError, EOFError, SyntaxError, Image.DecompressionBombError) + \
        ((av.error.FFmpegError,) if av else ())
    try:
        frames, fps, total = _read_video(path, frame_picker(max_frames, sizes))
    except errors as err:
        raise ValueError(f"cannot read video {path}: {err}") from None
    if not frames:
        raise ValueError(f"video {path} holds no frames")
    check_shape(path, frames[0].size, "video")
    return frames, fps * len(frames) / total


MEDIA_ERRORS = (UnidentifiedImageError, OSError, EOFError, SyntaxError, ValueError,  # what PIL raises on bad files
                Image.DecompressionBombError)  # more than twice Image.MAX_IMAGE_PIXELS


def check_shape(path, size, data_type="image"):
    """ValueError naming the file when an image or frame of `size` (width, height) is empty or too elongated."""
    if min(size) < 1:
        raise ValueError(f"{data_type} {path} has size {size}")
    if max(size) / min(size) > MAX_RATIO:
        raise ValueError(f"{data_type} {path} is {size[0]}x{size[1]} pixels: its aspect ratio "
                         f"{max(size) / min(size):.0f} exceeds {MAX_RATIO} (qwen-vl-utils' MAX_RATIO)")


def _check_image_file(path):
    with Image.open(path) as img:
        img.verify()  # PNG: every chunk's checksum; other formats: the header (no pixels are decoded)
        check_shape(path, img.size)


def _check_video_file(path):
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"video {path} holds no frames")
        for frame in files:
            _check_image_file(frame)
    elif path.suffix.lower() in (".gif", ".webp"):
        with Image.open(path) as img:
            if getattr(img, "n_frames", 1) < 1 or min(img.size) < 1:
                raise ValueError(f"video {path} holds no frames")
            img.seek(0)
            img.load()  # the first frame decodes
            check_shape(path, img.size, "video")
    else:  # .npy: the header's shape and dtype, and the first frame; others: the container opens, a frame decodes
        read = _npy_frames if path.suffix.lower() == ".npy" else _pyav_frames
        frames = read(path, _first_frame)[0]
        if not frames:
            raise ValueError(f"video {path} holds no frames")
        check_shape(path, frames[0].size, "video")


def check_media(path, data_type):
    """Cheap check that `path` can be read as `data_type` ("image" or "video"): the image header (and PNG checksums),
    or a video's first frame. ValueError naming the path when not; FileNotFoundError when missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{data_type} not found: {path}")
    av = _pyav()
    errors = MEDIA_ERRORS + ((av.error.FFmpegError,) if av else ())
    try:
        _check_image_file(path) if data_type == "image" else _check_video_file(path)
    except errors as err:
        ours = str(err).startswith((str(path), f"{data_type} {path}"))  # ValueErrors above already name the file
        message = str(err) if ours else f"cannot read {data_type} {path}: {err}"
        raise ValueError(message.splitlines()[0]) from None
