"""What the last forward did: token counts per merge layer and which original patches each survivor stands for."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class VisionTrace:
    """One call of the vision encoder (all crops of the images in a batch, or all frames of the videos).

    Groups are the encoder's batch rows (crops or frames), in the order the encoder saw them;
    `groups_per_item[i]` of them belong to image/video i.
    """

    modality: str  # "image", "video", or "vision" when the encoder was called directly
    grid: tuple[int, int]  # (rows, cols) of one group's original grid of merge units (patches or windows)
    merge_layers: tuple[int, ...]
    tokens_per_group: list[int]  # before the first merge layer, then after each one
    positions: torch.Tensor  # [G, K] original raster index (row * cols + col) of each survivor
    # [G, rows*cols]: index of the survivor each original patch went into (-1: dropped, no survivor stands for it)
    sources: torch.Tensor | None = None
    # the same after each merge layer (the last equals `sources`); indices are only meaningful as a partition
    source_history: list[torch.Tensor] = dataclasses.field(default_factory=list)
    groups_per_item: list[int] | None = None
    # [G, K]: index, within its image/video's LLM placeholders, of the feature each survivor ends up in
    # (-1: cut away by unpadding); downsampled layouts map a survivor to the feature whose cell holds it
    features: torch.Tensor | None = None
    window: int = 1  # side, in patches, of a merge unit (2: Qwen2-VL's 2x2 windows, one LLM token each)

    @property
    def num_groups(self) -> int:
        return int(self.positions.shape[0])

    def survivor_coordinates(self) -> torch.Tensor:
        """`[G, K, 2]` original (row, col) of each survivor."""
        cols = self.grid[1]
        return torch.stack((self.positions // cols, self.positions % cols), dim=-1)

    def source_map(self, layer: int | None = None) -> torch.Tensor:
        """`[G, rows, cols]`: for each original patch, the survivor (index within its group) it was merged into;
        with `layer` (an index into `merge_layers`), the merge group it belonged to after that layer."""
        if layer is not None and self.source_history:
            return self.source_history[layer].view(-1, *self.grid)
        if self.sources is not None:
            return self.sources.view(-1, *self.grid)
        if not self.merge_layers:  # nothing merged: every patch is its own survivor
            return self.positions.view(-1, *self.grid)
        raise RuntimeError("sources were not recorded; apply illava with illava_track_vit_source=True")


@dataclasses.dataclass
class LanguageTrace:
    """One LLM merge layer of the last prefill.

    Positions are indices into the prompt the language model received (placeholders expanded); the batch may
    be padded on the left after merging, where `positions` holds -1.
    """

    layer: int
    positions: torch.Tensor  # [B, L']: original position of each token that layers >= `layer` see
    visual_tokens_per_span: list[int]  # tokens left in each image/video span, spans in prompt order
    # [B, L]: position of the survivor standing for each position (-1: dropped)
    sources: torch.Tensor | None = None

    def kept_positions(self, sample: int) -> torch.Tensor:
        row = self.positions[sample]
        return row[row >= 0]


@dataclasses.dataclass
class IllavaTrace:
    """Everything recorded during the last forward that ran the vision encoder."""

    vision: list[VisionTrace] = dataclasses.field(default_factory=list)
    language: list[LanguageTrace] = dataclasses.field(default_factory=list)
    # LLM placeholder tokens per image / per video, in prompt order (all samples of the batch)
    tokens_per_item: dict[str, list[int]] = dataclasses.field(default_factory=lambda: {"image": [], "video": []})
    # [items, 2]: (sample, position of the first placeholder) of each image / video in the prompt
    item_starts: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def clear(self) -> None:
        """Start over for a new forward; lists handed out earlier keep what they held."""
        self.vision = []
        self.language = []
        self.tokens_per_item = {"image": [], "video": []}
        self.item_starts = {}

    def llm_source_map(self, entry: int = 0, layer: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """Map every original patch of vision entry `entry` through both stages to the LLM token standing for it.

        Returns `(samples [G], positions [G, rows, cols])`: the batch row of each group (crop/frame) and, per
        original patch, the prompt position of the token that represents it after LLM merge layer `layer` (an
        index into `language`; after the ViT stage when the LLM stage did not merge), -1 where the layout cut the
        patch away (unpadding).
        """
        vision = self.vision[entry]
        if vision.features is None:
            raise RuntimeError("this vision call has no recorded LLM layout")
        starts = self.item_starts[vision.modality]
        item_of_group = torch.repeat_interleave(
            torch.arange(len(vision.groups_per_item)), torch.tensor(vision.groups_per_item)
        )
        offset = sum(
            len(other.groups_per_item) for other in self.vision[:entry] if other.modality == vision.modality
        )
        samples, first = starts[item_of_group + offset].unbind(-1)
        slot_of_patch = vision.source_map().flatten(1)  # -1: dropped ("drop" / "pivot" modes)
        feature = torch.where(slot_of_patch >= 0, vision.features.gather(1, slot_of_patch.clamp(min=0)), -1)
        positions = torch.where(feature >= 0, first[:, None] + feature, -1)
        if self.language and self.language[layer].sources is not None:
            sources = self.language[layer].sources.cpu()[samples]
            positions = torch.where(positions >= 0, sources.gather(1, positions.clamp(min=0)), -1)
        elif self.language:
            raise RuntimeError("LLM sources were not recorded; apply illava with illava_track_llm_source=True")
        return samples, positions.view(-1, *vision.grid)

    def by_modality(self, modality: str) -> list[VisionTrace]:
        return [entry for entry in self.vision if entry.modality == modality]
