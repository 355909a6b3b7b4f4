"""The packing encoders (`illava.models.packing_encoders`: `AIMv2Packing`, `DINOv3ViTPacking`,
`Siglip2NaflexPacking`): ViT-stage merging inside chosen encoder layers.

Every frame segment (an image; each frame of a `grid_thw` row with t > 1) merges on its own, inside layer k after
the attention residual and before the MLP, in the mode `illava_vit_mode` names. A patch's score is the attention it
receives in that layer from the queries of its segment (mean over heads), computed from the layer's own q and
k; DINOv3's CLS and register tokens take part in that attention as the layer computed it, but they are never merged
and never counted: an int `illava_vit_r` removes r patches per frame and layer, a float that fraction of the frame's
current patches. Survivors keep their true positions: AIMv2 and SigLIP2 add position embeddings once, before the
layers, so every survivor carries its own; DINOv3's later layers get the survivors' rows of the RoPE tables.

Output after merging: `last_hidden_state` holds the surviving patch tokens only, packed frame by frame in input order,
each frame's survivors in their original raster order. `illava.last_trace(model).vision[i]` describes `grid_thw` row i
(one group per frame): `tokens_per_group[-1]` survivors per frame, `positions[f]` their original raster indices
(row * w + col) and, with `illava_track_vit_source`, `source_map()` the survivor each original patch went into.
`pooler_output` pools each frame's survivors (the AIMv2 / SigLIP2 head) or is DINOv3's CLS, which attended to them.
"""

from __future__ import annotations

import types

import torch

from ..models.llava_vit import check_grid_thw
from ..models.packing_encoders import AIMv2Packing, DINOv3ViTPacking, PackedSegments, Siglip2NaflexPacking
from ..registry import Family
from ..state import IllavaState, eager
from ..trace import VisionTrace
from .packed import merge_packed, resliced_rotary
from .vision_stage import VisionRun, VisionStage


def apply(state: IllavaState, model, processor=None) -> None:
    config = state.config
    config.validate_vit(len(model.layers))  # frame sizes vary; each frame is checked when merged
    if config.enable_illava_llm:
        raise ValueError(f"illava: {type(model).__name__} is a vision encoder; enable_illava_llm does not apply to it")
    if config.enable_illava_vit:
        PackingEncoderStage(state, model)


class PackingEncoderStage(VisionStage):
    """Each frame of the packed call is a group of patch units; the encoder runs its layers through its own
    `encoder_layer(index, hidden, segments)`, so that method is what merges, and the `segments` every later layer
    and `finish` read carry the survivors' boundaries and RoPE rows."""

    def __init__(self, state: IllavaState, encoder):
        super().__init__(state, encoder, encoder.layers, state.config.illava_vit_k)

    def install_layers(self, layers) -> None:
        unmerged_layer = self.encoder.encoder_layer
        merge_layers = frozenset(self.merge_layers)

        @eager
        def merging_layer(encoder, index, hidden, segments):
            layer = encoder.layers[index]
            hidden, query, key = encoder.attention_residual(layer, hidden, segments)
            return encoder.mlp_residual(layer, self._merge(hidden, query, key, segments))

        def encoder_layer(encoder, index, hidden, segments):
            if index not in merge_layers or self.run is None:
                return unmerged_layer(index, hidden, segments)
            return merging_layer(encoder, index, hidden, segments)

        self.state.set_attribute(self.encoder, "encoder_layer", types.MethodType(encoder_layer, self.encoder))

    def start(self, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        grid_thw = args[1] if len(args) > 1 else kwargs["grid_thw"]
        self.state.trace.clear()
        grid = check_grid_thw(grid_thw, hidden_states.shape[0], allow_empty_rows=False)
        frames = torch.tensor([[h, w] for t, h, w in grid for _ in range(t)], device=hidden_states.device)
        lengths = frames.prod(dim=1) + self.encoder.num_prefix_tokens
        return VisionRun.start(
            frames, self.config.illava_track_vit_source,
            cu_seqlens=torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32),
            origin=torch.arange(int(lengths.sum()), device=hidden_states.device), grid_thw=grid_thw,
        )

    def _merge(self, hidden: torch.Tensor, query: torch.Tensor, key: torch.Tensor, segments: PackedSegments):
        run = self.run
        if len(run.counts) == 1:  # the first merge layer: the tables every later one takes its rows from
            run.rotary = segments.rotary

        def describe(frame):
            height, width = (int(side) for side in run.grids[frame])
            row = int(torch.searchsorted(run.grid_thw[:, 0].cumsum(0).cpu(), frame, right=True))
            return f"segment {frame} (grid_thw row {row}, {height}x{width} patches)"

        hidden = merge_packed(run, hidden, query, key, query.shape[-1] ** -0.5, 1, self.config.vit_tokens_removed,
                              describe, self.describe_setting(), self.config.merge_options("vit"),
                              prefix=segments.num_prefix)
        segments.cu_seqlens = run.cu_seqlens
        if run.rotary is not None and run.merged:
            segments.rotary = resliced_rotary(run)
        return hidden

    def finish(self, run, output):
        frame = 0
        for t, height, width in run.grid_thw.tolist():
            kept = int(run.counts[-1][frame])
            frames = slice(frame, frame + t)
            self.state.trace.vision.append(
                VisionTrace(
                    modality="vision",
                    grid=(height, width),
                    merge_layers=self.merge_layers,
                    tokens_per_group=[int(step[frame]) for step in run.counts],
                    positions=run.positions[frames, :kept],
                    sources=None if run.sources is None else run.sources[frames, : height * width],
                    source_history=[step[frames, : height * width] for step in run.source_history],
                    groups_per_item=[t],
                )
            )
            frame += t
        return output


FAMILY = Family(name="packing_encoders", model_classes=(AIMv2Packing, DINOv3ViTPacking, Siglip2NaflexPacking),
                apply=apply, vision_tower=lambda model: model)
