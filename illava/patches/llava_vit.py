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

import types

import torch

from ..models.llava_vit import apply_rotary_pos_emb_vision, check_grid_thw
from ..state import IllavaState
from ..trace import VisionTrace
from .packed import PackedRun, merge_packed

MODEL_CLASSES = ()
MODEL_CLASS_NAMES = ("LlavaViTPackingModel",)


def apply(state: IllavaState, model, processor=None) -> None:
    config = state.config
    layers = model.encoder.layers
    config.validate_vit(len(layers))  # segment sizes vary; each is checked when merged
    if config.enable_illava_llm:
        raise ValueError("illava: LlavaViTPackingModel is a vision encoder; enable_illava_llm does not apply to it")
    if not config.enable_illava_vit:
        return
    EncoderMerger(state, model)


class EncoderMerger:
    def __init__(self, state: IllavaState, model):
        self.state = state
        self.config = state.config
        self.model = model
        self.run: PackedRun | None = None
        self.grid_thw: torch.Tensor | None = None
        self.merged_rows: torch.Tensor | None = None  # [S] grid_thw row of each merged segment (rows with patches)
        self.head_calls = 0
        self.laid_out_rows: torch.Tensor | None = None
        self.kept_per_row: list[int] = []
        merge_layers = self.config.illava_vit_k
        layers = model.encoder.layers
        state.add_hook(model.register_forward_pre_hook(self._start, with_kwargs=True))
        state.add_hook(model.register_forward_hook(self._finish, always_call=True))
        state.add_hook(layers[merge_layers[0]].register_forward_pre_hook(self._remember_rotary, with_kwargs=True))
        for index in range(merge_layers[0] + 1, len(layers)):
            state.add_hook(layers[index].register_forward_pre_hook(self._reslice, with_kwargs=True))
        for index in merge_layers:
            layer = layers[index]
            slot: dict = {}
            state.add_hook(layer.self_attn.qkv.register_forward_hook(lambda module, args, out, slot=slot: slot.update(qkv=out)))
            state.set_attribute(layer, "forward", types.MethodType(self._merging_forward(slot), layer))
        if getattr(model, "head", None) is not None:
            state.add_hook(model.encoder.register_forward_hook(self._lay_out_on_original_segments))
            state.add_hook(model.head.register_forward_pre_hook(self._survivors_of_segment))

    def _start(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        grid_thw = args[1] if len(args) > 1 else kwargs["grid_thw"]
        check_grid_thw(grid_thw, hidden.shape[0], allow_empty_rows=True)  # this hook runs before the model's check
        self.grid_thw = grid_thw.to(hidden.device, torch.long)
        lengths = self.grid_thw.prod(dim=-1)
        self.merged_rows = (lengths > 0).nonzero().flatten()  # an empty segment has nothing to merge
        grid = self.grid_thw[self.merged_rows]
        cu_seqlens = torch.nn.functional.pad(lengths[self.merged_rows].cumsum(0), (1, 0)).to(torch.int32)
        grids = torch.stack((grid[:, 0] * grid[:, 1], grid[:, 2]), dim=1)  # frames stacked vertically
        self.run = PackedRun.start(cu_seqlens, grids, 1, self.config.illava_track_vit_source)
        self.head_calls = 0
        self.laid_out_rows = None
        self.kept_per_row = []
        self.state.trace.clear()

    def _merging_forward(self, slot: dict):
        """`LlavaViTEncoderLayer.forward` (pre-LN) with the merge between the attention residual and the MLP; eager
        under torch.compile, like the other merging layers (`qwen2_vl.PackedVision._merging_forward`)."""

        @torch.compiler.disable
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
            t, h, w = (int(v) for v in self.grid_thw[row])
            return f"segment {row} (t, h, w = {t}, {h}, {w})"

        return merge_packed(
            run, hidden_states, query, key, attention.scale, 1, self.config.vit_tokens_removed, describe,
            setting=f"illava_vit_r={self.config.illava_vit_r}", options=self.config.merge_options("vit"),
        )

    def _remember_rotary(self, module, args, kwargs):
        if self.run is not None:
            self.run.rotary = kwargs["position_embeddings"]

    def _reslice(self, module, args, kwargs):
        run = self.run
        if run is None or len(run.counts) == 1:
            return None
        if run.sliced is None:
            cos, sin = run.rotary
            run.sliced = {"cu_seqlens": run.cu_seqlens, "position_embeddings": (cos[run.origin], sin[run.origin])}
        kwargs.update(run.sliced)
        return args, kwargs

    def _lay_out_on_original_segments(self, module, args, output):
        """Survivors of segment i at the start of its original range, zeros after (see the module docstring)."""
        run = self.run
        hidden = output[0] if isinstance(output, tuple) else output
        original = torch.nn.functional.pad(self.grid_thw.prod(dim=-1).cumsum(0), (1, 0))
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

    def _finish(self, module, args, output):
        run, self.run = self.run, None
        if run is None or output is None:
            return output
        if self.laid_out_rows is not None:
            if isinstance(output, tuple):
                output = (output[0][self.laid_out_rows], *output[1:])
            else:
                output.last_hidden_state = output.last_hidden_state[self.laid_out_rows]
        segment_of_row = {row: segment for segment, row in enumerate(self.merged_rows.tolist())}
        for row, (t, h, w) in enumerate(self.grid_thw.tolist()):
            rows, cols = t * h, w  # frames stacked vertically
            segment = segment_of_row.get(row)
            counts = [0 if segment is None else int(step[segment]) for step in run.counts]
            # an empty row (not merged) takes zero-width slices of the first segment's tables
            table_row = 0 if segment is None else segment
            self.state.trace.vision.append(
                VisionTrace(
                    modality="vision",
                    grid=(rows, cols),
                    merge_layers=self.config.illava_vit_k,
                    tokens_per_group=counts,
                    positions=run.positions[table_row : table_row + 1, : counts[-1]],
                    sources=None if run.sources is None else run.sources[table_row : table_row + 1, : rows * cols],
                    source_history=[step[table_row : table_row + 1, : rows * cols] for step in run.source_history],
                    groups_per_item=[1],
                )
            )
        return output
