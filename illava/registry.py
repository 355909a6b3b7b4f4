"""The model families illava can patch: one `Family` each, found by `find_family(model)`. `apply`, processor claiming,
the CLI and the benchmark read the registry; outside code adds a family with `register_family`."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any


def _itself(model):
    return model


def inner_of_generation_model(model):
    """`model.model` of a `...ForConditionalGeneration` (it has the `lm_head`), else the model itself."""
    return model.model if hasattr(model, "lm_head") else model


@dataclasses.dataclass(frozen=True)
class Family:
    """What illava knows about one model family.

    `apply(state, model, processor)` installs the patches on one instance (recording every change in `state`, an
    `illava.state.IllavaState`, so `remove` undoes it); it validates the config against the model first.
    """

    name: str
    model_classes: tuple[type, ...]
    apply: Callable[[Any, Any, Any], None]
    vision_tower: Callable[[Any], Any]  # the module one vision-encoder call runs (timed by the CLI and the benchmark)
    inner_model: Callable[[Any], Any] = _itself  # the model holding the towers (`model.model` of a `...ForX` class)
    model_class_names: tuple[str, ...] = ()  # matched by name: re-implementations and upstream copies of a class
    processor_class_names: tuple[str, ...] | None = None  # the processors it patches; None: it leaves them alone
    model_types: tuple[str, ...] = ()  # `config.model_type`s the CLI loads with AutoModelForImageTextToText
    timestamped_videos: bool = False  # its processor puts timestamps between video frames (needs their timing)

    def matches(self, model) -> bool:
        return isinstance(model, self.model_classes) or type(model).__name__ in self.model_class_names

    def class_names(self) -> tuple[str, ...]:
        return tuple(cls.__name__ for cls in self.model_classes) + self.model_class_names


_registered: list[Family] = []
_builtins_loaded = False
_lock = threading.Lock()


def register_family(family: Family) -> Family:
    """Add a family (or replace the one of the same name); later registrations are matched first."""
    families()  # the built-in families first, so that a replacement of one of them stays
    with _lock:
        _registered[:] = [known for known in _registered if known.name != family.name]
        _registered.insert(0, family)
    return family


def families() -> tuple[Family, ...]:
    global _builtins_loaded
    with _lock:
        if not _builtins_loaded:
            from .patches import builtin_families  # imports transformers' model classes: only when first needed

            _registered.extend(builtin_families())
            _builtins_loaded = True
        return tuple(_registered)


def find_family(model) -> Family:
    """The family `model` belongs to; a TypeError naming the supported classes otherwise."""
    known = families()
    for family in known:
        if family.matches(model):
            return family
    supported = [name for family in known for name in family.class_names()]
    raise TypeError(f"illava does not support {type(model).__name__}; supported: {supported}")


def family_of_model_type(model_type: str) -> Family | None:
    return next((family for family in families() if model_type in family.model_types), None)
