"""`IllavaConfig`: the iLLaVA parameters in the vocabulary of the reference implementation (hulianyuyy/iLLaVA), parsed from whatever callers pass.

lmms-eval hands model arguments over as already-parsed Python values, command lines hand them over as strings,
and Python users pass lists and bools; all of them land here and come out normalised:

- `illava_vit_k` / `illava_llm_k`: "5-6-7-8", "5,6", 8, [5, 6] -> (5, 6) (sorted, unique, >= 0)
- `illava_vit_r`: int >= 0 tokens merged away per layer and crop/frame; float in (0, 1) the fraction of the
  current count merged away per layer (floor).
- `illava_llm_r`: float in (0, 1) the *keep* ratio of the current visual tokens per layer (floor, at least one
  token kept); int >= 0 tokens merged away per layer and span.
- booleans: True/False, "True"/"false"/"1"/"0"/"yes"/"no".
- `illava_vit_mode` / `illava_llm_mode`: "merge" (the paper's rank-weighted merge, default), "drop", "shift",
  "pivot", or the reference's 1 / 2 / 3 for the last three; `illava_pc_ratio` in (0, 1] for "pivot".

`validate_for(...)` checks the values against the model they are applied to (depth, tokens left).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", "none", ""}


def _plain(value: Any) -> Any:
    """numpy / torch scalars and arrays (what sweeps produce: `np.int64(2)`, `np.arange(5, 9)`) as the Python
    values they hold."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, str) else value


def _parse_bool(name: str, value: Any) -> bool:
    value = _plain(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name}={value!r} is not a boolean (use True/False)")


def _parse_layers(name: str, value: Any) -> tuple[int, ...]:
    value = _plain(value)
    if value is None:
        return ()
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a layer index or list of layer indices")
    if isinstance(value, int):
        items: list[Any] = [value]
    elif isinstance(value, str):
        text = value.strip().strip("[]()").strip()
        items = re.split(r"\s*[-,]\s*|\s+", text) if text else []
        if "" in items:  # "-1" would otherwise read as layer 1, "2--3" as 2-3
            raise ValueError(
                f"{name}={value!r}: a leading, trailing or doubled separator; give 0-based, non-negative layer "
                "indices separated by '-' or ',' (e.g. 5-6-7-8)"
            )
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"{name}={value!r} is not a layer index or list of layer indices")
    layers = []
    for item in items:
        try:
            if isinstance(item, bool) or (isinstance(item, float) and not item.is_integer()):
                raise ValueError
            layer = int(item)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r}: {item!r} is not an integer layer index") from None
        if layer < 0:
            raise ValueError(f"{name}={value!r}: layer index {layer} is negative; layers are 0-based")
        layers.append(layer)
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name}={value!r} repeats a layer")
    return tuple(sorted(layers))


def _parse_r(name: str, value: Any) -> int | float:
    value = _plain(value)
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name}={value!r} is not a number")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a number") from None
    if isinstance(value, float):
        if not math.isfinite(value) or not 0.0 < value < 1.0:
            raise ValueError(
                f"{name}={value!r}: a float must lie strictly between 0 and 1 (a ratio); "
                "use an int for a token count (0 merges nothing)"
            )
        return value
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name}={value!r} is negative")
        return value
    raise ValueError(f"{name}={value!r} is not a number")


# The reference's integers for its merge modes; "merge" (the paper's rank-weighted merge) is this project's default.
MODE_NUMBERS = {1: "drop", 2: "shift", 3: "pivot"}
MODE_NAMES = ("merge", "drop", "shift", "pivot")


def _parse_mode(name: str, value: Any) -> str:
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a merge mode; use one of {MODE_NAMES} or 1/2/3")
    text = str(value).strip().lower()
    if text.isdigit() and int(text) in MODE_NUMBERS:
        return MODE_NUMBERS[int(text)]
    if text in MODE_NAMES:
        return text
    raise ValueError(f"{name}={value!r} is not a merge mode; use one of {MODE_NAMES} or the reference's 1/2/3")


@dataclasses.dataclass(frozen=True)
class IllavaConfig:
    """The iLLaVA settings. Defaults are the paper's single-image setting, with both stages off."""

    enable_illava_vit: bool = False
    illava_vit_k: tuple[int, ...] = (5, 6, 7, 8)
    illava_vit_r: int | float = 92
    enable_illava_llm: bool = False
    illava_llm_k: tuple[int, ...] = (8,)
    illava_llm_r: int | float = 0.70
    illava_track_vit_source: bool = False
    illava_track_llm_source: bool = False
    # how each stage merges (see `illava.merge`): "merge" | "drop" (1) | "shift" (2) | "pivot" (3)
    illava_vit_mode: str = "merge"
    illava_llm_mode: str = "merge"
    illava_pc_ratio: float = 0.05  # "pivot": the fraction of the kept tokens that become context centres
    # Accepted for compatibility with the reference code; spans are found from the placeholder tokens instead.
    illava_llm_image_token_start_index: int = 14

    def __post_init__(self):
        set_ = object.__setattr__
        for name in ("enable_illava_vit", "enable_illava_llm", "illava_track_vit_source", "illava_track_llm_source"):
            set_(self, name, _parse_bool(name, getattr(self, name)))
        set_(self, "illava_vit_k", _parse_layers("illava_vit_k", self.illava_vit_k))
        set_(self, "illava_llm_k", _parse_layers("illava_llm_k", self.illava_llm_k))
        set_(self, "illava_vit_r", _parse_r("illava_vit_r", self.illava_vit_r))
        set_(self, "illava_llm_r", _parse_r("illava_llm_r", self.illava_llm_r))
        set_(self, "illava_vit_mode", _parse_mode("illava_vit_mode", self.illava_vit_mode))
        set_(self, "illava_llm_mode", _parse_mode("illava_llm_mode", self.illava_llm_mode))
        ratio = self.illava_pc_ratio
        try:
            ratio = float(ratio) if not isinstance(ratio, bool) else math.nan
        except (TypeError, ValueError):
            ratio = math.nan
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"illava_pc_ratio={self.illava_pc_ratio!r} must lie in (0, 1]")
        set_(self, "illava_pc_ratio", ratio)
        start = self.illava_llm_image_token_start_index
        try:
            set_(self, "illava_llm_image_token_start_index", int(start))
        except (TypeError, ValueError):
            raise ValueError(f"illava_llm_image_token_start_index={start!r} is not an integer") from None
        if self.enable_illava_vit and not self.illava_vit_k:
            raise ValueError("enable_illava_vit=True but illava_vit_k names no layer")
        if self.enable_illava_llm and not self.illava_llm_k:
            raise ValueError("enable_illava_llm=True but illava_llm_k names no layer")
        if self.enable_illava_llm and 0 in self.illava_llm_k:
            raise ValueError(
                f"illava_llm_k={'-'.join(map(str, self.illava_llm_k))}: layer 0 cannot merge, "
                "layer k scores tokens with layer k-1's attention"
            )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> IllavaConfig:
        """Build from a mapping holding only iLLaVA keys; an unknown key is an error (typos must not pass)."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown iLLaVA option(s) {unknown}; known: {list(cls.field_names())}")
        return cls(**values)

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> IllavaConfig:
        """Take the iLLaVA keys out of a keyword dict (e.g. lmms-eval's model_args) and build a config.

        Keys that look like iLLaVA options but are not known (a misspelt `illava_vit_rr`) raise.
        """
        names = cls.field_names()
        mine = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
        suspicious = sorted(name for name in kwargs if "illava" in name.lower())
        if suspicious:
            raise ValueError(f"unknown iLLaVA option(s) {suspicious}; known: {list(names)}")
        return cls(**mine)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line with the effective settings, for harness logs."""
        layers = "-".join
        vit = (f"ViT stage on (layers {layers(map(str, self.illava_vit_k))}, r={self.illava_vit_r}, "
               f"{self.illava_vit_mode})" if self.enable_illava_vit else "ViT stage off")
        llm = (f"LLM stage on (layers {layers(map(str, self.illava_llm_k))}, r={self.illava_llm_r}, "
               f"{self.illava_llm_mode})" if self.enable_illava_llm else "LLM stage off")
        return f"{vit}; {llm}"

    # -- token arithmetic shared by the patches and the processor side -------------------------------------

    def merge_options(self, stage: str) -> dict[str, Any]:
        """`mode` and `pc_ratio` keywords of `illava.merge` for the "vit" or "llm" stage."""
        return {"mode": getattr(self, f"illava_{stage}_mode"), "pc_ratio": self.illava_pc_ratio}

    def vit_tokens_removed(self, current: int) -> int:
        """Tokens one ViT merge layer removes from a crop/frame that currently holds `current` tokens."""
        if isinstance(self.illava_vit_r, float):
            return math.floor(self.illava_vit_r * current)
        return self.illava_vit_r

    def vit_token_counts(self, initial: int) -> list[int]:
        """Tokens per crop/frame before the first merge layer and after each one."""
        counts = [initial]
        for _ in self.illava_vit_k:
            counts.append(counts[-1] - self.vit_tokens_removed(counts[-1]))
        return counts

    def llm_tokens_removed(self, current: int) -> int:
        """Visual tokens one LLM merge layer removes from a span of `current` tokens (at least one is kept)."""
        if isinstance(self.illava_llm_r, float):
            return current - max(1, math.floor(self.illava_llm_r * current))
        return min(self.illava_llm_r, max(current - 1, 0))

    def validate_vit(self, num_layers: int, tokens_per_group: int | None = None, what: str = "crop/frame") -> None:
        """Check the ViT settings against an encoder of `num_layers` layers and, when every crop/frame has the
        same size, `tokens_per_group` tokens."""
        if not self.enable_illava_vit:
            return
        _check_depth("illava_vit_k", self.illava_vit_k, num_layers, "the vision encoder's", first=0)
        if tokens_per_group is None:
            return
        counts = self.vit_token_counts(tokens_per_group)
        if counts[-1] < 1:
            raise ValueError(
                f"illava_vit_r={self.illava_vit_r} on {len(self.illava_vit_k)} layers leaves {counts[-1]} of "
                f"{tokens_per_group} tokens per {what}; at least 1 must remain"
            )

    def validate_llm(self, num_layers: int) -> None:
        if not self.enable_illava_llm:
            return
        _check_depth("illava_llm_k", self.illava_llm_k, num_layers, "the language model's", first=1)


def _check_depth(name: str, layers: tuple[int, ...], num_layers: int, owner: str, first: int) -> None:
    too_deep = [k for k in layers if k >= num_layers]
    if too_deep:
        raise ValueError(
            f"{name}={'-'.join(map(str, layers))}: layer(s) {too_deep} beyond {owner} {num_layers} layers "
            f"(valid: {first}..{num_layers - 1})"
        )
