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

from transformers import Siglip2Model, Siglip2VisionModel

from .. import merge
from ..compat import create_bidirectional_mask
from ..registry import Family
from ..state import IllavaState
from ..trace import VisionTrace
from .siglip import captured_query_key, merging_layer_forward
from .vision_stage import VisionRun, VisionStage, compact_rows, merge_groups

def _vision_model(model) -> Siglip2VisionModel:
    return model.vision_model if isinstance(model, Siglip2Model) else model


def apply(state: IllavaState, model, processor=None) -> None:
    config = state.config
    vision = _vision_model(model)
    config.validate_vit(len(vision.encoder.layers))  # image sizes vary; each image is checked when merged
    if config.enable_illava_llm:
        raise ValueError(f"illava: {type(model).__name__} has no language model; enable_illava_llm does not apply")
    if config.enable_illava_vit:
        NaflexStage(state, vision)


class NaflexStage(VisionStage):
    """Each image of the padded batch is a group; survivors move to the front of their row."""

    def __init__(self, state: IllavaState, vision: Siglip2VisionModel):
        super().__init__(state, vision, vision.encoder.layers, state.config.illava_vit_k)
        if vision.use_head:
            state.before_forward(vision.head, self._head_mask)

    def start(self, args, kwargs):
        names = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
        values = dict(zip(names, args), **{name: kwargs[name] for name in names if name in kwargs})
        valid = values["pixel_attention_mask"].bool()
        self.state.trace.clear()
        # an image's valid patches come first in its row: its units are the first `valid.sum()` slots
        return VisionRun.start(values["spatial_shapes"], self.config.illava_track_vit_source,
                               units=valid.sum(dim=1), valid=valid)

    def capture(self, layer):
        return self.capture_outputs(q=layer.self_attn.q_proj, k=layer.self_attn.k_proj)

    def layer_forward(self, slot):
        return merging_layer_forward(functools.partial(self._merge, slot))

    def _merge(self, slot: dict, layer, hidden_states, attention_mask):
        run = self.run
        batch, tokens, dim = hidden_states.shape
        query, key = captured_query_key(layer, slot, batch, tokens)

        def describe(image):
            height, width = (int(v) for v in run.grids[image])
            return f"image {image} ({height}x{width} patches)"

        removed = run.removals(self.config.vit_tokens_removed, describe, self.describe_setting())
        valid = run.valid
        merged, plan = merge_groups(
            run, hidden_states, lambda: merge.attention_received(query, key, layer.self_attn.scale, valid=valid),
            removed, self.config.merge_options("vit"), valid=valid,
        )
        if plan is None:
            return hidden_states
        compacted = compact_rows(merged, plan.keep, fill=0)
        run.valid = run.positions >= 0
        run.attention_mask = create_bidirectional_mask(
            config=self.encoder.config, inputs_embeds=compacted, attention_mask=run.valid.long()
        )
        return compacted

    def reslice(self, index, args, kwargs):
        if len(args) > 1:
            return (args[0], self.run.attention_mask, *args[2:]), kwargs
        return args, dict(kwargs, attention_mask=self.run.attention_mask)

    def _head_mask(self, module, args):
        if self.run is None or not self.run.merged:
            return None
        return (args[0], self.run.valid.long())

    def finish(self, run, output):
        for image, (height, width) in enumerate(run.grids.tolist()):
            final = int(run.counts[-1][image])
            self.state.trace.vision.append(
                VisionTrace(
                    modality="image",
                    grid=(height, width),
                    merge_layers=self.merge_layers,
                    tokens_per_group=[int(step[image]) for step in run.counts],
                    positions=run.positions[image : image + 1, :final],
                    sources=None if run.sources is None else run.sources[image : image + 1, : height * width],
                    source_history=[step[image : image + 1, : height * width] for step in run.source_history],
                    groups_per_item=[1],
                )
            )
        return output

FAMILY = Family(name="siglip2", model_classes=(Siglip2VisionModel, Siglip2Model), apply=apply,
                vision_tower=_vision_model)
