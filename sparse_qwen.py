"""Top-p sparse attention inside transformers' Qwen2.5-VL / Qwen2-VL text decoder.

The policy of ZipR1 is the stock model whose *text decoder* attention is replaced by Eq. 1-3 (the vision tower keeps
its own attention). We plug in through transformers' own extension points:

  * `AttentionInterface.register("zipr1_sparse", zipr1_attention)`: the attention function every decoder layer calls;
  * `AttentionMaskInterface.register("zipr1_sparse", padding_mask)`: without a registered mask function a custom
    implementation silently receives `attention_mask=None` and left padding breaks. Ours hands the attention the
    2-D padding mask (B, L) bool: O(L) memory, and exactly what the token selection needs.

What a forward does is set per call by a `SparseState` passed as the attention keyword `zipr1_state`:
`model(..., **sparse_kwargs(state))`. transformers forwards extra keywords of the model call to every layer's
attention function (its AttentionInterface), so the state reaches `zipr1_attention` as an argument, and a
gradient-checkpointed layer re-runs in backward with the same keywords (the same state, the same selection).

  mode "prefill"  select tokens per layer (Eq. 3) among the prompt, attend among them (Eq. 1-2), record k_j, and
                  prune the layer's KV cache to the selected tokens (`PrunedKVCache.prune`).
  mode "decode"   one new token per sample attends to its pruned cache (per-layer key-valid mask) plus the tokens
                  generated so far.
  mode "teacher"  the training forward over prompt + response in one pass: the prompt is selected exactly as in
                  prefill and every response token attends to the kept prompt keys and the response so far. The
                  log-probs it gives equal those of the rollout (inference-consistent). With `relaxed_temperature`
                  set it also records each layer's relaxed token ratio τ̃_j (Eq. 3 with a smooth count, with
                  gradient through the probe scores), the efficiency term of train.py's loss.

Positions are the original ones (mrope.py): prefill takes Qwen's mRoPE ids from `get_rope_index`, and generated
tokens continue from the prompt's largest position (rope deltas), not from the pruned cache length. Sparsity is per
sample: `keep_p` is a (B,) tensor, so one batch holds a group's N thresholds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
try:
    from transformers import AttentionInterface, DynamicCache
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as err:  # our extension points missing: one line naming the version, not a traceback
    raise SystemExit(f"ZipR1 needs transformers >= 5.23 with AttentionInterface and AttentionMaskInterface; "
                     f"with transformers {transformers.__version__} the import failed: {err}") from None

import zipr1_kernels
from learned_sparsity import (SCORER, add_probe_scorers, decoder_attentions, probe_bonus, soft_masked_attention,
                              straight_through_mask)
from sparse_attention import (Selection, check_keep_p, column_mass, final_position, identity_score, mask_to_indices,
                              probe_indices, probe_queries, relaxed_token_ratio, sparse_attention, token_ratio)

ATTN_NAME = "zipr1_sparse"


class PrunedKVCache(DynamicCache):
    """A DynamicCache whose layers keep only the selected tokens after prefill.

    Samples keep different numbers of tokens per layer, so layer j stores (B, Hkv, K_j, D) with K_j = max_b k_j,b
    and a key-valid mask (B, K_j) marking each sample's real slots. Tokens appended while decoding are valid.
    """

    def __init__(self, config):
        super().__init__(config=config)
        self.key_valid: dict[int, torch.Tensor] = {}

    def prune(self, layer_idx: int, mask: torch.Tensor) -> None:
        """Keep only the positions where mask (B, L) is True in layer `layer_idx`."""
        layer = self.layers[layer_idx]
        idx, ok = mask_to_indices(mask)  # (B, K), (B, K)
        index = idx[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])  # (B, Hkv, K, D)
        layer.keys = torch.gather(layer.keys, 2, index)  # (B, Hkv, K, D)
        layer.values = torch.gather(layer.values, 2, index)  # (B, Hkv, K, D)
        self.key_valid[layer_idx] = ok  # (B, K)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        key_states, value_states = autocast_dtype(key_states, value_states)  # store fp32 rope'd keys in bf16 too
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)  # (B, Hkv, K+L, D)
        if layer_idx in self.key_valid:  # decoding after a prune: the new tokens are valid keys
            new = torch.ones(key_states.shape[0], key_states.shape[2], dtype=torch.bool, device=key_states.device)
            self.key_valid[layer_idx] = torch.cat([self.key_valid[layer_idx], new], dim=1)  # (B, K+L)
        return keys, values

    def kv_bytes(self) -> torch.Tensor:
        """Bytes of K and V each sample really holds, read from the cache tensors: Σ_j k_j·2·Hkv·d·bytes.  (B,)"""
        total = 0
        for j, layer in enumerate(self.layers):
            per_token = token_kv_bytes(layer)  # K, V
            slots = self.key_valid[j].sum(-1) if j in self.key_valid else torch.full(
                (layer.keys.shape[0],), layer.keys.shape[2], device=layer.keys.device)  # (B,) k_j
            total = total + slots * per_token  # (B,)
        return total


def token_kv_bytes(layer) -> int:
    """Bytes one token's K and V take in a cache layer: Hkv·d·(K element size + V element size)."""
    return layer.keys.shape[1] * layer.keys.shape[-1] * (layer.keys.element_size() + layer.values.element_size())


@dataclass
class SparseState:
    """Per-call settings and records of the sparse decoder: thresholds, mode, cache, selections per layer."""

    keep_p: torch.Tensor  # (B,) thresholds p_n, one per sample
    mode: str = "prefill"  # "prefill" | "decode" | "teacher"
    prompt_len: int | None = None  # teacher mode: number of prompt columns (left-padded) before the response
    cache: PrunedKVCache | None = None
    seed: int = 0  # random probes depend on (seed + layer, ℓ) only
    selections: dict[int, Selection] = field(default_factory=dict)
    relaxed_temperature: float | None = None  # teacher mode: record τ̃_j with this T (None: not computed)
    relaxed_grad: bool = True  # τ̃ with gradient (the loss term); False: a detached value, for logging only
    relaxed: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> τ̃_j (B,)
    straight_through: float | None = None  # teacher mode: T of the selection's straight-through gradient (None: off)

    def kept(self) -> torch.Tensor:
        """k_j per sample and layer.  (B, n_layers) long."""
        return torch.stack([self.selections[j].count for j in sorted(self.selections)], dim=1)

    def selection_masks(self) -> torch.Tensor:
        """The prompt tokens each layer kept, m_Q = m_K per layer.  (B, n_layers, P) bool"""
        return torch.stack([self.selections[j].mask for j in sorted(self.selections)], dim=1)

    def lengths(self) -> torch.Tensor:
        """ℓ per sample (prompt tokens, padding excluded).  (B,)"""
        return self.selections[min(self.selections)].length

    def token_ratio(self) -> torch.Tensor:
        """τ per sample: mean over layers of k_j / ℓ (§2.1).  (B,)"""
        return token_ratio(self.kept(), self.lengths())

    def relaxed_by_layer(self) -> torch.Tensor:
        """τ̃_j per sample and layer (Eq. 3 relaxed, / ℓ) from the last teacher forward.  (B, n_layers)"""
        return torch.stack([self.relaxed[j] for j in sorted(self.relaxed)], dim=1)

    def relaxed_token_ratio(self) -> torch.Tensor:
        """τ̃ per sample: mean over layers of τ̃_j, the smooth twin of `token_ratio`.  (B,)"""
        return self.relaxed_by_layer().mean(-1)


STATE_KWARG = "zipr1_state"  # the model-call keyword transformers forwards to zipr1_attention


class StateRef:
    """`state` handed through the model call. Not a dataclass on purpose: FSDP2 rebuilds dataclasses (and lists,
    dicts) found in a call's keywords when it moves their tensors, so the attention would record its selections and
    τ̃ into a copy; an opaque holder passes the caller's own SparseState."""
    __slots__ = ("state",)

    def __init__(self, state: SparseState):
        self.state = state


def sparse_kwargs(state: SparseState | None) -> dict:
    """The model-call keywords that run the sparse decoder under `state` (none: plain attention)."""
    return {} if state is None else {STATE_KWARG: StateRef(state)}


def padding_mask(batch_size, q_length, kv_length, *args, attention_mask=None, **kwargs):
    """Mask function for AttentionMaskInterface: pass the 2-D padding mask (B, kv_length) bool (or None) through."""
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:].bool()


def autocast_dtype(*tensors):
    """Under autocast, cast q, k, v to the autocast dtype, as SDPA does. Qwen's rotary embedding leaves q, k in fp32
    (fp32 cos, sin) beside a bf16 v when an fp32 model runs under bf16 autocast (train.py's default on CUDA)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    return tuple(t.to(torch.get_autocast_dtype(device)) for t in tensors)


def zipr1_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    zipr1_state: StateRef | None = None, **kwargs):
    """The attention function of every text-decoder layer.  query (B, H, Lq, D); key, value (B, Hkv, Lk, D).

    `zipr1_state` is the SparseState of this model call (`sparse_kwargs`). Returns (B, Lq, H, D) as transformers
    expects. Without a state it is plain causal attention over the padding mask (handy for debugging; the
    full-attention reference model uses stock "sdpa").
    """
    state, layer = (zipr1_state.state if zipr1_state is not None else None), module.layer_idx
    bsz, _, seq, _ = query.shape
    query, key, value = autocast_dtype(query, key, value)
    valid = torch.ones(bsz, key.shape[2], dtype=torch.bool, device=query.device) if attention_mask is None \
        else attention_mask.bool()  # (B, Lk)
    if state is None:
        every_query = torch.ones(bsz, seq, dtype=torch.bool, device=query.device)  # (B, L)
        out = sparse_attention(query, key, value, every_query, valid, scale=scaling)  # (B, H, L, D) dense, real tokens
    elif state.mode == "decode":
        out = zipr1_kernels.decode_attention(query, key, value, state.cache.key_valid[layer],
                                             scale=scaling)  # (B, H, 1, D)
    else:
        n_prompt = seq if state.mode == "prefill" else state.prompt_len
        scorer = getattr(module, SCORER, None)  # a learned probe scorer w_j (Hkv, D), or None: ZipVL's identity
        bonus = None if scorer is None else probe_bonus(value[:, :, :n_prompt], scorer)  # (B, P) log-factor
        sel = zipr1_kernels.top_p_select(query[:, :, :n_prompt], key[:, :, :n_prompt], state.keep_p,
                                         valid[:, :n_prompt], seed=state.seed + layer, scale=scaling,
                                         bonus=None if bonus is None else bonus.detach())  # Eq. 3
        state.selections[layer] = sel
        if state.mode == "teacher" and state.relaxed_temperature is not None:
            state.relaxed[layer] = relaxed_ratio(state, query[:, :, :n_prompt], key[:, :, :n_prompt],
                                                 valid[:, :n_prompt], layer, scaling)  # (B,)
        response = torch.ones(bsz, seq - n_prompt, dtype=torch.bool, device=query.device)  # (B, L-P): all in
        mask = torch.cat([sel.mask, response], dim=1)  # (B, L): m_Q = m_K
        if state.mode == "teacher" and state.straight_through is not None:  # Eq. 5's gradient reaches the selection
            out = straight_through_attention(query, key, value, sel, valid, n_prompt, state.seed + layer, scaling,
                                             state.straight_through, bonus)  # Eq. 2, (B, H, L, D)
        else:
            out = zipr1_kernels.prefill_sparse_attention(query, key, value, mask, scale=scaling)  # Eq. 2, (B, H, L, D)
        if state.mode == "prefill" and state.cache is not None:
            state.cache.prune(layer, sel.mask)  # keep only the selected K/V of this layer
    return out.transpose(1, 2).contiguous(), None  # (B, L, H, D); the Triton kernels write it so: no copy


def relaxed_ratio(state: SparseState, query, key, valid, layer: int, scaling) -> torch.Tensor:
    """τ̃_j of the prompt (B,), with the probes the selection used; torch (the Triton probe kernel has no backward).
    Its (B, H, P, ℓ) probe probabilities are recomputed in backward, not kept (sparse_attention.relaxed_token_ratio)."""
    with torch.set_grad_enabled(state.relaxed_grad and torch.is_grad_enabled()):
        return relaxed_token_ratio(query, key, state.keep_p, state.relaxed_temperature, valid,
                                   seed=state.seed + layer, scale=scaling)


def straight_through_attention(q, k, v, selection, valid, n_prompt: int, seed: int, scale, temperature: float,
                               bonus=None):
    """Eq. 2 of a teacher forward (prompt + response) whose prompt selection passes Eq. 5's gradient through to the
    probe scores (`straight_through_mask`), and to a learned scorer's log-factor bonus (B, P) where there is one; the
    forward equals the hard one.  q: (B, H, L, D); valid: (B, L)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    prompt_valid = valid[:, :n_prompt]  # (B, P)
    probe_idx, probe_ok = probe_indices(prompt_valid, seed=seed)  # the probes of the selection (same seed)
    mass, seen_by = column_mass(probe_queries(q[:, :, :n_prompt], probe_idx), k[:, :, :n_prompt], prompt_valid,
                                probe_idx, probe_ok, scale)  # (B, P), with gradient
    ranked = prompt_valid & (torch.arange(n_prompt, device=q.device) != final_position(prompt_valid)[:, None])
    m = straight_through_mask(identity_score(mass, seen_by, bonus), selection.mask, ranked, temperature)  # (B, P)
    response = m.new_ones(m.shape[0], q.shape[2] - n_prompt)  # (B, L-P): every response token is kept
    reachable = torch.cat([prompt_valid, response.bool()], 1)  # (B, L)
    m = torch.cat([m, response], 1)  # (B, L): m_Q = m_K
    return soft_masked_attention(q, k, v, m, m, reachable, scale)  # (B, H, L, D)


AttentionInterface.register(ATTN_NAME, zipr1_attention)
AttentionMaskInterface.register(ATTN_NAME, padding_mask)


# ----------------------------------------------------------------------------------------------- transformers features
MM_ENCODER_OUTPUTS_SINCE = "5.18"  # Qwen2.5-VL's forward takes encoded vision features (`mm_encoder_outputs`)
ACTIVATION_CHECKPOINTING_SINCE = "5.23"  # PreTrainedModel.activation_checkpointing_enable (before: gradient_...)
ACTIVATION_CHECKPOINTING = "activation_checkpointing_enable"


def check_transformers() -> str:
    """Stop with one line if the installed transformers lacks a feature ZipR1 relies on; else the line saying so.

    * our attention function registered through `AttentionInterface` / `AttentionMaskInterface` (done at import);
    * `mm_encoder_outputs` reaching the vision path: a three-token probe on a tiny random Qwen2.5-VL (< 0.1 s) feeds
      two different encoded images; transformers < 5.18 swallows the argument in **kwargs and returns the same
      hidden states for both (no error: wrong visual features), which stops the run here instead.
    Activation checkpointing needs no check: `enable_checkpointing` falls back to the older entry point."""
    found = transformers.__version__
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if ATTN_NAME not in ALL_ATTENTION_FUNCTIONS or ATTN_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise SystemExit(f"ZipR1 needs transformers' AttentionInterface and AttentionMaskInterface (transformers >= "
                         f"{ACTIVATION_CHECKPOINTING_SINCE}); found transformers {found}")
    if not mm_encoder_outputs_reach_vision_path():
        raise SystemExit(f"ZipR1 needs transformers >= {MM_ENCODER_OUTPUTS_SINCE}: transformers {found} ignores "
                         f"`mm_encoder_outputs` (the encoded images would be dropped); install "
                         f"transformers>={ACTIVATION_CHECKPOINTING_SINCE} (requirements.txt)")
    checkpointing = ACTIVATION_CHECKPOINTING if hasattr(transformers.PreTrainedModel, ACTIVATION_CHECKPOINTING) \
        else "gradient_checkpointing_enable(use_reentrant=False)"
    return (f"transformers {found} ({transformers.__file__}): AttentionInterface ok, mm_encoder_outputs reaches the "
            f"vision path, checkpointing via {checkpointing}")


def mm_encoder_outputs_reach_vision_path() -> bool:
    """True iff Qwen2.5-VL's forward uses the features passed as `mm_encoder_outputs` for its image tokens."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    text = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, bos_token_id=0, eos_token_id=1,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 0]})
    vision = dict(depth=1, hidden_size=8, intermediate_size=8, num_heads=2, out_hidden_size=8, fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                              vision_start_token_id=2, image_token_id=3, vision_end_token_id=4, video_token_id=5)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        model = Qwen2_5_VLModel(config).eval()
        ids, grid = torch.tensor([[2, 3, 4]]), torch.tensor([[1, 2, 2]])  # one image of 2x2 patches -> 1 token

        def hidden(value: float) -> torch.Tensor:
            image = BaseModelOutputWithPooling(pooler_output=[torch.full((1, 8), value)])  # 1 merged token, dim 8
            return model(input_ids=ids, image_grid_thw=grid, mm_encoder_outputs={"image": image}).last_hidden_state
        return not torch.equal(hidden(0.0), hidden(1.0))


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of the decoder layers (the recomputation gets the same zipr1_state).
    transformers >= 5.23 calls it `activation_checkpointing_enable`; before, `gradient_checkpointing_enable` with
    use_reentrant=False sets the same per-layer checkpoint function (same gradients: tests/test_train.py)."""
    if hasattr(model, ACTIVATION_CHECKPOINTING):
        getattr(model, ACTIVATION_CHECKPOINTING)()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def make_sparse(model):
    """Switch the text decoder of a Qwen2(.5)-VL model to Top-p sparse attention; the vision tower is untouched.
    A learned probe scorer saved beside the weights (SCORER_FILE, `add_probe_scorers`) is loaded with it."""
    model.set_attn_implementation({"text_config": ATTN_NAME, "vision_config": "sdpa"})
    scorer_file = Path(str(model.name_or_path)) / SCORER_FILE
    if scorer_file.is_file():
        load_probe_scorers(model, scorer_file)
    return model


# ----------------------------------------------------------------------------------------------- saved probe scorers
SCORER_FILE = "probe_scorer.safetensors"  # beside model.safetensors, which stays loadable by plain transformers


def load_probe_scorers(model, path) -> None:
    """Attach the scorers of a SCORER_FILE; one line naming the file if they do not fit this model."""
    from safetensors.torch import load_file
    weights, attentions = load_file(str(path)), decoder_attentions(model)
    n_layers, heads, dim = len(attentions), text_config(model).num_key_value_heads, attentions[0].head_dim
    want = {f"layers.{j}" for j in range(n_layers)}
    if set(weights) != want or any(tuple(w.shape) != (heads, dim) for w in weights.values()):
        raise ValueError(f"{path}: expected {n_layers} probe scorers layers.0..{n_layers - 1} of shape ({heads}, "
                         f"{dim}), got {sorted((k, tuple(w.shape)) for k, w in weights.items())}")
    add_probe_scorers(model, weights)


def split_probe_scorers(state_dict: dict) -> tuple[dict, dict]:
    """A model state dict -> (the rest, for save_pretrained; the scorers as SCORER_FILE holds them)."""
    scorers = {k: v for k, v in state_dict.items() if k.endswith("." + SCORER)}
    layer = lambda name: re.search(r"layers\.(\d+)\.self_attn\.", name).group(1)  # noqa: E731
    rest = {k: v for k, v in state_dict.items() if k not in scorers}
    return rest, {f"layers.{layer(k)}": v.detach().contiguous() for k, v in scorers.items()}


def text_config(model):
    return model.config.get_text_config(decoder=True)


def make_state(model, keep_p, mode="prefill", batch_size=None, **kw) -> SparseState:
    batch_size = batch_size or len(torch.as_tensor(keep_p).flatten())  # B
    device = next(model.parameters()).device
    return SparseState(keep_p=check_keep_p(keep_p, batch_size, device), mode=mode, **kw)
