"""Images and videos from disk: RGB PIL images, and uniformly subsampled video frames where only the kept frames are
decoded; plus the cheap check data.py runs on every media file at load time.

    load_image(path)                 RGB PIL image
    load_video(path, max_frames)     (frames, fps of the kept frames): a folder of frames, .gif/.webp, .npy, or any
                                     container PyAV decodes (.mp4, ...)
    check_media(path, data_type)     the image header (and PNG checksums), or a video's first frame

Errors are one line naming the file: FileNotFoundError when missing, ValueError when unreadable.
"""
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_FPS = 2.0  # frames per second assumed for frame folders and .npy videos (no timing stored)


def load_image(path):
    """RGB PIL image; FileNotFoundError / ValueError naming the path when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as err:  # PIL's errors for a corrupt file
        raise ValueError(f"cannot read image {path}: {err}") from None


FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # a folder of frames: these files, sorted by name
SEEK_AHEAD_S = 4.0  # PyAV: a kept frame more than this far ahead is reached by seeking to its keyframe


def kept_frame_indices(total, max_frames):
    """Uniform sampling of <= max_frames of `total` frames: round(linspace(0, total - 1, k))."""
    return np.linspace(0, total - 1, min(max_frames, total)).round().astype(int).tolist()


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


def _pyav_frames(path, max_frames):
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
        for target in kept_frame_indices(total, max_frames) if total else []:
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


def _animated_frames(path, max_frames):
    """(kept RGB frames, fps, total) of an animated GIF/WebP: only the kept frames are converted."""
    with Image.open(path) as img:
        total = getattr(img, "n_frames", 1)
        duration_ms = img.info.get("duration") or 0
        frames = []
        for i in kept_frame_indices(total, max_frames):
            img.seek(i)
            frames.append(img.convert("RGB"))
    return frames, (1000.0 / duration_ms if duration_ms else DEFAULT_FPS), total


def _npy_frames(path, max_frames):
    array = np.load(path, mmap_mode="r")  # the header only; the kept frames are read below
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"{path}: expected a (T,H,W,3) uint8 array, got {array.shape} {array.dtype}")
    keep = kept_frame_indices(len(array), max_frames) if len(array) else []
    return [Image.fromarray(np.asarray(array[i])) for i in keep], DEFAULT_FPS, len(array)


def _read_video(path, max_frames):
    """(kept frames, fps, total frames) of any source load_video accepts."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        keep = kept_frame_indices(len(files), max_frames) if files else []
        return [load_image(files[i]) for i in keep], DEFAULT_FPS, len(files)
    suffix = path.suffix.lower()
    if suffix in (".gif", ".webp"):
        return _animated_frames(path, max_frames)
    if suffix == ".npy":
        return _npy_frames(path, max_frames)
    return _pyav_frames(path, max_frames)[:3]


def load_video(path, max_frames=16):
    """(frames, fps): RGB PIL frames, uniformly subsampled to <= max_frames, and the fps of the kept frames.

    Sources: a folder of frame images (sorted by name, fps = DEFAULT_FPS), animated .gif/.webp (fps from the frame
    duration), .npy (T,H,W,3) uint8 (fps = DEFAULT_FPS), other containers (mp4, ...) through PyAV. Only the kept
    frames are decoded to images (a 10-minute 30 fps mp4 does not become 18k PIL frames).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video not found: {path}")
    av = _pyav()
    errors = (UnidentifiedImageError, OSError, EOFError, SyntaxError) + ((av.error.FFmpegError,) if av else ())
    try:
        frames, fps, total = _read_video(path, max_frames)
    except errors as err:
        raise ValueError(f"cannot read video {path}: {err}") from None
    if not frames:
        raise ValueError(f"video {path} holds no frames")
    return frames, fps * len(frames) / total


MEDIA_ERRORS = (UnidentifiedImageError, OSError, EOFError, SyntaxError, ValueError)  # what PIL raises on bad files


def _check_image_file(path):
    with Image.open(path) as img:
        img.verify()  # PNG: every chunk's checksum; other formats: the header (no pixels are decoded)
        if min(img.size) < 1:
            raise ValueError(f"image {path} has size {img.size}")


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
    elif path.suffix.lower() == ".npy":
        if not _npy_frames(path, 1)[2]:  # the header's shape and dtype, and the first frame
            raise ValueError(f"video {path} holds no frames")
    elif not _pyav_frames(path, 1)[0]:  # the container opens and its first frame decodes
        raise ValueError(f"video {path} holds no frames")


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
