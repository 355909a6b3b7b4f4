"""ViT-stage merging inside SigLIP encoder layers (the vision tower of LLaVA-OneVision).

Each batch row of the encoder is one crop or frame; each is merged independently, so every row keeps the same
count and the hidden states stay a dense `[rows, tokens, dim]` tensor.

The merge happens inside layer k, after the attention residual and before LN2/MLP. The scores come from the
layer's own q and k (captured by forward hooks on `q_proj` / `k_proj`), so they are the same whatever attention
backend the model runs.
"""

from __future__ import annotations

import functools
import types

import torch

from .. import merge
from ..state import IllavaState
from ..trace import VisionTrace


def _capture_output(slot: dict, key: str):
    def hook(module, inputs, output):
        slot[key] = output

    return hook


def merging_layer_forward(merge_step):
    """Forward of a SigLIP / SigLIP2 encoder layer with `merge_step(layer, hidden_states)` between the attention
    residual and LN2/MLP. Same computation as `SiglipEncoderLayer.forward` / `Siglip2EncoderLayer.forward` of
    every transformers release of the tested window otherwise (`illava.compat`, checked on each). Run eagerly under
    torch.compile: the merge is data-dependent, and the q/k it scores come from projection hooks, whose side
    effects a compiled frame does not hand over (torch 2.6)."""

    @torch.compiler.disable
    def forward(layer, hidden_states, attention_mask=None, **kwargs):
        residual = hidden_states
        attention_output, _ = layer.self_attn(
            hidden_states=layer.layer_norm1(hidden_states), attention_mask=attention_mask, **kwargs
        )
        hidden_states = merge_step(layer, residual + attention_output, attention_mask)
        residual = hidden_states
        return residual + layer.mlp(layer.layer_norm2(hidden_states))

    return forward


def captured_query_key(layer, slot: dict, rows: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's q and k `[rows, heads, tokens, head_dim]` from the projections captured by `capture_query_key`."""
    head_dim = layer.self_attn.head_dim
    query = slot.pop("q").view(rows, tokens, -1, head_dim).transpose(1, 2)
    key = slot.pop("k").view(rows, tokens, -1, head_dim).transpose(1, 2)
    return query, key


def capture_query_key(state: IllavaState, layer) -> dict:
    slot: dict = {}
    state.add_hook(layer.self_attn.q_proj.register_forward_hook(_capture_output(slot, "q")))
    state.add_hook(layer.self_attn.k_proj.register_forward_hook(_capture_output(slot, "k")))
    return slot


def _merge_step(state: IllavaState, slot: dict, layer, hidden_states, attention_mask) -> torch.Tensor:
    """Merge every row (crop/frame) of `[rows, tokens, dim]`; rows are never padded in LLaVA-OneVision."""
    if attention_mask is not None:
        raise ValueError("illava: ViT merging in a SigLIP tower that receives an attention mask is not supported")
    entry: VisionTrace = state.trace.vision[-1]
    rows, tokens, _ = hidden_states.shape
    query, key = captured_query_key(layer, slot, rows, tokens)
    r = state.config.vit_tokens_removed(tokens)
    if r == 0:
        entry.tokens_per_group.append(tokens)
        if entry.sources is not None:
            entry.source_history.append(entry.sources)
        return hidden_states
    scores = merge.attention_received(query, key, layer.self_attn.scale)
    hidden_states, plan = merge.merge_tokens(hidden_states, scores, r, **state.config.merge_options("vit"))
    entry.positions = merge.update_positions(entry.positions, plan)
    if entry.sources is not None:
        entry.sources = merge.update_sources(entry.sources, plan)
        entry.source_history.append(entry.sources)
    entry.tokens_per_group.append(tokens - r)
    return hidden_states


def patch_siglip_vision_model(state: IllavaState, vision_model, modality_of_call) -> None:
    """Trace every call of a `SiglipVisionModel` instance and, with the ViT stage on, merge inside
    `state.config.illava_vit_k` layers.

    `modality_of_call()` names what the current encoder call is encoding ("image", "video", ...).
    """
    config = state.config
    patch_size = vision_model.config.patch_size
    merge_layers = config.illava_vit_k if config.enable_illava_vit else ()

    def start_trace(module, args, kwargs):
        pixel_values = args[0] if args else kwargs["pixel_values"]
        grid = (pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size)
        positions = merge.initial_sources(pixel_values.shape[0], grid[0] * grid[1], pixel_values.device)
        state.trace.vision.append(
            VisionTrace(
                modality=modality_of_call(),
                grid=grid,
                merge_layers=merge_layers,
                tokens_per_group=[grid[0] * grid[1]],
                positions=positions,
                sources=positions.clone() if config.illava_track_vit_source and merge_layers else None,
            )
        )

    state.add_hook(vision_model.register_forward_pre_hook(start_trace, with_kwargs=True))
    for layer_index in merge_layers:
        layer = vision_model.encoder.layers[layer_index]
        slot = capture_query_key(state, layer)
        step = functools.partial(_merge_step, state, slot)
        state.set_attribute(layer, "forward", types.MethodType(merging_layer_forward(step), layer))
