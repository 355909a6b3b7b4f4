"""The vision tower of Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE) and Qwen3.5(-MoE): ViT-stage merging in its packed blocks,
the features each image/video keeps, and M-RoPE positions that follow the survivors. Shared by the `qwen2_vl` and
`qwen3_vl` families; checked on the tested window (`illava.compat`).

Inside each chosen block (after the attention residual, before the MLP), every `cu_seqlens` segment (one image, or
one temporal slice of a video: every slice is kept) loses `illava_vit_r` 2x2 windows (an int: windows per layer; a
float: that fraction of the current windows), so the PatchMerger still fuses real windows. Later blocks get
`cu_seqlens`, `max_seqlen` and rotary cos/sin re-sliced for the survivors.

The language model then receives one token per surviving window; the M-RoPE position of each surviving visual
token is its true (t, h, w) position; text positions are exactly those of the unmerged prompt (an image still
advances the text position by its full extent), so decoding continues at the right place.
"""

from __future__ import annotations

import inspect

import torch

from .. import compat, merge
from ..state import IllavaState
from ..trace import VisionTrace
from .common import EncoderCall, patch_encoding
from .packed import current_boundaries, merge_packed, resliced_rotary, start_packed
from .scored_attention import score_in_attention
from .vision_stage import VisionRun, VisionStage

MODALITY_OF_TOKEN_TYPE = {1: "image", 2: "video"}


class QwenVisionStage(VisionStage):
    """The ViT stage on a Qwen2-VL / Qwen2.5-VL vision tower instance.

    Qwen2.5-VL reorders the patches into attention windows (`window_index`) and runs most blocks on windows
    (`cu_window_seqlens`), a few on whole images (`fullatt_block_indexes`). A merge layer may be any block: tokens
    are scored by the attention they receive in that block (within its windows, or the whole image), each image /
    frame loses its lowest-scored 2x2 units, the survivors stay in their windows, and both the image and the
    window boundaries are recomputed for later blocks. The tower's `pooler_output` keeps the full window count
    (zeros at merged-away windows) so transformers' own window un-permutation and per-image split still apply;
    `get_image_features` / `get_video_features` return the surviving windows only.
    """

    def __init__(self, state: IllavaState, visual, call: EncoderCall):
        self.visual = visual
        self.call = call
        self.unit = visual.spatial_merge_size**2
        self.full_attention_blocks = getattr(visual, "fullatt_block_indexes", None)  # None: no windows
        self.window_index: torch.Tensor | None = None
        config = state.config
        super().__init__(state, visual, visual.blocks, config.illava_vit_k if config.enable_illava_vit else ())
        if self.merge_layers:
            state.after_forward(visual.merger, self._expand)
            for deepstack_merger in getattr(visual, "deepstack_merger_list", ()):  # Qwen3-VL
                state.after_forward(deepstack_merger, self._follow)
            state.before_forward(visual.blocks[self.merge_layers[0]], self.remember_rotary, with_kwargs=True)

    # -- window arithmetic shared with the processor side ---------------------------------------------------

    def windows_after(self, windows: int) -> int:
        """Windows a segment of `windows` keeps after the merge layers."""
        if not self.merge_layers:
            return windows
        return self.config.vit_token_counts(windows)[-1]

    def llm_tokens(self, grid_thw) -> int:
        t, h, w = (int(value) for value in grid_thw)
        return t * self.windows_after(h * w // self.unit)

    # -- encoder call ---------------------------------------------------------------------------------------

    def start(self, args, kwargs):
        grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        device = (args[0] if args else kwargs["hidden_states"]).device
        side = self.visual.spatial_merge_size
        windows = None
        if self.full_attention_blocks is not None:
            windows = compat.get_vision_window_index(grid_thw, spatial_merge_size=side,
                                                     window_size=self.visual.window_size,
                                                     patch_size=self.visual.patch_size)
        run, self.window_index = start_qwen_run(grid_thw, side, device, self.config.illava_track_vit_source, windows,
                                                modality=self.call.modality)
        return run

    def capture(self, block):
        slot: dict = {}
        if not score_in_attention(self.state, block.attn, slot):
            slot = self.capture_outputs(qkv=block.attn.qkv)
        return slot

    def finish(self, run, output):
        self._record(run)
        if run.followers and run.merged:
            if not hasattr(output, "deepstack_features"):  # return_dict=False: a tuple
                raise ValueError("illava: call the Qwen3-VL vision tower with return_dict=True while ViT merging is on")
            output.deepstack_features = [self._full_units(run, features) for features in run.followers]
        return output

    def _record(self, run: VisionRun) -> None:
        """One `VisionTrace` per image/video (its temporal slices share a grid), in raster order of windows."""
        first = 0
        for count in run.grid_thw[:, 0].tolist():
            rows, cols = (int(v) for v in run.grids[first])
            final = int(run.counts[-1][first])
            positions, sources, history = [], [], [[] for _ in run.source_history]
            for segment in range(first, first + count):
                offset = int(run.counts[0][:segment].sum())
                # permuted unit -> raster unit within the segment (identity without attention windows)
                raster = self.window_index[offset : offset + rows * cols] - offset
                survivors = raster[run.positions[segment, :final]]
                order = survivors.argsort()
                positions.append(survivors[order])
                if run.sources is not None:
                    rank = torch.empty_like(order)
                    rank[order] = torch.arange(final, device=order.device)
                    by_raster = torch.empty_like(raster)
                    raw_sources = run.sources[segment, : rows * cols]
                    by_raster[raster] = torch.where(raw_sources >= 0, rank[raw_sources.clamp(min=0)], -1)
                    sources.append(by_raster)
                    for step, raw in zip(history, run.source_history):
                        partition = torch.empty_like(raster)
                        partition[raster] = raw[segment, : rows * cols]
                        step.append(partition)
            local = torch.arange(count)[:, None] * final + torch.arange(final)
            self.state.trace.vision.append(
                VisionTrace(
                    modality=run.modality,
                    grid=(rows, cols),
                    merge_layers=tuple(self.merge_layers),
                    tokens_per_group=[int(step[first]) for step in run.counts],
                    positions=torch.stack(positions),
                    sources=torch.stack(sources) if sources else None,
                    source_history=[torch.stack(step) for step in history if step],
                    groups_per_item=[count],
                    features=local,
                    window=self.visual.spatial_merge_size,
                )
            )
            first += count

    def _expand(self, module, args, pooled):
        """Merger output of the survivors -> the full unit count (zeros where units were merged away), in the
        encoder's own unit order, so what the encoder does next (un-permuting windows) still applies."""
        run = self.run
        if run is None or not run.merged:
            return pooled
        return self._full_units(run, pooled)

    def _full_units(self, run: VisionRun, features: torch.Tensor) -> torch.Tensor:
        return full_units(run, features, self.window_index.numel(), self.unit)

    def _follow(self, module, args, features):
        """A DeepStack merger's output (one row per current window): later merges apply to it as well; the
        encoder's output carries it at the full window count, like `pooler_output`."""
        if self.run is not None:
            self.run.followers.append(features)

    # -- blocks ---------------------------------------------------------------------------------------------

    def layer_forward(self, slot: dict):
        """`Qwen2VLVisionBlock` / `Qwen2_5_VLVisionBlock.forward` (the tested window, `illava.compat`) with the merge between
        attention and MLP."""

        def forward(block, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
            slot.clear()  # what a failed call may have left
            slot["score"] = self.run is not None and any(
                self.config.vit_tokens_removed(units) for units in self.run.counts[-1].tolist())
            hidden_states = hidden_states + block.attn(
                block.norm1(hidden_states), cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, **kwargs
            )
            hidden_states = self._merge(block, hidden_states, slot, position_embeddings, cu_seqlens)
            return hidden_states + block.mlp(block.norm2(hidden_states))

        return forward

    def _merge(self, block, hidden_states, slot, position_embeddings, attention_cu_seqlens):
        """Scores from the block's own attention (`scored_attention`, one segment per call), or recomputed from
        its captured qkv (flash or eager attention)."""
        run = self.run
        received, qkv = slot.pop("received", None), slot.pop("qkv", None)
        query = key = None  # neither is there when the layer removes nothing
        if received is None and qkv is not None:
            heads = block.attn.num_heads
            query, key, _ = qkv.view(hidden_states.shape[0], 3, heads, -1).unbind(1)
            cos, sin = (part.float()[:, None, :] for part in position_embeddings)
            query, key = merge.apply_rotary(query.float(), cos, sin), merge.apply_rotary(key.float(), cos, sin)

        def describe(segment):
            rows, cols = (int(v) for v in run.grids[segment])
            return f"an image/frame of {rows}x{cols} 2x2-patch windows (units)"

        return merge_packed(
            run, hidden_states, query, key, block.attn.scaling, self.unit, self.config.vit_tokens_removed, describe,
            setting=self.describe_setting(), options=self.config.merge_options("vit"),
            attention_cu_seqlens=attention_cu_seqlens, received=None if received is None else torch.cat(received),
        )

    def reslice(self, index, args, kwargs):
        run = self.run
        if run.sliced is None:
            run.sliced = {**current_boundaries(run), "position_embeddings": resliced_rotary(run)}
        windowed = self.full_attention_blocks is not None and index not in self.full_attention_blocks
        boundaries, longest = run.sliced["windows" if windowed else "images"]
        kwargs.update(cu_seqlens=boundaries, position_embeddings=run.sliced["position_embeddings"])
        if kwargs.get("max_seqlen") is not None:
            kwargs["max_seqlen"] = longest
        return args, kwargs


def start_qwen_run(grid_thw: torch.Tensor, side: int, device: torch.device, track_sources: bool,
                   windows: tuple[torch.Tensor, torch.Tensor] | None = None, **layout) -> tuple[VisionRun, torch.Tensor]:
    """The run of one call of a Qwen vision tower on `grid_thw [n, 3]` (in patches), in units of side x side
    patches. `windows`: Qwen2.5-VL's attention windows as the tower orders them, `(window_index [units],
    cu_window_seqlens [windows + 1] in tokens)`. Returns the run and the window index (which raster unit each unit of
    the tower's order is; the identity without windows)."""
    unit = side * side
    unit_grids = torch.repeat_interleave(grid_thw[:, 1:] // side, grid_thw[:, 0], dim=0)
    lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
    run = start_packed(cu_seqlens, unit_grids.to(device), unit, track_sources, grid_thw=grid_thw, **layout)
    if windows is None:
        return run, torch.arange(int(lengths.sum()) // unit, device=device)
    window_index, cu_window_seqlens = windows
    window_lengths = (cu_window_seqlens[1:] - cu_window_seqlens[:-1]).to(device)
    run.window_of_token = torch.repeat_interleave(torch.arange(window_lengths.numel(), device=device), window_lengths)
    return run, window_index.to(device)


def full_units(run: VisionRun, features: torch.Tensor, units: int, unit: int) -> torch.Tensor:
    """`features` of the current units -> `[units, D]` in the tower's unit order, zeros where units were merged
    away."""
    full = features.new_zeros(units, features.shape[-1])
    full[run.origin[::unit] // unit] = features
    return full


def patch_vlm(state: IllavaState, model, inner, language_merger, videos_per_slice: bool = False) -> QwenVisionStage:
    """The ViT stage on a Qwen VLM's tower and what the model around it needs: features of the survivors, their
    M-RoPE positions (`videos_per_slice`: Qwen3-VL's videos, one placeholder run per temporal slice), the
    encoding traced and handed to the LLM stage (`language_merger`, or None)."""
    call = EncoderCall()
    vision = QwenVisionStage(state, inner.visual, call)
    if state.config.enable_illava_vit:
        patch_features(state, inner, vision)
        patch_positions(state, inner, vision, videos_per_slice=videos_per_slice)
    patch_encoding(state, model, inner, language_merger, call)
    return vision


def patch_features(state: IllavaState, inner, vision: QwenVisionStage) -> None:
    """`get_image_features` / `get_video_features` split the encoder output by `grid_thw`; hand them a full-size
    output and keep each item's surviving windows (in `pooler_output`, and in every level of Qwen3-VL's
    `deepstack_features`)."""

    def features(self, original, *args, **kwargs):
        output = original(*args, **kwargs)
        items = state.trace.vision[-len(output.pooler_output):]
        output.pooler_output = tuple(
            _surviving_windows(item_features, entry) for item_features, entry in zip(output.pooler_output, items)
        )
        if getattr(output, "deepstack_features", None) is not None:
            output.deepstack_features = [
                tuple(_surviving_windows(item_features, entry) for item_features, entry in zip(level, items))
                for level in output.deepstack_features
            ]
        return output

    state.override_method(inner, "get_image_features", features)
    state.override_method(inner, "get_video_features", features)


def _surviving_windows(item_features: torch.Tensor, entry: VisionTrace) -> torch.Tensor:
    slices, per_slice = entry.positions.shape
    windows = entry.grid[0] * entry.grid[1]
    index = (torch.arange(slices, device=entry.positions.device)[:, None] * windows + entry.positions).flatten()
    return item_features[index.to(item_features.device)]


def patch_positions(state: IllavaState, inner, vision: QwenVisionStage, videos_per_slice: bool = False) -> None:
    """M-RoPE positions: visual tokens at their true (t, h, w), text exactly as without merging.

    `videos_per_slice`: the prompt holds one placeholder run per temporal slice of a video, each with its own
    positions (Qwen3-VL: timestamp text between the slices)."""
    prefill = {}

    def remember_inputs(module, args, kwargs):
        prefill.clear()
        prefill.update({name: kwargs.get(name) for name in
                        ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask",
                         "position_ids", "second_per_grid_ts")})

    def get_rope_index(self, original, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                       *args, attention_mask=None, **kwargs):
        if args:  # Qwen2-VL: (..., attention_mask); Qwen2.5-VL: (..., second_per_grid_ts, attention_mask)
            names = [name for name in inspect.signature(original).parameters if name not in ("kwargs",)][4:]
            kwargs.update(zip(names, args))
            attention_mask = kwargs.pop("attention_mask", attention_mask)
        return _rope_index_with_survivors(
            state, vision, original, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask,
            videos_per_slice, **kwargs,
        )

    def fix_positions(module, args, kwargs):
        # generate() computes positions before it encodes the images, when the survivors are not known yet;
        # the prefill replaces the visual positions once they are (the rope deltas do not depend on them).
        given = kwargs.get("position_ids")
        if given is None or prefill.get("position_ids") is None or prefill.get("input_ids") is None:
            return None
        if prefill["input_ids"].shape[1] != given.shape[-1] or not state.trace.vision:
            return None
        cache = compat.cache_argument(kwargs)
        if cache is not None and cache.get_seq_length() > 0:  # a decode step or a continued prompt
            return None
        token_types = prefill["mm_token_type_ids"]
        # transformers 5.20 - 5.22 hand the whole prompt's token types to every generate() step
        if token_types is None or token_types.shape[-1] != given.shape[-1] or not bool(token_types.any()):
            return None
        grids = [prefill[name] if prefill[name] is not None else _grids_of(state.trace.by_modality(modality), vision)
                 for name, modality in (("image_grid_thw", "image"), ("video_grid_thw", "video"))]
        extra = {"second_per_grid_ts": prefill["second_per_grid_ts"]} if prefill["second_per_grid_ts"] is not None else {}
        repeat = _row_repeat(token_types, [grids[0], _slices_as_videos(grids[1]) if videos_per_slice else grids[1]])
        attention_mask = prefill["attention_mask"]
        positions, _ = inner.get_rope_index(
            prefill["input_ids"][::repeat], token_types[::repeat], *grids,
            attention_mask=None if attention_mask is None else attention_mask[::repeat], **extra,
        )
        positions = positions.repeat_interleave(repeat, dim=1)
        kwargs["position_ids"] = torch.cat((given[:1], positions), dim=0) if given.shape[0] == 4 else positions
        return args, kwargs

    state.before_forward(inner, remember_inputs, with_kwargs=True)
    state.before_forward(inner.language_model, fix_positions, with_kwargs=True)
    state.override_method(inner, "get_rope_index", get_rope_index)


def _row_repeat(token_types: torch.Tensor, grids) -> int:
    """How many times generate() repeated each prompt row (num_beams, num_return_sequences): it encodes the images
    of each prompt once and repeats the rows after, so the grids cover every `repeat`-th row only. Repeated rows
    lay out their images and videos alike; their text may differ (beams re-run without a cache diverge)."""
    repeats = set()
    for value, grid in zip(MODALITY_OF_TOKEN_TYPE, grids):
        is_item = token_types == value
        runs = int((is_item[:, :1].sum() + (is_item[:, 1:] & ~is_item[:, :-1]).sum()))
        items = 0 if grid is None else int(grid.shape[0])
        if runs:
            repeats.add(runs // items if items and runs % items == 0 else 0)
    repeat = repeats.pop() if len(repeats) == 1 else 0
    batch = token_types.shape[0]
    if repeat >= 1 and batch % repeat == 0:
        groups = token_types.view(batch // repeat, repeat, -1)
        if repeat == 1 or bool((groups == groups[:, :1]).all()):
            return repeat
    raise ValueError(
        "illava: the image/video placeholders of the batch do not match image_grid_thw / video_grid_thw (neither "
        "one grid per item of every row, nor per prompt repeated by generate()); pass a grid for every item"
    )


def _grids_of(entries: list[VisionTrace], vision: QwenVisionStage) -> torch.Tensor | None:
    """`grid_thw` of the encoded items (generate() does not pass the grids on to its prefill forward)."""
    if not entries:
        return None
    side = vision.visual.spatial_merge_size
    return torch.tensor([[entry.groups_per_item[0], entry.grid[0] * side, entry.grid[1] * side] for entry in entries])


def _slices_as_videos(grid_thw: torch.Tensor | None) -> torch.Tensor | None:
    """`[n, 3]` video grids -> one `(1, h, w)` row per temporal slice."""
    if grid_thw is None:
        return None
    slices = torch.repeat_interleave(grid_thw, grid_thw[:, 0], dim=0)
    slices[:, 0] = 1
    return slices


def _rope_index_with_survivors(state, vision, original, input_ids, token_types, image_grid_thw, video_grid_thw,
                               attention_mask, videos_per_slice=False, **extra):
    """Run transformers' own `get_rope_index` on the prompt with every merged image/video expanded back to its
    full window count, then keep the positions of the tokens that exist: text, and the surviving windows."""
    grids = {1: image_grid_thw, 2: video_grid_thw}
    survivors = {value: [entry.positions for entry in state.trace.by_modality(name)]
                 for value, name in MODALITY_OF_TOKEN_TYPE.items()}
    if videos_per_slice:
        grids[2] = _slices_as_videos(video_grid_thw)
        survivors[2] = [positions[index : index + 1] for positions in survivors[2] for index in range(len(positions))]
    next_item = {1: 0, 2: 0}
    rows, selections, expanded_any = [], [], False
    for sample in range(input_ids.shape[0]):
        ids, types_row = input_ids[sample], token_types[sample]
        mask_row = attention_mask[sample] if attention_mask is not None else torch.ones_like(ids)
        pieces, selection, cursor, start = [], [], 0, 0
        values, lengths = torch.unique_consecutive(types_row, return_counts=True)
        for value, length in zip(values.tolist(), lengths.tolist()):
            if value == 0:
                pieces.append((ids[start : start + length], types_row[start : start + length],
                               mask_row[start : start + length]))
                selection.append(torch.arange(cursor, cursor + length))
                cursor += length
            else:
                item = next_item[value]
                next_item[value] += 1
                grid = grids[value][item]
                full = int(grid.prod()) // vision.unit
                kept = _kept_windows(survivors[value], item, grid, length, vision.unit)
                expanded_any |= full != length
                pieces.append((ids[start].expand(full), types_row[start].expand(full), mask_row[start].expand(full)))
                selection.append(cursor + kept)
                cursor += full
            start += length
        rows.append([torch.cat(parts) for parts in zip(*pieces)])
        selections.append(torch.cat(selection))
    if not expanded_any:
        return original(input_ids, token_types, image_grid_thw, video_grid_thw, attention_mask=attention_mask, **extra)
    longest = max(row[0].numel() for row in rows)
    expanded = [torch.stack([torch.nn.functional.pad(row[part], (0, longest - row[part].numel())) for row in rows])
                for part in range(3)]
    positions, _ = original(expanded[0], expanded[1], image_grid_thw, video_grid_thw, attention_mask=expanded[2], **extra)
    selection = torch.stack(selections).to(positions.device)
    positions = positions.gather(2, selection[None].expand(3, -1, -1))
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    highest = positions.masked_fill(~valid[None], 0).amax(dim=(0, 2))
    deltas = (highest + 1 - valid.sum(dim=1)).unsqueeze(1)
    return positions, deltas


def _kept_windows(survivors: list[torch.Tensor], item: int, grid, length: int, unit: int) -> torch.Tensor:
    """Indices (within the item's full window sequence) of its `length` surviving windows, in order, from the
    `[slices, kept]` survivors of each encoded item. Before the item is encoded (generate() asks first), any
    choice with the right count will do: the prefill fixes it."""
    slices = int(grid[0])
    windows = int(grid[1] * grid[2]) // unit
    if item < len(survivors) and survivors[item].numel() == length:
        positions = survivors[item].cpu()
    else:
        positions = torch.arange(length // slices).expand(slices, -1)
    return (torch.arange(slices)[:, None] * windows + positions).flatten()
