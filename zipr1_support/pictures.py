"""The kept-token picture and the Pareto plot of eval.py.

kept_token_picture: one question's visual tokens, darkened where a layer's Top-p selection (Eq. 1-3) drops them.
pareto_plot: accuracy against the token ratio τ = mean_j k_j / ℓ (§2.1) over a keep_p sweep, Full as a star.
Figures are pyplot-free (matplotlib's Figure renders with Agg), so no display is needed.
"""
from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from zipr1_support import data
from zipr1_support import media
from rollout import prefill
from sparse_qwen import make_sparse


def visual_token_grid(input_ids, grid_thw, token_id: int, merge: int):
    """Prompt positions of a prompt's first image (or video) and its token grid (t, gh, gw) = (t, h/merge, w/merge).

    The merger emits tokens row-major over (t, gh, gw) (Qwen2.5-VL undoes its window-attention order before the
    merger output): token i is frame slot i // (gh·gw), row i // gw % gh, column i % gw — as the decoder's mRoPE says.
    """
    t, h, w = (int(x) for x in grid_thw[0])
    shape = (t, h // merge, w // merge)
    return (input_ids == token_id).nonzero().squeeze(-1)[:math.prod(shape)], shape  # (t·gh·gw,)


def dim_dropped(image: np.ndarray, kept: np.ndarray, cell: int, strength: float = 0.75) -> np.ndarray:
    """image (H, W, 3) uint8 with each cell×cell block whose token is dropped (kept (gh, gw) False) darkened."""
    keep = np.kron(kept, np.ones((cell, cell), dtype=bool))[..., None]  # (H, W, 1)
    return np.where(keep, image, image * (1 - strength)).astype(np.uint8)


def kept_token_picture(model, processor, row, keep_p, path, title, max_frames=16, max_layers=8,
                       template="video_r1", sizes=None) -> np.ndarray:
    """One example with the visual tokens each layer drops darkened, one panel per layer. Video: rows = layers
    (at most max_layers, evenly spaced), columns = frame slots (the mean of the temporal_patch_size frames a token
    covers); the question in `template` (media.question_text). Returns kept (n_layers, t, gh, gw) bool."""
    item, vision = data.prompt_item(row, max_frames, template, sizes=sizes), make_sparse(model).config.vision_config
    inputs = media.encode_prompts(processor, [item]).to(model.device)
    (_, state, _), video = prefill(model, inputs, keep_p), bool(item["videos"])  # sparse prefill (Eq. 1-3), seed 0
    selection = state.selection_masks()  # (1, n_layers, P)
    positions, (t, gh, gw) = visual_token_grid(
        inputs["input_ids"][0], inputs["video_grid_thw" if video else "image_grid_thw"],
        model.config.video_token_id if video else model.config.image_token_id, vision.spatial_merge_size)
    kept = selection[0][:, positions].reshape(-1, t, gh, gw).cpu().numpy()  # (n_layers, t, gh, gw)
    cell, tp = vision.patch_size * vision.spatial_merge_size, vision.temporal_patch_size
    frames = [np.asarray(f.convert("RGB").resize((gw * cell, gh * cell)), dtype=np.float32)
              for f in (item["videos"][0] if video else item["images"][:1])]
    slots = [np.mean(frames[s * tp:(s + 1) * tp], 0).astype(np.uint8) for s in range(t)] if video else frames
    layers = sorted({round(x) for x in np.linspace(0, len(kept) - 1, min(len(kept), max_layers))}) if video \
        else range(len(kept))
    panels = [(j, s) for j in layers for s in range(t)]
    ncols = t if video else min(len(panels), 6)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(1.9 * ncols, 1.9 * nrows + 0.5))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (j, s) in zip(axes.flat, panels):
        ax.imshow(dim_dropped(slots[s].astype(np.uint8), kept[j, s], cell))
        ax.set_title((f"L{j} frames {s * tp}-{s * tp + tp - 1}" if video else f"layer {j}") +
                     f": {kept[j, s].mean():.0%} kept", fontsize=7)
    tau = float(state.token_ratio()[0])  # τ (§2.1)
    fig.suptitle(f"{title}: keep_p={keep_p}, τ={tau:.2f} (dark = visual token dropped)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return kept


def pareto_plot(curves: dict, full: dict, path) -> None:
    """Accuracy against τ: one line per model over the keep_p sweep (points labelled by keep_p), Full as a star."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for i, (name, points) in enumerate(curves.items()):
        points = sorted(points, key=lambda p: p["token_ratio"])
        ax.plot([p["token_ratio"] for p in points], [p["accuracy"] for p in points], "o-", label=name)
        for p in points:  # labels of the second model below its points, so coinciding points stay readable
            ax.annotate(f"{p['keep_p']:g}", (p["token_ratio"], p["accuracy"]), xytext=(3, 3 - 12 * (i % 2)),
                        textcoords="offset points", fontsize=7, color=f"C{i}")
    ax.plot([1.0], [full["accuracy"]], "k*", markersize=12, label="Full")
    ax.set(xlabel="token ratio τ (mean fraction of prompt tokens kept per layer)", ylabel="accuracy",
           title="Accuracy vs token ratio (point labels: keep_p)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
