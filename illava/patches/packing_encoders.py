"""The seed's packing encoders (`illava.models.packing_encoders`: `AIMv2Packing`, `DINOv3ViTPacking`,
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

import dataclasses
import types

import torch

from .. import merge
from ..models.packing_encoders import AIMv2Packing, DINOv3ViTPacking, PackedSegments, Siglip2NaflexPacking
from ..registry import Family
from ..state import IllavaState
from ..trace import VisionTrace
from .packed import attention_mass
from .vision_stage import removals

def apply(state: IllavaState, model, processor=None) -> None:
    config = state.config
    config.validate_vit(len(model.layers))  # frame sizes vary; each frame is checked when merged
    if config.enable_illava_llm:
        raise ValueError(f"illava: {type(model).__name__} is a vision encoder; enable_illava_llm does not apply to it")
    if config.enable_illava_vit:
        PackedEncoderMerger(state, model)


@dataclasses.dataclass
class MergingCall:
    """One forward of the encoder, from its first merge layer on."""

    segments: PackedSegments  # the encoder's own, updated by every merge
    frames: list[tuple[int, int, int]]  # (grid_thw row, h, w) of each segment
    first_token: torch.Tensor  # [S] where each segment started in the sequence the layers began with
    origin: torch.Tensor  # [M] index of each current token in that sequence
    rotary: tuple[torch.Tensor, torch.Tensor] | None  # the per-token RoPE tables before any merge
    counts: list[torch.Tensor]  # [S] patches per segment, before the first merge layer and after each one
    standing: torch.Tensor | None  # [P] current token standing for each original patch (-1: none), when tracked
    source_history: list[torch.Tensor] = dataclasses.field(default_factory=list)  # [P] survivor index in its frame


class PackedEncoderMerger:
    def __init__(self, state: IllavaState, model):
        self.state = state
        self.config = state.config
        self.call: MergingCall | None = None
        merge_layers = frozenset(self.config.illava_vit_k)
        unmerged_layer = model.encoder_layer

        @torch.compiler.disable  # like every merging forward (`IllavaState.install_forward`)
        def merging_layer(encoder, index, hidden, segments):
            layer = encoder.layers[index]
            hidden, query, key = encoder.attention_residual(layer, hidden, segments)
            return encoder.mlp_residual(layer, self._merge(hidden, query, key, segments))

        def encoder_layer(encoder, index, hidden, segments):
            if index not in merge_layers:
                return unmerged_layer(index, hidden, segments)
            return merging_layer(encoder, index, hidden, segments)

        state.before_forward(model, self._start)
        state.after_forward(model, self._finish, always_call=True)
        state.set_attribute(model, "encoder_layer", types.MethodType(encoder_layer, model))

    def _start(self, module, args):
        self.call = None
        self.state.trace.clear()

    def _begin(self, hidden: torch.Tensor, segments: PackedSegments) -> MergingCall:
        frames = [(row, h, w) for row, (t, h, w) in enumerate(segments.grid_thw.tolist()) for _ in range(t)]
        _, offset = segments.token_layout()
        patch_tokens = (offset >= segments.num_prefix).nonzero().squeeze(1)  # the original patches, in order
        self.call = MergingCall(
            segments=segments,
            frames=frames,
            first_token=segments.cu_seqlens[:-1].long(),
            origin=torch.arange(hidden.shape[0], device=hidden.device),
            rotary=segments.rotary,
            counts=[torch.tensor([h * w for _, h, w in frames], device=hidden.device)],
            standing=patch_tokens if self.config.illava_track_vit_source else None,
        )
        return self.call

    def _merge(self, hidden: torch.Tensor, query: torch.Tensor, key: torch.Tensor, segments: PackedSegments):
        call = self.call if self.call is not None else self._begin(hidden, segments)
        counts = call.counts[-1]

        def describe(segment):
            row, h, w = call.frames[segment]
            return f"segment {segment} (grid_thw row {row}, {h}x{w} patches)"

        removed = removals(counts, self.config.vit_tokens_removed, describe, f"illava_vit_r={self.config.illava_vit_r}")
        if int(removed.max()) > 0:
            segment, offset = segments.token_layout()
            candidates = torch.where(offset >= segments.num_prefix, segment, -1)  # prefix tokens are no candidates
            scores = attention_mass(query, key, query.shape[-1] ** -0.5, segments.cu_seqlens)  # all three scale so
            merged = merge.merge_spans(
                hidden[None], scores[None], candidates[None], self.config.vit_tokens_removed,
                **self.config.merge_options("vit"),
            )
            keep = merged.keep[0]
            if call.standing is not None:
                standing = torch.where(call.standing >= 0, merged.representative[0][call.standing.clamp(min=0)], -1)
                new_index = keep.long().cumsum(0) - 1
                call.standing = torch.where(standing >= 0, new_index[standing.clamp(min=0)], -1)
            hidden = merged.hidden[0][keep]
            call.origin = call.origin[keep]
            kept_per_segment = torch.bincount(segment[keep], minlength=counts.numel())
            segments.cu_seqlens = torch.nn.functional.pad(kept_per_segment.cumsum(0), (1, 0)).to(torch.int32)
            if call.rotary is not None:
                segments.rotary = tuple(table[call.origin] for table in call.rotary)
        call.counts.append(counts - removed)
        if call.standing is not None:
            call.source_history.append(self._survivor_in_frame(call))
        return hidden

    @staticmethod
    def _survivor_in_frame(call: MergingCall) -> torch.Tensor:
        """`[P]` index, among its frame's current patches, of the token standing for each original patch."""
        _, offset = call.segments.token_layout()
        rank = offset - call.segments.num_prefix
        return torch.where(call.standing >= 0, rank[call.standing.clamp(min=0)], -1)

    def _finish(self, module, args, output):
        call, self.call = self.call, None
        if call is None or output is None:
            return output
        segments = call.segments
        segment, offset = segments.token_layout()
        is_patch = offset >= segments.num_prefix
        raster = (call.origin - call.first_token[segment] - segments.num_prefix)[is_patch]
        final = call.counts[-1].tolist()
        token_start = patch_start = frame = 0
        for row, (t, h, w) in enumerate(segments.grid_thw.tolist()):
            kept = final[frame]
            history = [step[patch_start : patch_start + t * h * w].view(t, h * w) for step in call.source_history]
            self.state.trace.vision.append(
                VisionTrace(
                    modality="vision",
                    grid=(h, w),
                    merge_layers=self.config.illava_vit_k,
                    tokens_per_group=[int(step[frame]) for step in call.counts],
                    positions=raster[token_start : token_start + t * kept].view(t, kept),
                    sources=history[-1] if history else None,
                    source_history=history,
                    groups_per_item=[t],
                )
            )
            token_start += t * kept
            patch_start += t * h * w
            frame += t
        return output


FAMILY = Family(name="packing_encoders", model_classes=(AIMv2Packing, DINOv3ViTPacking, Siglip2NaflexPacking),
                apply=apply, vision_tower=lambda model: model)
