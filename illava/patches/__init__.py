"""One module per model family; `find_family` picks the one that patches a given model."""

from __future__ import annotations

from types import ModuleType


def _families() -> list[ModuleType]:
    from . import llava_onevision, llava_vit, packing_encoders, qwen2_vl, qwen3_vl, siglip2

    return [llava_onevision, qwen2_vl, qwen3_vl, llava_vit, siglip2, packing_encoders]


def _class_names(family: ModuleType) -> tuple[str, ...]:
    return tuple(cls.__name__ for cls in family.MODEL_CLASSES) + getattr(family, "MODEL_CLASS_NAMES", ())


def find_family(model) -> ModuleType:
    """The family whose classes `model` is an instance of; families may also match by class name, for
    re-implementations and upstream copies of one model that share its module structure."""
    families = _families()
    for family in families:
        if isinstance(model, family.MODEL_CLASSES) or type(model).__name__ in getattr(family, "MODEL_CLASS_NAMES", ()):
            return family
    supported = [name for family in families for name in _class_names(family)]
    raise TypeError(f"illava does not support {type(model).__name__}; supported: {supported}")
