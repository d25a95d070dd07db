"""media.py against transformers' own Qwen2.5-VL processor (image path), hand-computed token counts, and an
independent numpy reference for the video patch layout."""
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

from zipr1_support import media
from zipr1_support import media_files


class ImageOnlyQwenProcessor(Qwen2_5_VLProcessor):
    """transformers' real processor minus the video processor (which needs torchvision): the reference."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return media.load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()


def noise_image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def item(problem, images=(), videos=(), fps=None):
    return media.chat_item(media.question_text(problem, ["A. yes", "B. no"]), images, videos, fps)


def test_image_inputs_equal_transformers_processor(processor):
    reference = ImageOnlyQwenProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                                       chat_template=processor.tokenizer.chat_template)
    batch = [item("Is it red?", [noise_image(224, 224, 0)]),
             item("Are both pictures the same size, really?", [noise_image(100, 150, 1), noise_image(60, 60, 2)]),
             item("Empty?")]
    ours, theirs = media.encode_prompts(processor, batch), media.encode_prompts(reference, batch)
    assert set(ours) == set(theirs) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                        "image_grid_thw"}
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_placeholder_counts_follow_smart_resize(processor):
    # 224x224 -> 16x16 patches -> 64 tokens; 100x150 -> 112x140 (round to 28) -> 8x10 -> 20; 60x60 -> 56x56 -> 4
    batch = [item("a", [noise_image(224, 224, 0)]), item("b", [noise_image(100, 150, 1), noise_image(60, 60, 2)])]
    out = media.encode_prompts(processor, batch)
    assert out["image_grid_thw"].tolist() == [[1, 16, 16], [1, 8, 10], [1, 4, 4]]
    image_id = processor.image_token_id
    assert (out["input_ids"] == image_id).sum(1).tolist() == [64, 24]
    assert out["pixel_values"].shape == (256 + 80 + 16, 3 * 2 * 14 * 14)


def test_left_padding_and_mm_token_types(processor):
    frames = [noise_image(224, 224, s) for s in range(5)]  # 5 frames -> padded to 6 -> grid_t 3 -> 192 tokens
    batch = [item("short?", videos=[frames]), item("a much longer question about the picture?", [frames[0]])]
    out = media.encode_prompts(processor, batch)
    ids, mask, types = out["input_ids"], out["attention_mask"], out["mm_token_type_ids"]
    assert out["video_grid_thw"].tolist() == [[3, 16, 16]]
    assert torch.equal(types == 1, ids == processor.image_token_id)
    assert torch.equal(types == 2, ids == processor.video_token_id)
    assert (types == 2).sum().item() == 192 and (types == 1).sum().item() == 64
    assert int(types.max()) == 2 and set(types.unique().tolist()) == {0, 1, 2}
    for row in range(2):  # left padding: zeros of the mask come first, and they hold the pad token
        n_pad = int((mask[row] == 0).sum())
        assert mask[row, n_pad:].all() and (ids[row, :n_pad] == processor.tokenizer.pad_token_id).all()
    assert mask[0].all() and not mask[1].all()  # the video row is the longest


def test_second_per_grid_ts_is_temporal_patch_over_fps(processor):
    frames = [noise_image(56, 56, s) for s in range(4)]
    out = media.encode_prompts(processor, [item("v?", videos=[frames, frames[:2]], fps=[2.0, 4.0])])
    assert torch.allclose(out["second_per_grid_ts"], torch.tensor([1.0, 0.5]))
    text = processor.apply_chat_template(item("v?", videos=[frames])["messages"], add_generation_prompt=True)
    default = processor(text=[text], videos=[frames], return_tensors="pt")
    assert torch.allclose(torch.as_tensor(default["second_per_grid_ts"]), torch.tensor([2 / 24]))  # HF's default fps


def test_two_identical_frames_equal_the_image_patches(processor):
    image = noise_image(90, 130, 3)  # not a multiple of 28: exercises the resize
    patches, grid = media.video_to_patches([image, image], processor.image_processor)
    ref = processor.image_processor([image], return_tensors="pt")
    assert grid.tolist() == ref["image_grid_thw"][0].tolist()
    assert torch.equal(patches, ref["pixel_values"])


def test_video_patch_layout_matches_numpy_reference(processor):
    frames = [np.random.default_rng(s).integers(0, 256, (56, 84, 3), dtype=np.uint8) for s in range(3)]
    patches, grid = media.video_to_patches(np.stack(frames), processor.image_processor)
    mean, std = np.array(processor.image_processor.image_mean), np.array(processor.image_processor.image_std)
    video = np.stack(frames + frames[-1:]).astype(np.float64) / 255.0  # pad 3 -> 4 frames with the last frame
    video = ((video - mean) / std).transpose(0, 3, 1, 2)  # (T, C, H, W)
    t, p, m = 2, 14, 2
    x = video.reshape(4 // t, t, 3, 56 // p // m, m, p, 84 // p // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh, gw, mh, mw, C, t, ph, pw), as HF's video processor
    assert grid.tolist() == [2, 4, 6]
    np.testing.assert_allclose(patches.numpy(), x.reshape(2 * 4 * 6, -1), atol=1e-5)


def test_model_forward_sees_images_and_videos(model, processor):
    frames = [noise_image(224, 224, s) for s in range(4)]
    cases = [item("one?", [frames[0]]), item("two?", [frames[0], frames[1]]), item("video?", videos=[frames])]
    for case in cases:
        inputs = media.encode_prompts(processor, [case])
        with torch.no_grad():
            logits = model(**inputs).logits  # (1, L, V)
        assert logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer))
        assert torch.isfinite(logits).all()
        changed = {**case, "images": [noise_image(224, 224, 9)] * len(case["images"]),
                   "videos": [[noise_image(224, 224, 9)] * 4] * len(case["videos"])}
        with torch.no_grad():
            other = model(**media.encode_prompts(processor, [changed])).logits
        assert not torch.allclose(logits[0, -1], other[0, -1])  # the answer position depends on the pixels


def test_mm_token_types_give_the_3d_rope_positions(model, processor):
    inputs = media.encode_prompts(processor, [item("where?", [noise_image(224, 224, 0)])])
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"],
                                              attention_mask=inputs["attention_mask"])  # (3, 1, L)
    start = int((inputs["mm_token_type_ids"][0] == 1).nonzero()[0])
    rows, cols = torch.arange(8).repeat_interleave(8), torch.arange(8).repeat(8)
    image = positions[:, 0, start:start + 64]
    assert torch.equal(image[0], torch.full((64,), start)) and torch.equal(image[1], start + rows)
    assert torch.equal(image[2], start + cols)
    assert positions[:, 0, start + 64].tolist() == [start + 8] * 3  # text resumes after max(h, w) / merge


def test_encode_prompts_names_the_mismatched_sample(processor):
    good, bad = item("ok", [noise_image(56, 56, 0)]), item("bad", [noise_image(56, 56, 0)])
    bad["images"] = []
    with pytest.raises(ValueError, match="sample 1"):
        media.encode_prompts(processor, [good, bad])


def test_chat_item_puts_media_first_then_the_question(processor):
    """The answer_only text here; Video-R1's template is checked in test_video_r1_prompt_rewards.py."""
    image, frames = noise_image(56, 56, 0), [noise_image(56, 56, s) for s in (1, 2)]
    text = media.question_text("What color?", ["A. red", "B. blue"], template="answer_only")
    item = media.chat_item(text, [image], [frames], [4.0])
    content = item["messages"][0]["content"]
    assert [c["type"] for c in content] == ["image", "video", "text"]
    assert content[2]["text"] == ("What color? Options:\nA. red\nB. blue\nPlease provide only the single option "
                                  "letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.")
    assert item["images"] == [image] and item["videos"] == [frames] and item["fps"] == [4.0]
    text = processor.apply_chat_template(item["messages"], add_generation_prompt=True)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1 and text.endswith("<|im_start|>assistant\n")
    assert processor.apply_chat_template(item["messages"]).endswith("<|im_end|>\n")  # HF's default: no prompt
    with_system = media.chat_item(media.question_text("2+2?", problem_type="numerical"), system="Be brief.")
    assert with_system["messages"][0]["role"] == "system" and with_system["fps"] == []
    assert "numerical value" in with_system["messages"][1]["content"][-1]["text"]
    assert media.chat_item("q", videos=[frames])["fps"] == [media.DEFAULT_FPS]
    with pytest.raises(ValueError, match="problem_type"):
        media.question_text("x", problem_type="essay")


def test_saved_processor_reloads_identically(processor, tiny_model_dir, tmp_path):
    processor.save_pretrained(tmp_path)
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    again = media.load_processor(tmp_path)
    batch = [item("v?", [noise_image(224, 224, 0)], [[noise_image(224, 224, 1)] * 2])]
    a, b = media.encode_prompts(processor, batch), media.encode_prompts(again, batch)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_unavailable_model_fails_fast_with_one_line():
    start = time.time()
    with pytest.raises(media.ModelNotAvailable) as err:
        media.load_processor("nobody-here/not-a-real-model-xyz")
    message = str(err.value)
    assert time.time() - start < 5 and "\n" not in message
    assert "nobody-here/not-a-real-model-xyz" in message and "huggingface-cli download" in message


def test_load_image_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        media.load_image(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        media.load_image(tmp_path / "broken.png")


def solid_frames(n, size=(40, 30)):
    return [Image.new("RGB", size, (40 * i, 255 - 40 * i, 60)) for i in range(n)]


def same_frames(a, b):
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_load_video_formats(tmp_path):
    frames = solid_frames(6)
    (tmp_path / "dir").mkdir()
    for i, f in enumerate(frames):
        f.save(tmp_path / "dir" / f"{i:03d}.png")
    frames[0].save(tmp_path / "v.gif", save_all=True, append_images=frames[1:], duration=250, loop=0)
    frames[0].save(tmp_path / "v.webp", save_all=True, append_images=frames[1:], duration=500, lossless=True)
    np.save(tmp_path / "v.npy", np.stack([np.asarray(f) for f in frames]))
    for name, fps in (("dir", media.DEFAULT_FPS), ("v.gif", 4.0), ("v.webp", 2.0), ("v.npy", media.DEFAULT_FPS)):
        got, got_fps = media.load_video(tmp_path / name)
        assert same_frames(got, frames) and got_fps == pytest.approx(fps), name
    kept, kept_fps = media.load_video(tmp_path / "v.npy", max_frames=3)  # indices linspace(0, 5, 3) = 0, 2, 5
    assert same_frames(kept, [frames[0], frames[2], frames[5]]) and kept_fps == pytest.approx(2.0 * 3 / 6)


def test_load_video_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nothere.mp4"):
        media.load_video(tmp_path / "nothere.mp4")
    np.save(tmp_path / "flat.npy", np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="flat.npy"):
        media.load_video(tmp_path / "flat.npy")
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "av", None)  # as on a machine without PyAV
    with pytest.raises(ValueError, match="pip install av"):
        media.load_video(tmp_path / "clip.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no frames"):
        media.load_video(tmp_path / "empty")


def write_mp4(path, n=90, fps=10, gop=5, size=32):
    """A tiny mpeg4 .mp4 written with PyAV: frame t is a gradient shifted by t (frames differ), a keyframe every
    `gop` frames."""
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        ramp = np.add.outer(np.arange(size), np.arange(size)) * 4  # (H, W) int
        for t in range(n):
            rgb = np.stack([(ramp + 3 * t) % 256, np.full_like(ramp, 8 * t % 256), 255 - ramp], -1).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return path


def all_frames_subsampled(path, max_frames):
    """The reference: decode every frame with PyAV, then keep round(linspace(0, T - 1, k))."""
    import av
    with av.open(str(path)) as container:
        frames = [f.to_image().convert("RGB") for f in container.decode(container.streams.video[0])]
    keep = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
    return [frames[i] for i in keep], len(frames)


@pytest.mark.parametrize("max_frames", [1, 3, 7, 16, 200])
def test_mp4_decodes_only_the_kept_frames_and_equals_decoding_all(tmp_path, max_frames):
    path = write_mp4(tmp_path / "clip.mp4")
    want, total = all_frames_subsampled(path, max_frames)
    assert total == 90
    got, fps = media.load_video(path, max_frames=max_frames)
    assert same_frames(got, want) and fps == pytest.approx(10.0 * len(want) / total)
    kept, _, count, decoded = media_files._pyav_frames(path, media_files.frame_picker(max_frames))
    assert same_frames(kept, want) and count == total
    if max_frames <= 3:  # 4.4 s between kept frames: seeks to the keyframe before each (decodes <= a GOP each)
        assert decoded <= max_frames * 5
    else:
        assert decoded <= total


def test_mp4_without_a_frame_count_in_its_header(tmp_path):
    """Containers that store no frame count (e.g. some .mkv/.webm): the packets are counted instead."""
    import av
    mp4 = write_mp4(tmp_path / "clip.mp4", n=30, gop=10)
    mkv = tmp_path / "clip.mkv"
    with av.open(str(mp4)) as src, av.open(str(mkv), "w") as dst:  # remux, no re-encoding
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    want, _ = all_frames_subsampled(mkv, 4)
    got, _ = media.load_video(mkv, max_frames=4)
    assert same_frames(got, want)


def test_corrupt_video_files_are_one_line_errors(tmp_path):
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (tmp_path / "noise.webp").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for name in ("noise.mp4", "noise.webp"):
        with pytest.raises(ValueError, match=name) as err:
            media.load_video(tmp_path / name)
        assert "\n" not in str(err.value)
