"""Model inputs for Qwen2.5-VL / Qwen2-VL: processor (with or without torchvision), media loading, prompts.

`load_processor` returns transformers' own AutoProcessor when it can be built. Without torchvision (the video
processor needs it) it returns a `FallbackProcessor`: the tokenizer + the PIL image processor + `video_to_patches`,
producing the same keys and tensors as HF's processor for text, images and pre-sampled video frames.
"""
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, BatchFeature
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

# reading images and videos, and the load-time check: media_files.py (load_video is the entry point, here too)
from zipr1_support.media_files import DEFAULT_FPS, InputSizes, check_media, load_image, load_video  # noqa: F401

logger = logging.getLogger(__name__)
IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
HF_VIDEO_FPS = 24.0  # HF's VideoMetadata.sampled_fps when a video comes without fps
VIDEO_DEFAULTS = {"size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}}  # Qwen2VLVideoProcessor
VIDEO_KEYS = ("size", "min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "image_mean",
              "image_std", "resample", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb")
# Video-R1's prompt (github.com/tulerfeng/Video-R1, src/r1-v/src/open_r1/grpo.py: QUESTION_TEMPLATE, TYPE_TEMPLATE,
# make_conversation_image_and_video): the question, its reasoning instruction, then " " + the type's instruction
REASONING_INSTRUCTION = (
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer between the "
    "<answer> </answer> tags.")
PROMPT_TEMPLATES = ("video_r1", "answer_only")  # Video-R1's reasoning prompt / question + answer instruction only
TYPE_TEMPLATE = {  # Video-R1's answer-format instructions, per problem type (its leading space left out)
    "multiple choice": "Please provide only the single option letter (e.g., A, B, C, D, etc.) "
                       "within the <answer> </answer> tags.",
    "numerical": "Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "free-form": "Please provide your text answer within the <answer> </answer> tags.",
    "OCR": "Please transcribe text from the image/video clearly and provide your text answer within the "
           "<answer> </answer> tags.",
    "regression": "Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
}
_LOGGED = set()


class ModelNotAvailable(OSError):
    """The model is neither a local directory nor in the Hugging Face cache, and the hub cannot be used."""


def _log_once(name, message):
    if name not in _LOGGED:
        _LOGGED.add(name)
        logger.warning(message)


def _hub_offline():
    from huggingface_hub import constants
    transformers_offline = os.environ.get("TRANSFORMERS_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or transformers_offline


def resolve_model_dir(name):
    """Local directory holding `name` (a directory, or a hub id already in the HF cache); downloads only if online."""
    if os.path.isdir(name):
        return Path(name)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ModelNotAvailable(f"model directory {name} does not exist")
    from huggingface_hub import snapshot_download
    hint = (f"Model '{name}' is not available offline: download it with `huggingface-cli download {name}` "
            "on a machine with internet, or pass a local directory.")
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        if _hub_offline():
            raise ModelNotAvailable(hint) from None
    try:
        return Path(snapshot_download(name))
    except Exception as err:
        raise ModelNotAvailable(f"{hint} ({type(err).__name__})") from None


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model_dir(path):
    """The parsed config.json of model folder `path`, or ModelNotAvailable in one line: the folder is empty, its
    config.json is missing or not JSON (e.g. a torn copy), names no model_type, or no weights file is there."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        what = "is empty" if not any(path.iterdir()) else "holds no config.json"
        raise ModelNotAvailable(f"model directory {path} {what}: pass a folder written by save_pretrained")
    try:
        parsed = json.loads(config.read_text())
    except (ValueError, OSError) as err:
        raise ModelNotAvailable(f"{config} is not valid JSON ({str(err).splitlines()[0]}): a torn or partial copy?")
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise ModelNotAvailable(f"{config} names no model_type: not a transformers model config")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelNotAvailable(f"model directory {path} holds no weights ({' / '.join(WEIGHT_FILES[::2])})")
    return parsed


def _read_json(path):
    return json.loads(path.read_text()) if path.is_file() else None


def _video_config(model_dir):
    """HF's lookup order: processor_config.json['video_processor'] -> video_preprocessor_config.json -> image's."""
    nested = (_read_json(model_dir / "processor_config.json") or {}).get("video_processor")
    found = nested or _read_json(model_dir / "video_preprocessor_config.json") or \
        _read_json(model_dir / "preprocessor_config.json") or {}
    return {**VIDEO_DEFAULTS, **{k: v for k, v in found.items() if k in VIDEO_KEYS}}


def load_processor(model_name_or_dir):
    """HF AutoProcessor when it can be built, else a FallbackProcessor; ModelNotAvailable when not on disk offline."""
    model_dir = resolve_model_dir(str(model_name_or_dir))
    try:
        processor = AutoProcessor.from_pretrained(model_dir)
        if getattr(processor, "video_processor", None) is None:
            raise ImportError("the video processor needs torchvision")
        _log_once(str(model_dir), f"media: using transformers' {type(processor).__name__} for {model_name_or_dir}")
        return processor
    except ImportError as err:  # torchvision missing: HF cannot build its video processor
        reason = "torchvision is not installed" if "torchvision" in str(err).lower() else str(err).splitlines()[0]
    processor = FallbackProcessor.from_pretrained(model_dir)
    _log_once(str(model_dir), f"media: using FallbackProcessor (tokenizer + PIL image processor) for "
                              f"{model_name_or_dir}: transformers' processor unavailable ({reason})")
    return processor


def video_to_patches(frames, video_processor, **limits):
    """Flattened video patches exactly as HF's Qwen2-VL video processor lays them out.

    frames: T RGB frames (PIL or (T,H,W,3) uint8); each is resized (smart_resize), rescaled and normalised by the
    PIL image processor with temporal_patch_size=1; T is padded to a multiple of t_p by repeating the last frame.
    (HF resizes videos with torchvision, so when a resize happens pixels may differ from HF's by interpolation.)
    limits: optional size={"shortest_edge", "longest_edge"} (pixels per frame) for this call.
    Returns (patches (grid_t*grid_h*grid_w, C*t_p*p*p), grid (3,)), rows ordered (t, h/m, w/m, m_h, m_w).
    """
    tp = video_processor.temporal_patch_size
    frames = list(frames) + [frames[-1]] * (-len(frames) % tp)  # pad T to a multiple of t_p
    out = video_processor(frames, temporal_patch_size=1, return_tensors="pt", **limits)
    per_frame, grids = out["pixel_values"], out["image_grid_thw"]  # (T*gh*gw, C*p*p), (T, 3)
    if not bool((grids == grids[0]).all()):
        raise ValueError(f"video frames must share one size, got grids {grids.tolist()}")
    grid_h, grid_w = int(grids[0, 1]), int(grids[0, 2])
    x = per_frame.view(len(frames) // tp, tp, grid_h * grid_w, 3, -1)  # (gt, tp, hw, C, p*p)
    x = x.permute(0, 2, 3, 1, 4)  # (gt, hw, C, tp, p*p): temporal axis sits between channel and pixels, as HF
    grid = torch.tensor([len(frames) // tp, grid_h, grid_w])
    return x.reshape(grid.prod().item(), -1), grid


class FallbackProcessor:
    """The parts of Qwen2(.5)-VL's processor this project uses, built without torchvision."""

    def __init__(self, tokenizer, image_processor, video_config, with_second_per_grid=True):
        self.tokenizer, self.image_processor, self.video_config = tokenizer, image_processor, dict(video_config)
        self.video_processor = Qwen2VLImageProcessorPil(**self.video_config)  # same resize/normalise, video sizes
        self.with_second_per_grid = with_second_per_grid  # Qwen2.5-VL returns second_per_grid_ts, Qwen2-VL not
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        if tokenizer.unk_token_id in (self.image_token_id, self.video_token_id) or self.image_token_id is None:
            raise ValueError(f"tokenizer lacks {IMAGE_TOKEN} / {VIDEO_TOKEN}; not a Qwen2-VL tokenizer")

    @classmethod
    def from_pretrained(cls, model_dir):
        model_dir = Path(model_dir)
        model_type = (_read_json(model_dir / "config.json") or {}).get("model_type", "qwen2_5_vl")
        return cls(AutoTokenizer.from_pretrained(model_dir), Qwen2VLImageProcessorPil.from_pretrained(model_dir),
                   _video_config(model_dir), with_second_per_grid=model_type != "qwen2_vl")

    def save_pretrained(self, save_directory):
        """Tokenizer files + an HF v5 processor_config.json, loadable by AutoProcessor where torchvision exists."""
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        self.image_processor.save_pretrained(save_directory)
        video = {**self.video_processor.to_dict(), "video_processor_type": "Qwen2VLVideoProcessor"}
        video.pop("image_processor_type", None)
        name = "Qwen2_5_VLProcessor" if self.with_second_per_grid else "Qwen2VLProcessor"
        config = {"processor_class": name, "image_processor": self.image_processor.to_dict(), "video_processor": video}
        Path(save_directory, "processor_config.json").write_text(json.dumps(config, indent=2, default=str))

    @property
    def chat_template(self):
        return self.tokenizer.chat_template

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, **kwargs):  # HF's defaults
        if tokenize:
            raise ValueError("FallbackProcessor.apply_chat_template renders text only: call it with tokenize=False")
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def __call__(self, text, images=None, videos=None, padding=True, return_tensors="pt", padding_side="left",
                 fps=None, video_metadata=None, do_sample_frames=False, images_kwargs=None, videos_kwargs=None):
        """Tokenise `text` with each <|image_pad|>/<|video_pad|> expanded to t*h*w/merge^2 copies, in order.

        images_kwargs / videos_kwargs: {"size": {"shortest_edge", "longest_edge"}} (pixels) for this call, as HF's
        processor takes them."""
        text = [text] if isinstance(text, str) else list(text)
        images = [images] if isinstance(images, Image.Image) else list(images or [])
        videos = list(videos or [])
        if do_sample_frames:
            raise ValueError("FallbackProcessor does not sample frames: pass already-sampled frames")
        for token, media in ((IMAGE_TOKEN, images), (VIDEO_TOKEN, videos)):
            found = sum(t.count(token) for t in text)
            if found != len(media):
                raise ValueError(f"prompts hold {found} {token} placeholders but {len(media)} items were passed")
        data, counts = {}, {IMAGE_TOKEN: [], VIDEO_TOKEN: []}
        merge = self.image_processor.merge_size ** 2
        if images:
            data.update(self.image_processor(images, return_tensors="pt", **_pixel_limits(images_kwargs)))
            counts[IMAGE_TOKEN] = (data["image_grid_thw"].prod(-1) // merge).tolist()
        if videos:
            limits = _pixel_limits(videos_kwargs)
            patches, grids = zip(*(video_to_patches(v, self.video_processor, **limits) for v in videos))
            data["pixel_values_videos"], data["video_grid_thw"] = torch.cat(patches), torch.stack(grids)
            counts[VIDEO_TOKEN] = (data["video_grid_thw"].prod(-1) // self.video_processor.merge_size ** 2).tolist()
            if self.with_second_per_grid:  # seconds per temporal patch of the kept frames, as HF: see encode_prompts
                tp = self.video_processor.temporal_patch_size
                data["second_per_grid_ts"] = [tp / f for f in _video_fps(fps, video_metadata, len(videos))]
        text = _expand_placeholders(text, counts)
        encoded = self.tokenizer(text, padding=padding, padding_side=padding_side, return_tensors=return_tensors)
        ids = encoded["input_ids"]
        types = [[1 if t == self.image_token_id else 2 if t == self.video_token_id else 0 for t in row]
                 for row in (ids.tolist() if torch.is_tensor(ids) else ids)]  # 0 text, 1 image, 2 video
        encoded["mm_token_type_ids"] = torch.tensor(types) if torch.is_tensor(ids) else types
        return BatchFeature({**encoded, **data}, tensor_type=return_tensors)


def _pixel_limits(kwargs):
    """The per-call {"size": ...} the fallback honours; anything else is an error, not ignored."""
    kwargs = dict(kwargs or {})
    if set(kwargs) - {"size"}:
        raise ValueError(f"FallbackProcessor takes only size per call, got {sorted(kwargs)}")
    return kwargs


def _video_fps(fps, video_metadata, n):
    """One fps per video: `fps` (number or list), else video_metadata[i]['fps'], else HF's default of 24."""
    if fps is None and video_metadata is not None:
        fps = [(m.get("fps") if isinstance(m, dict) else m.fps) or HF_VIDEO_FPS for m in video_metadata]
    fps = [fps or HF_VIDEO_FPS] * n if fps is None or np.isscalar(fps) else list(fps)
    if len(fps) != n or min(fps) <= 0:
        raise ValueError(f"need one positive fps per video ({n} videos), got {fps}")
    return [float(f) for f in fps]


def _expand_placeholders(text, counts):
    """Replace the i-th placeholder (across the batch, per kind) by counts[kind][i] copies of itself."""
    pattern = re.compile(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}")
    queues = {k: iter(v) for k, v in counts.items()}
    return [pattern.sub(lambda m: m.group() * int(next(queues[m.group()])), t) for t in text]


def question_text(problem, options=None, problem_type=None, template="video_r1") -> str:
    """The question text of a row, in one of PROMPT_TEMPLATES.

    "video_r1" (real data): Video-R1's text, make_conversation_image_and_video in its grpo.py: a multiple-choice
    problem directly followed by "Options:\n" and each option + "\n" (other types drop their options), then "\n",
    REASONING_INSTRUCTION, " " and the type's TYPE_TEMPLATE instruction.
    "answer_only" (the toy's short prompt): the problem, " Options:" and the options one per line when there are
    any, then "\n" and the type's instruction; no reasoning instruction.
    problem_type defaults to "multiple choice" with options, else "free-form".
    """
    problem_type = problem_type or ("multiple choice" if options else "free-form")
    if problem_type not in TYPE_TEMPLATE:
        raise ValueError(f"problem_type must be one of {sorted(TYPE_TEMPLATE)}, got {problem_type!r}")
    if template == "answer_only":
        question = problem + (" Options:\n" + "\n".join(options) if options else "")
        return f"{question}\n{TYPE_TEMPLATE[problem_type]}"
    if template != "video_r1":
        raise ValueError(f"prompt_template must be one of {PROMPT_TEMPLATES}, got {template!r}")
    if problem_type == "multiple choice":
        problem = problem + "Options:\n" + "".join(f"{option}\n" for option in options or [])
    return f"{problem}\n{REASONING_INSTRUCTION} {TYPE_TEMPLATE[problem_type]}"


def chat_item(text, images=(), videos=(), fps=None, system=None, sizes=None) -> dict:
    """One prompt for `encode_prompts`: {"messages", "images", "videos", "fps", "sizes"}.

    messages: Qwen chat messages, one user turn of the media entries first (images, then videos) and then `text`
    (after an optional system turn). images: PIL images; videos: lists of PIL frames; fps: one per video
    (default DEFAULT_FPS); sizes: the InputSizes the processor resizes images and frames to (None: the processor's
    own defaults, the toy's). data.prompt_item (dataset and toy rows) and the lmms-eval engine build their prompts
    here.
    """
    images, videos = list(images), list(videos)
    content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
    system_turn = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    messages = system_turn + [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
    return {"messages": messages, "images": images, "videos": videos,
            "fps": [DEFAULT_FPS] * len(videos) if fps is None else list(fps), "sizes": sizes}


def encode_prompts(processor, batch, completions=None):
    """Left-padded model inputs for a batch of {"messages", "images": [PIL], "videos": [frames], "fps": [float],
    "sizes": InputSizes or None}.

    `completions` (optional, one string per sample) is appended after the generation prompt (teacher forcing).
    The items' `sizes` (one value for the whole batch) reach the processor as images_kwargs / videos_kwargs
    (size = {"shortest_edge": min pixels, "longest_edge": max pixels}): its smart_resize gives each image and frame
    its size (Video-R1's by default). Frames were sampled when the media was read (data.prompt_item).

    second_per_grid_ts (Qwen2.5-VL) is temporal_patch_size / fps of the kept frames, as transformers'
    Qwen2_5_VLProcessor computes it from the metadata below (FallbackProcessor the same), not Video-R1's 1.0:
    get_rope_index advances the temporal position by vision_config.tokens_per_second x second_per_grid_ts per
    temporal patch, i.e. positions are absolute time (Qwen2.5-VL's "absolute time encoding"), and a patch of 2 frames
    kept at f fps spans 2 / f seconds. Video-R1 deletes the key (grpo_trainer.py, compute_loss; its issue #73), so the
    model falls back to 1 s per patch: right only when f = 2, e.g. a 60 s clip sampled to 16 frames (f = 0.27) would
    be placed as if 8 s long.
    """
    texts, images, videos, metadata = [], [], [], []
    sizes = {item.get("sizes") for item in batch}
    if len(sizes) > 1:
        raise ValueError(f"one batch mixes input sizes {sorted(map(str, sizes))}: encode each setting separately")
    sizes = sizes.pop() if sizes else None
    for i, item in enumerate(batch):
        text = processor.apply_chat_template(item["messages"], tokenize=False, add_generation_prompt=True)
        item_images, item_videos = list(item.get("images") or []), list(item.get("videos") or [])
        fps = list(item.get("fps") or [DEFAULT_FPS] * len(item_videos))
        if text.count(IMAGE_TOKEN) != len(item_images) or text.count(VIDEO_TOKEN) != len(item_videos):
            raise ValueError(f"sample {i}: prompt has {text.count(IMAGE_TOKEN)} image / {text.count(VIDEO_TOKEN)} "
                             f"video placeholders but {len(item_images)} images / {len(item_videos)} videos were given")
        if len(fps) != len(item_videos):
            raise ValueError(f"sample {i}: {len(item_videos)} videos but {len(fps)} fps values")
        texts.append(text + (completions[i] if completions is not None else ""))
        images += item_images
        for frames, f in zip(item_videos, fps):
            videos.append(np.stack([np.asarray(frame.convert("RGB")) for frame in frames]))  # (T, H, W, 3) uint8
            metadata.append({"total_num_frames": len(frames), "fps": float(f),
                             "frames_indices": list(range(len(frames)))})  # HF: sampled_fps = f
    kwargs = {"videos": videos, "video_metadata": metadata, "do_sample_frames": False} if videos else {}
    if sizes is not None:
        kwargs.update(images_kwargs=sizes.images_kwargs(), videos_kwargs=sizes.videos_kwargs())
    return processor(text=texts, images=images or None, padding=True, return_tensors="pt", padding_side="left",
                     **kwargs)
