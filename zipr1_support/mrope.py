"""Qwen2(.5)-VL's mRoPE positions for our own loops: a left-padded prompt batch, and the tokens generated after it.

mRoPE gives every token three position ids (temporal, height, width). Text tokens have equal ids on the three axes;
an image or video's tokens take their frame, row and column. A generated token continues from the prompt's largest
position + 1 (the rope delta), whatever the pruned KV cache holds, so sparse and dense decoding see the same positions.
"""
from __future__ import annotations

import torch


def prompt_positions(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen's 3-D mRoPE position ids of a left-padded prompt batch, and the next text position per sample.

    Needs `mm_token_type_ids` (0 text, 1 image, 2 video): without it transformers falls back to 1-D positions.
    Returns position_ids (3, B, P) and next_position (B,) = largest prompt position + 1 (rope delta included).
    """
    if inputs.get("mm_token_type_ids") is None:
        raise ValueError("inputs lack mm_token_type_ids: build them with the processor (media.encode_prompts)")
    position_ids, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"), attention_mask=inputs["attention_mask"])  # (3, B, P)
    masked = position_ids.masked_fill(~inputs["attention_mask"].bool()[None], -1)  # (3, B, P), padding: -1
    return position_ids, masked.amax(dim=(0, 2)) + 1  # (3, B, P), (B,)


def continuation_positions(next_position: torch.Tensor, steps: int, start: int = 0) -> torch.Tensor:
    """Text positions of generated tokens start..start+steps-1, repeated on the 3 mRoPE axes.  (3, B, steps)"""
    pos = next_position[:, None] + torch.arange(start, start + steps, device=next_position.device)  # (B, steps)
    return pos[None].expand(3, -1, -1)  # (3, B, steps)
