"""SigLIP2 NaFlex (`Siglip2VisionModel`, also inside `Siglip2Model`): ViT-stage merging per image of a padded
batch `[B, max_patches, C*p*p]` with `pixel_attention_mask` and `spatial_shapes`. Checked on the tested window (`illava.compat`).

Each image merges among its own valid patches (an int r: tokens per layer; a float: that fraction of the image's
current tokens). Survivors are moved to the front of their row and the batch is cut to the longest survivor
count, so later layers really run on fewer tokens; the padding mask follows and the bidirectional attention
mask of later layers is rebuilt from it with transformers' own `create_bidirectional_mask`. The pooling head
uses the same mask. In `last_hidden_state`, image b's survivors are rows `[0, n_b)` with
`n_b = illava.last_trace(model).vision[b].tokens_per_group[-1]`, in the original raster order.
"""

from __future__ import annotations

import functools
import types

import torch
from transformers import Siglip2Model, Siglip2VisionModel
from .. import merge
from ..compat import create_bidirectional_mask
from ..state import IllavaState
from ..trace import VisionTrace
from .packed import removals
from .siglip import capture_query_key, captured_query_key, merging_layer_forward

MODEL_CLASSES = (Siglip2VisionModel, Siglip2Model)


def apply(state: IllavaState, model, processor=None) -> None:
    config = state.config
    vision = model.vision_model if isinstance(model, Siglip2Model) else model
    config.validate_vit(len(vision.encoder.layers))  # image sizes vary; each image is checked when merged
    if config.enable_illava_llm:
        raise ValueError(f"illava: {type(model).__name__} has no language model; enable_illava_llm does not apply")
    if config.enable_illava_vit:
        NaflexMerger(state, vision)


class NaflexMerger:
    def __init__(self, state: IllavaState, vision: Siglip2VisionModel):
        self.state = state
        self.config = state.config
        self.vision = vision
        self.valid: torch.Tensor | None = None  # [B, L] current padding mask
        self.positions: torch.Tensor | None = None  # [B, L] original raster index of each token, -1 padding
        self.sources: torch.Tensor | None = None
        self.counts: list[torch.Tensor] = []
        self.source_history: list[torch.Tensor] = []
        self.spatial_shapes: torch.Tensor | None = None
        self.mask_for_layers = None
        self.merged = False  # whether this call has shortened the sequence yet
        layers = vision.encoder.layers
        merge_layers = self.config.illava_vit_k
        state.add_hook(vision.register_forward_pre_hook(self._start, with_kwargs=True))
        state.add_hook(vision.register_forward_hook(self._finish, always_call=True))
        for index in range(merge_layers[0] + 1, len(layers)):
            state.add_hook(layers[index].register_forward_pre_hook(self._use_current_mask))
        for index in merge_layers:
            layer = layers[index]
            step = functools.partial(self._merge, capture_query_key(state, layer))
            state.set_attribute(layer, "forward", types.MethodType(merging_layer_forward(step), layer))
        if vision.use_head:
            state.add_hook(vision.head.register_forward_pre_hook(self._head_mask))

    def _start(self, module, args, kwargs):
        names = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
        values = dict(zip(names, args), **{name: kwargs[name] for name in names if name in kwargs})
        self.valid = values["pixel_attention_mask"].bool()
        self.spatial_shapes = values["spatial_shapes"]
        self.positions = torch.where(self.valid, torch.arange(self.valid.shape[1], device=self.valid.device), -1)
        self.sources = self.positions.clamp(min=0) if self.config.illava_track_vit_source else None
        self.counts = [self.valid.sum(dim=1)]
        self.source_history = []
        self.mask_for_layers = None
        self.merged = False
        self.state.trace.clear()

    def _merge(self, slot: dict, layer, hidden_states, attention_mask):
        batch, tokens, dim = hidden_states.shape
        query, key = captured_query_key(layer, slot, batch, tokens)
        counts = self.counts[-1]

        def describe(image):
            height, width = (int(v) for v in self.spatial_shapes[image])
            return f"image {image} ({height}x{width} patches)"

        removed = removals(counts, self.config.vit_tokens_removed, describe, f"illava_vit_r={self.config.illava_vit_r}")
        if int(removed.max()) == 0:
            self.counts.append(counts)
            if self.sources is not None:
                self.source_history.append(self.sources)
            return hidden_states
        scores = merge.attention_received(query, key, layer.self_attn.scale, valid=self.valid)
        plan = merge.plan_merge(scores, removed, valid=self.valid, x=hidden_states, **self.config.merge_options("vit"))
        merged = merge.apply_merge(hidden_states, plan)
        kept = plan.keep.sum(dim=1)
        length = int(kept.max())
        rows, old_slot = plan.keep.nonzero(as_tuple=True)
        new_slot = (plan.keep.long().cumsum(dim=1) - 1)[rows, old_slot]
        compacted = hidden_states.new_zeros(batch, length, dim)
        compacted[rows, new_slot] = merged[rows, old_slot]
        positions = torch.full((batch, length), -1, dtype=torch.long, device=hidden_states.device)
        positions[rows, new_slot] = self.positions[rows, old_slot]
        if self.sources is not None:
            self.sources = merge.update_sources(self.sources, plan)
            self.source_history.append(self.sources)
        self.positions = positions
        self.valid = positions >= 0
        self.counts.append(kept)
        self.mask_for_layers = create_bidirectional_mask(
            config=self.vision.config, inputs_embeds=compacted, attention_mask=self.valid.long()
        )
        self.merged = True
        return compacted

    def _use_current_mask(self, module, args):
        if not self.merged:
            return None
        return (args[0], self.mask_for_layers, *args[2:])

    def _head_mask(self, module, args):
        if not self.merged:
            return None
        return (args[0], self.valid.long())

    def _finish(self, module, args, output):
        if self.valid is None:
            return output
        for image, (height, width) in enumerate(self.spatial_shapes.tolist()):
            final = int(self.counts[-1][image])
            self.state.trace.vision.append(
                VisionTrace(
                    modality="image",
                    grid=(height, width),
                    merge_layers=self.config.illava_vit_k,
                    tokens_per_group=[int(step[image]) for step in self.counts],
                    positions=self.positions[image : image + 1, :final],
                    sources=None if self.sources is None else self.sources[image : image + 1, : height * width],
                    source_history=[step[image : image + 1, : height * width] for step in self.source_history],
                    groups_per_item=[1],
                )
            )
        self.valid = None
        return output
