"""ViT-stage merging inside SigLIP encoder layers (the vision tower of LLaVA-OneVision).

Each batch row of the encoder is one crop or frame; each is merged independently, so every row keeps the same
count and the hidden states stay a dense `[rows, tokens, dim]` tensor.

The merge happens inside layer k, after the attention residual and before LN2/MLP. The scores are the attention
the layer's own q and k give each token: computed by the layer's attention itself where it runs sdpa
(`scored_attention`), else from q and k captured by forward hooks on `q_proj` / `k_proj`; the same whatever
attention backend the model runs.
"""

from __future__ import annotations

import functools

import torch

from .. import merge
from ..state import IllavaState
from ..trace import VisionTrace
from .scored_attention import score_in_attention
from .vision_stage import VisionRun, VisionStage, merge_groups


def merging_layer_forward(merge_step):
    """Forward of a SigLIP / SigLIP2 encoder layer with `merge_step(layer, hidden_states, attention_mask)` between the
    attention residual and LN2/MLP. Same computation as `SiglipEncoderLayer.forward` / `Siglip2EncoderLayer.forward`
    of every transformers release of the tested window otherwise (`illava.compat`, checked on each)."""

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
    """The layer's q and k `[rows, heads, tokens, head_dim]` from its captured projections."""
    head_dim = layer.self_attn.head_dim
    query = slot.pop("q").view(rows, tokens, -1, head_dim).transpose(1, 2)
    key = slot.pop("k").view(rows, tokens, -1, head_dim).transpose(1, 2)
    return query, key


class SiglipStage(VisionStage):
    """The ViT stage on a `SiglipVisionModel` instance (LLaVA-OneVision's tower); every call is traced.
    `modality_of_call()` names what the current encoder call is encoding ("image", "video", ...)."""

    def __init__(self, state: IllavaState, vision_model, modality_of_call):
        self.patch_size = vision_model.config.patch_size
        self.modality_of_call = modality_of_call
        config = state.config
        merge_layers = config.illava_vit_k if config.enable_illava_vit else ()
        super().__init__(state, vision_model, vision_model.encoder.layers, merge_layers)

    def start(self, args, kwargs):
        pixel_values = args[0] if args else kwargs["pixel_values"]
        rows, cols = pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size
        grids = torch.tensor([[rows, cols]], device=pixel_values.device).expand(pixel_values.shape[0], 2)
        track = self.config.illava_track_vit_source and bool(self.merge_layers)
        return VisionRun.start(grids, track, modality=self.modality_of_call())

    def capture(self, layer):
        slot: dict = {}
        if not score_in_attention(self.state, layer.self_attn, slot):
            slot = self.capture_outputs(q=layer.self_attn.q_proj, k=layer.self_attn.k_proj)
        return slot

    def layer_forward(self, slot):
        merging_forward = merging_layer_forward(functools.partial(self._merge, slot))

        def forward(layer, *args, **kwargs):
            slot.clear()  # what a failed call may have left
            slot["score"] = self.run is not None and any(
                self.config.vit_tokens_removed(count) for count in self.run.counts[-1].tolist())
            return merging_forward(layer, *args, **kwargs)

        return forward

    def _merge(self, slot: dict, layer, hidden_states, attention_mask) -> torch.Tensor:
        """Merge every row (crop/frame) of `[rows, tokens, dim]`; rows are never padded in LLaVA-OneVision, and all
        keep the same count. Scores from the layer's own attention (`scored_attention`) or from its captured q and
        k (other attention implementations)."""
        if attention_mask is not None:
            raise ValueError("illava: ViT merging in a SigLIP tower that receives an attention mask is not supported")
        run = self.run
        rows, tokens, _ = hidden_states.shape
        received = slot.pop("received", None)

        def scores():  # called only where the layer removes tokens
            if received is not None:
                return torch.cat(received).view(rows, tokens) / tokens
            query, key = captured_query_key(layer, slot, rows, tokens)
            return merge.attention_received(query, key, layer.self_attn.scale)

        removed = run.removals(self.config.vit_tokens_removed, lambda row: f"crop/frame {row} ({tokens} tokens)",
                               self.describe_setting())
        merged, plan = merge_groups(run, hidden_states, scores, removed, self.config.merge_options("vit"))
        return merged if plan is None else merge.compact(merged, plan.keep)

    def finish(self, run, output):
        self.state.trace.vision.append(
            VisionTrace(
                modality=run.modality,
                grid=tuple(int(side) for side in run.grids[0]),
                merge_layers=self.merge_layers,
                tokens_per_group=[int(counts[0]) for counts in run.counts],
                positions=run.positions,
                sources=run.sources,
                source_history=run.source_history,
            )
        )
        return output
