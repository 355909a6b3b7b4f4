"""LLaVA-ViT packing encoder (`LlavaViTPackingModel`: `illava.models.llava_vit`, and the upstream OneVision-Encoder
class of the same name and module structure): ViT-stage merging inside chosen encoder layers.

Every `grid_thw` row is one segment (an image, or a whole video) and is merged independently, token by token
(this encoder has no 2x2 patch merger). Later layers get the survivors' `cu_seqlens` and rotary tables. The
attention-pooling head, which the model runs per segment with the boundaries it computed before the layers,
sees each segment's survivors: the encoder output is laid out on the original boundaries (survivors first,
zero padding after) and the head's input is cut back to the survivors; the returned `last_hidden_state` holds
the survivors only, packed, with `illava.last_trace(model)` telling which original patch each one is (one entry
per `grid_thw` row).

A row with t, h or w 0 holds no patch: as in the unpatched model it adds no token and its `pooler_output` row
pools nothing. Merging leaves it out (there is nothing to merge, and r must not count against it); its trace entry
counts 0 tokens at every step.
"""

from __future__ import annotations


import torch

from ..models.llava_vit import apply_rotary_pos_emb_vision, check_grid_thw
from ..registry import Family
from ..state import IllavaState
from ..trace import VisionTrace
from .packed import merge_packed, resliced_rotary, start_packed
from .vision_stage import VisionStage

def apply(state: IllavaState, model, processor=None) -> None:
    config = state.config
    layers = model.encoder.layers
    config.validate_vit(len(layers))  # segment sizes vary; each is checked when merged
    if config.enable_illava_llm:
        raise ValueError("illava: LlavaViTPackingModel is a vision encoder; enable_illava_llm does not apply to it")
    if not config.enable_illava_vit:
        return
    LlavaViTStage(state, model)


class LlavaViTStage(VisionStage):
    """Each `grid_thw` row with patches is a packed segment, merged token by token."""

    def __init__(self, state: IllavaState, model):
        super().__init__(state, model, model.encoder.layers, state.config.illava_vit_k)
        state.before_forward(model.encoder.layers[self.merge_layers[0]], self.remember_rotary, with_kwargs=True)
        if getattr(model, "head", None) is not None:
            state.after_forward(model.encoder, self._lay_out_on_original_segments)
            state.before_forward(model.head, self._survivors_of_segment)
        self.merged_rows: torch.Tensor | None = None  # [S] grid_thw row of each merged segment (rows with patches)
        self.head_calls = 0
        self.laid_out_rows: torch.Tensor | None = None
        self.kept_per_row: list[int] = []

    def start(self, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        grid_thw = args[1] if len(args) > 1 else kwargs["grid_thw"]
        check_grid_thw(grid_thw, hidden.shape[0], allow_empty_rows=True)  # this hook runs before the model's check
        grid_thw = grid_thw.to(hidden.device, torch.long)
        lengths = grid_thw.prod(dim=-1)
        self.merged_rows = (lengths > 0).nonzero().flatten()  # an empty segment has nothing to merge
        grid = grid_thw[self.merged_rows]
        cu_seqlens = torch.nn.functional.pad(lengths[self.merged_rows].cumsum(0), (1, 0)).to(torch.int32)
        grids = torch.stack((grid[:, 0] * grid[:, 1], grid[:, 2]), dim=1)  # frames stacked vertically
        self.head_calls = 0
        self.laid_out_rows = None
        self.kept_per_row = []
        self.state.trace.clear()
        return start_packed(cu_seqlens, grids, 1, self.config.illava_track_vit_source, grid_thw=grid_thw)

    def capture(self, layer):
        return self.capture_outputs(qkv=layer.self_attn.qkv)

    def layer_forward(self, slot: dict):
        """`LlavaViTEncoderLayer.forward` (pre-LN) with the merge between the attention residual and the MLP."""

        def forward(layer, hidden_states, cu_seqlens, position_embeddings):
            hidden_states = hidden_states + layer.self_attn(
                layer.layer_norm1(hidden_states), cu_seqlens=cu_seqlens, position_embeddings=position_embeddings
            )
            hidden_states = self._merge(layer, hidden_states, slot.pop("qkv"), position_embeddings)
            return hidden_states + layer.mlp(layer.layer_norm2(hidden_states))

        return forward

    def _merge(self, layer, hidden_states, qkv, position_embeddings):
        run = self.run
        attention = layer.self_attn
        query, key, _ = qkv.view(hidden_states.shape[0], 3, attention.num_heads, -1).unbind(1)
        query, key = apply_rotary_pos_emb_vision(query.float(), key.float(), *position_embeddings)

        def describe(segment):
            row = int(self.merged_rows[segment])
            t, h, w = (int(v) for v in run.grid_thw[row])
            return f"segment {row} (t, h, w = {t}, {h}, {w})"

        return merge_packed(
            run, hidden_states, query, key, attention.scale, 1, self.config.vit_tokens_removed, describe,
            setting=self.describe_setting(), options=self.config.merge_options("vit"),
        )

    def reslice(self, index, args, kwargs):
        run = self.run
        if run.sliced is None:
            run.sliced = {"cu_seqlens": run.cu_seqlens, "position_embeddings": resliced_rotary(run)}
        kwargs.update(run.sliced)
        return args, kwargs

    def _lay_out_on_original_segments(self, module, args, output):
        """Survivors of segment i at the start of its original range, zeros after (see the module docstring)."""
        run = self.run
        hidden = output[0] if isinstance(output, tuple) else output
        original = torch.nn.functional.pad(run.grid_thw.prod(dim=-1).cumsum(0), (1, 0))
        lengths = (run.cu_seqlens[1:] - run.cu_seqlens[:-1]).long()
        segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=hidden.device), lengths)
        rank = torch.arange(hidden.shape[0], device=hidden.device) - run.cu_seqlens[:-1].long()[segment]
        laid_out = hidden.new_zeros(int(original[-1]), hidden.shape[-1])
        self.laid_out_rows = original[:-1][self.merged_rows][segment] + rank
        laid_out[self.laid_out_rows] = hidden
        kept_per_row = torch.zeros_like(original[1:])
        kept_per_row[self.merged_rows] = run.counts[-1]
        self.kept_per_row = kept_per_row.tolist()  # the head runs once per grid_thw row, empty ones included
        return (laid_out, *output[1:]) if isinstance(output, tuple) else laid_out

    def _survivors_of_segment(self, module, args):
        kept = self.kept_per_row[self.head_calls]
        self.head_calls += 1
        return (args[0][:, :kept],)

    def finish(self, run, output):
        if self.laid_out_rows is not None:
            if isinstance(output, tuple):
                output = (output[0][self.laid_out_rows], *output[1:])
            else:
                output.last_hidden_state = output.last_hidden_state[self.laid_out_rows]
        segment_of_row = {row: segment for segment, row in enumerate(self.merged_rows.tolist())}
        for row, (t, h, w) in enumerate(run.grid_thw.tolist()):
            rows, cols = t * h, w  # frames stacked vertically
            segment = segment_of_row.get(row)
            counts = [0 if segment is None else int(step[segment]) for step in run.counts]
            # an empty row (not merged) takes zero-width slices of the first segment's tables
            table_row = 0 if segment is None else segment
            self.state.trace.vision.append(
                VisionTrace(
                    modality="vision",
                    grid=(rows, cols),
                    merge_layers=self.merge_layers,
                    tokens_per_group=counts,
                    positions=run.positions[table_row : table_row + 1, : counts[-1]],
                    sources=None if run.sources is None else run.sources[table_row : table_row + 1, : rows * cols],
                    source_history=[step[table_row : table_row + 1, : rows * cols] for step in run.source_history],
                    groups_per_item=[1],
                )
            )
        return output

FAMILY = Family(name="llava_vit", model_classes=(), model_class_names=("LlavaViTPackingModel",), apply=apply,
                vision_tower=lambda model: model)
