"""The images and videos of a prompt batch: how many each row holds, every prompt n times with its media encoded
once (a GRPO group), and rows cut out with their own media (with which rollout.split_groups cuts a rollout into
one part per question).

A batch is the processor's left-padded dict (media.encode_prompts): input_ids, attention_mask, mm_token_type_ids
(B, P), and per kind the pixels of every item in order (pixel_values / pixel_values_videos, rows = patches) with one
grid (t, h, w) per item (image_grid_thw / video_grid_thw), or transformers' `mm_encoder_outputs` (encoded features,
one (tokens_i, hidden) tensor per item) in place of the pixels. Which items belong to which row is not stored: it
follows from each row's placeholder tokens and the grids (`media_per_sample`).
"""
from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
              "mm_encoder_outputs")
VISION = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


def media_per_sample(model, inputs, kind: str) -> list[int]:
    """How many images (kind="image") or videos each sample holds, from its placeholder tokens and the grids.

    The grids (`image_grid_thw`, `video_grid_thw`) list every item of the batch in order; a sample's placeholder
    tokens must be a whole number of the next grids. One clear error names the sample where they disagree.
    """
    merge = model.config.vision_config.spatial_merge_size ** 2
    counts = (inputs["input_ids"] == getattr(model.config, f"{kind}_token_id")).sum(-1).tolist()  # per sample
    grids = inputs.get(f"{kind}_grid_thw")
    need = [] if grids is None else (grids.prod(-1) // merge).tolist()  # tokens per image/video, in order
    items = []
    for b, n in enumerate(counts):
        have, taken = n, 0
        while have > 0 and need:
            have, taken = have - need.pop(0), taken + 1
        if have != 0:
            raise ValueError(f"sample {b}: its {n} {kind} tokens do not match its {kind} grid(s) "
                             f"({kind}_grid_thw); rebuild the inputs with the processor")
        items.append(taken)
    if need:
        raise ValueError(f"{len(need)} {kind}(s) in {kind}_grid_thw have no {kind} tokens in any prompt")
    return items


def check_vision_tokens(model, inputs) -> None:
    """One clear error naming the sample whose image/video placeholder count disagrees with the grids."""
    for kind in ("image", "video"):
        media_per_sample(model, inputs, kind)


@torch.no_grad()
def repeat_prompts(model, inputs, n: int) -> dict:
    """Each prompt of the batch n times in a row (a GRPO group: rows b·n … b·n+n-1), its media encoded once.

    The vision tower runs once per image/video; the decoder receives the features n times through transformers'
    `mm_encoder_outputs` instead of n copies of the pixels. The features carry no gradient, so this is for a frozen
    vision tower (train.py's default), whose features the full-attention reference shares.
    """
    out = {k: inputs[k].repeat_interleave(n, 0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    encoded = {}
    for kind, (pixels, grid_key) in VISION.items():
        if inputs.get(pixels) is None:
            continue
        per_sample = media_per_sample(model, inputs, kind)  # items per prompt
        starts = [sum(per_sample[:b]) for b in range(len(per_sample))]  # index of each prompt's first item
        order = [s + i for s, c in zip(starts, per_sample) for _ in range(n) for i in range(c)]  # items, n times
        features = getattr(model.model, f"get_{kind}_features")(inputs[pixels], inputs[grid_key]).pooler_output
        encoded[kind] = BaseModelOutputWithPooling(pooler_output=[features[i] for i in order])  # (tokens_i, hidden)
        out[grid_key] = inputs[grid_key][order]
        if kind == "video" and inputs.get("second_per_grid_ts") is not None:
            out["second_per_grid_ts"] = torch.as_tensor(inputs["second_per_grid_ts"])[order]
    return {**out, "mm_encoder_outputs": encoded} if encoded else out


def take_rows(inputs: dict, media_counts: dict, start: int, stop: int) -> dict:
    """Rows start … stop-1 of a left-padded prompt batch with their images/videos (pixels or encoded features);
    columns that are padding in every kept row are dropped. media_counts: {kind: media_per_sample(…, kind)}."""
    first = int(inputs["attention_mask"][start:stop].any(0).int().argmax())  # first column a kept row uses
    out = {k: inputs[k][start:stop, first:] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for kind, (pixels, grid_key) in VISION.items():
        if inputs.get(grid_key) is None:
            continue
        per_row = media_counts[kind]
        a, b = sum(per_row[:start]), sum(per_row[:stop])  # these rows' items
        if a == b:
            continue
        grids, encoded = inputs[grid_key], inputs.get("mm_encoder_outputs", {}).get(kind)
        out[grid_key] = grids[a:b]
        if kind == "video" and inputs.get("second_per_grid_ts") is not None:
            out["second_per_grid_ts"] = torch.as_tensor(inputs["second_per_grid_ts"])[a:b]
        if inputs.get(pixels) is not None:
            ends = grids.prod(-1).cumsum(0).tolist()  # the pixel rows (patches) of item i end at ends[i]
            out[pixels] = inputs[pixels][(ends[a - 1] if a else 0):ends[b - 1]]
        if encoded is not None:
            features = BaseModelOutputWithPooling(pooler_output=list(encoded.pooler_output[a:b]))
            out.setdefault("mm_encoder_outputs", {})[kind] = features
    return out
