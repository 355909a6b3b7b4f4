"""One module per model family; `find_family` picks the one that patches a given model."""

from __future__ import annotations

from types import ModuleType


def _families() -> list[ModuleType]:
    from . import llava_onevision, qwen2_vl

    return [llava_onevision, qwen2_vl]


def find_family(model) -> ModuleType:
    families = _families()
    for family in families:
        if isinstance(model, family.MODEL_CLASSES):
            return family
    supported = [cls.__name__ for family in families for cls in family.MODEL_CLASSES]
    raise TypeError(f"illava does not support {type(model).__name__}; supported: {supported}")
