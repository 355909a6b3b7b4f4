"""The ViT stage's lifecycle, shared by every vision family, and its one run state.

One encoder call:

1. `start` (a pre-hook on the encoder): the family reads the call's inputs and opens a `VisionRun`;
2. each merge layer runs the family's layer forward (installed beneath accelerate's hooks, eagerly under
   torch.compile), which takes the layer's q and k from the capture the family set up on the layer and calls
   `merge_groups` between the attention residual and the MLP;
3. each layer after the first merge layer gets its arguments re-sliced for the survivors (`reslice`);
4. `finish` (a post-hook on the encoder) lays out the output and writes the trace.

A family file says only how it gets q and k, which arguments to re-slice, and how it lays out its output. Tokens
merge in independent groups (a crop, a frame, an image, a packed segment), in merge units (a patch; a 2x2 window for
encoders whose patch merger fuses windows); the run state is the same for a dense batch, a padded batch and a packed
sequence, and nothing in it depends on transformers, so another engine's vision transformer can use it too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from .. import merge
from ..state import IllavaState


@dataclasses.dataclass
class VisionRun:
    """One encoder call: its groups and what the merges have done to them so far."""

    counts: list[torch.Tensor]  # [G] units per group, before the first merge layer and after each one
    grids: torch.Tensor  # [G, 2] (rows, cols) of each group's original grid of units
    positions: torch.Tensor  # [G, Umax] original unit index of each current unit (-1: padding)
    # [G, U0max] index (within its group) of the current unit each original unit went into, when tracked
    sources: torch.Tensor | None
    source_history: list[torch.Tensor] = dataclasses.field(default_factory=list)  # `sources` after each merge layer
    # packed encoders: [S+1] current group boundaries, [N] original index of each current token, the per-token
    # rotary tables before any merge, and the attention window of each current token (windowed encoders)
    cu_seqlens: torch.Tensor | None = None
    origin: torch.Tensor | None = None
    rotary: tuple[torch.Tensor, ...] | None = None
    window_of_token: torch.Tensor | None = None
    # per-unit features taken from intermediate layers (one row per current unit, e.g. Qwen3-VL's DeepStack):
    # every later merge applies to them too, so each row keeps standing for the same patches as its unit
    followers: list[torch.Tensor] = dataclasses.field(default_factory=list)
    # padded encoders: [G, Lmax] which slots hold a token, and the attention mask later layers get
    valid: torch.Tensor | None = None
    attention_mask: Any = None
    sliced: dict | None = None  # later layers' arguments, re-sliced for the current survivors (cached per merge)
    modality: str = "vision"  # what the call encodes: "image", "video", or "vision" (the encoder called directly)
    grid_thw: torch.Tensor | None = None  # the call's `grid_thw`, for encoders that take one

    @classmethod
    def start(cls, grids: torch.Tensor, track_sources: bool, units: torch.Tensor | None = None, **layout) -> VisionRun:
        """`grids [G, 2]`: each group's grid of units; `units [G]`: its unit count (default rows x cols)."""
        units = grids.prod(dim=1) if units is None else units
        slots = torch.arange(int(units.max()) if units.numel() else 0, device=units.device)
        positions = torch.where(slots[None, :] < units[:, None], slots[None, :], -1)
        return cls(counts=[units], grids=grids, positions=positions, sources=positions.clamp(min=0) if track_sources else None,
                   **layout)

    @property
    def merged(self) -> bool:
        """Whether a merge layer has removed units yet in this call."""
        return len(self.counts) > 1 and not torch.equal(self.counts[-1], self.counts[0])

    def removals(self, units_removed: Callable[[int], int], describe_group: Callable[[int], str],
                 setting: str) -> torch.Tensor:
        """`[G]` units each group loses at the next merge layer (`removals`)."""
        return removals(self.counts[-1], units_removed, describe_group, setting)

    def record(self, plan: merge.MergePlan | None) -> None:
        """Book one merge layer (`None`: it removed nothing)."""
        if plan is not None:
            self.positions = compact_rows(self.positions, plan.keep)
            if self.sources is not None:
                self.sources = merge.update_sources(self.sources, plan)
            self.counts.append(plan.keep.sum(dim=1))
            self.sliced = None
        else:
            self.counts.append(self.counts[-1])
        if self.sources is not None:
            self.source_history.append(self.sources)


def removals(counts: torch.Tensor, units_removed: Callable[[int], int], describe_group: Callable[[int], str],
             setting: str) -> torch.Tensor:
    """`[G]` units each group of `counts [G]` loses at this layer; an error naming the setting if one would lose
    them all."""
    units = counts.tolist()
    removed = [units_removed(count) for count in units]
    for group, (count, lost) in enumerate(zip(units, removed)):
        if count - lost < 1:
            raise ValueError(
                f"{setting} leaves no token in {describe_group(group)}: {count} units left, "
                f"{lost} to merge away at this layer; use a smaller r or a fraction"
            )
    return torch.tensor(removed, device=counts.device, dtype=torch.long)


def merge_groups(run: VisionRun, units: torch.Tensor, scores: Callable[[], torch.Tensor], removed: torch.Tensor,
                 options: dict, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, merge.MergePlan | None]:
    """One merge layer over `units [G, U, D]`: `removed [G]` units leave each group, lowest `scores() [G, U]`
    first (computed only when something is removed), the way `options` (`IllavaConfig.merge_options`) say.
    Returns the merged units (still `[G, U, D]`: the caller keeps `plan.keep` in its own layout) and the plan
    (`None` when nothing is removed); `run` books it."""
    if int(removed.max()) == 0:
        run.record(None)
        return units, None
    plan = merge.plan_merge(scores(), removed, valid=valid, x=units, **options)
    run.record(plan)
    return merge.apply_merge(units, plan), plan


def compact_rows(values: torch.Tensor, keep: torch.Tensor, fill: int = -1) -> torch.Tensor:
    """Keep `values[g, j]` where `keep[g, j]`, moved to the front of each row, `fill` after."""
    counts = keep.sum(dim=1)
    out = values.new_full((values.shape[0], int(counts.max()) if counts.numel() else 0, *values.shape[2:]), fill)
    rows, columns = keep.nonzero(as_tuple=True)
    out[rows, (keep.long().cumsum(dim=1) - 1)[rows, columns]] = values[rows, columns]
    return out


class VisionStage:
    """The lifecycle on one encoder instance; a family subclasses it and provides

    - `start(args, kwargs) -> VisionRun | None`: open the run from the encoder's inputs (`None`: do not merge);
    - `capture(layer) -> dict`: set up what hands the merge layer's q and k (or its qkv) to `layer_forward`;
    - `layer_forward(slot) -> forward(layer, *args, **kwargs)`: the merge layer's forward, calling a merge between
      its attention residual and its MLP;
    - `reslice(index, args, kwargs) -> (args, kwargs)`: a later layer's arguments for the current survivors;
    - `finish(run, output) -> output`: lay the output out and write the trace.

    The run lives on the stage for one call (a patched model runs one call at a time: `IllavaState.lock`).
    """

    def __init__(self, state: IllavaState, encoder, layers, merge_layers: tuple[int, ...]):
        self.state = state
        self.config = state.config
        self.encoder = encoder
        self.merge_layers = tuple(merge_layers)
        self.run: VisionRun | None = None
        state.before_forward(encoder, self._start_call, with_kwargs=True)
        state.after_forward(encoder, self._finish_call, with_kwargs=True, always_call=True)
        self.install_layers(layers)

    def install_layers(self, layers) -> None:
        """Each merge layer's forward replaced (beneath accelerate's hooks), every later layer's arguments
        re-sliced. An encoder that runs its layers some other way than calling them overrides this."""
        for index in self.merge_layers:
            self.state.install_forward(layers[index], self.layer_forward(self.capture(layers[index])))
        for index in range(self.merge_layers[0] + 1 if self.merge_layers else len(layers), len(layers)):
            self.state.before_forward(layers[index], self._reslice_hook(index), with_kwargs=True)

    # -- what a family provides ---------------------------------------------------------------------------------

    def start(self, args: tuple, kwargs: dict) -> VisionRun | None:
        raise NotImplementedError

    def capture(self, layer) -> dict:
        raise NotImplementedError

    def layer_forward(self, slot: dict) -> Callable:
        raise NotImplementedError

    def reslice(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    def finish(self, run: VisionRun, output):
        return output

    # -- shared ---------------------------------------------------------------------------------------------------

    def capture_outputs(self, **modules) -> dict:
        """A slot that receives the output of each named module's next forward (e.g. `q=attn.q_proj`)."""
        slot: dict = {}
        for name, module in modules.items():
            self.state.after_forward(module, lambda unused, args, output, name=name: slot.__setitem__(name, output))
        return slot

    def remember_rotary(self, module, args, kwargs):
        """A pre-hook for the first merge layer of an encoder with per-token rotary tables: keep them unmerged."""
        if self.run is not None:
            self.run.rotary = kwargs["position_embeddings"]

    def describe_setting(self) -> str:
        return f"illava_vit_r={self.config.illava_vit_r}"

    def _start_call(self, module, args, kwargs):
        self.run = self.start(args, kwargs)

    def _finish_call(self, module, args, kwargs, output):
        run, self.run = self.run, None
        if run is None or output is None:
            return output
        return self.finish(run, output)

    def _reslice_hook(self, index: int):
        def hook(module, args, kwargs):
            if self.run is None or not self.run.merged:
                return None
            return self.reslice(index, args, kwargs)

        return hook
