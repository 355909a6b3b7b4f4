"""Every transformers name and signature that illava relies on and that changed inside the supported window.

The next transformers change should be one edit here. Each entry is detected from the installed library itself
(a parameter name, a dataclass field), not from its version number, so a release that backports or delays a change
still gets the right one; the version is only used to warn when it lies outside the window CI tests.

The tested window is stated here and only here (`TESTED_LOWEST`, `TESTED_NEWEST_MINOR`): CI runs the whole suite on
the lowest release and on the newest one on PyPI. pyproject declares the lower bound and no upper cap, so a newer
release is not downgraded away; it gets a warning until CI has tested it.
What moved inside it:
- 5.24 renamed the KV-cache keyword and output field `past_key_values` -> `cache` (the old keyword is renamed inside
  `forward` by a deprecation shim, so forward pre-hooks see whichever name the caller used);
- 5.24 replaced LLaVA-OneVision's `image_hidden_states` / `video_hidden_states` outputs by `image_outputs` /
  `video_outputs` (the encoders' own outputs, `pooler_output` per image / `[videos, tokens, dim]`);
- 5.24 renamed the cache parameter of the mask helpers (`create_bidirectional_mask`: not passed by illava);
- 5.20 - 5.22 `generate()` hands the whole prompt's `mm_token_type_ids` to every decode step of Qwen2-VL;
- 5.25 kernelizes models in `from_pretrained` by default (hub kernels, `use_kernels`) and again on `train()` /
  `eval()`: a layer decorated for hub kernels cannot carry a merging forward (`illava.state` refuses it by name).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import AttentionInterface
from transformers.image_processing_utils import select_best_resolution
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.vision_utils import get_vision_window_index

logger = logging.getLogger(__name__)

TESTED_LOWEST = "5.20.0"
TESTED_NEWEST_MINOR = "5.25"
TESTED_WINDOW = f"transformers {TESTED_LOWEST} - {TESTED_NEWEST_MINOR}.x"

__all__ = [
    "CACHE_KEYWORD",
    "attention_function",
    "attention_implementation",
    "TESTED_WINDOW",
    "cache_argument",
    "create_bidirectional_mask",
    "get_anyres_image_grid_shape",
    "get_vision_window_index",
    "image_features",
    "image_size_to_num_patches",
    "output_cache",
    "register_attention",
    "select_best_resolution",
    "unpad_image",
    "video_features",
    "warn_if_untested",
    "with_attention_implementation",
]

LEGACY_CACHE_KEYWORD = "past_key_values"
# The keyword decoder layers and models take the KV cache under (and pass it down with).
CACHE_KEYWORD = "cache" if "cache" in inspect.signature(Qwen2DecoderLayer.forward).parameters else LEGACY_CACHE_KEYWORD
# The output field that returns it.
_OUTPUT_CACHE_FIELD = (
    "cache" if "cache" in {field.name for field in dataclasses.fields(BaseModelOutputWithPast)} else LEGACY_CACHE_KEYWORD
)


def cache_argument(kwargs: dict[str, Any]):
    """The KV cache among a forward's keyword arguments, as a forward pre-hook sees them: under the current
    name, or under the deprecated one while transformers still renames it inside `forward`."""
    cache = kwargs.get(CACHE_KEYWORD)
    if cache is None and CACHE_KEYWORD != LEGACY_CACHE_KEYWORD:
        cache = kwargs.get(LEGACY_CACHE_KEYWORD)
    return cache


def output_cache(output):
    """The KV cache a model output returns (None when it returns none)."""
    return getattr(output, _OUTPUT_CACHE_FIELD, None)


def attention_implementation(config) -> str | None:
    """The attention implementation a module with this config dispatches to (`AttentionInterface` name)."""
    return config._attn_implementation


def with_attention_implementation(config, name: str):
    """A shallow copy of a module's `config` that dispatches its attention to `name`: given to one module instance,
    it changes that module only (the model's config, shared by every layer, is left as it is)."""
    copied = copy.copy(config)
    copied._attn_implementation_internal = name  # the setter would also walk sub-configs, which copies share
    return copied


def register_attention(name: str, function) -> None:
    """Add an implementation to transformers' `AttentionInterface` (process-wide; a new name changes no model
    until a config names it)."""
    AttentionInterface.register(name, function)


def attention_function(name: str):
    """The `AttentionInterface` implementation registered under `name` (e.g. "sdpa")."""
    return AttentionInterface()[name]


def image_features(output) -> torch.Tensor | None:
    """`[tokens, dim]`: the image features a VLM forward placed at its image placeholders, all images in order."""
    return _placed_features(output, "image")


def video_features(output) -> torch.Tensor | None:
    """`[tokens, dim]`: the video features a VLM forward placed at its video placeholders, all videos in order."""
    return _placed_features(output, "video")


def _placed_features(output, modality: str) -> torch.Tensor | None:
    if not hasattr(output, f"{modality}_outputs"):  # before 5.24: the flattened features themselves
        if not hasattr(output, f"{modality}_hidden_states"):  # e.g. Qwen3-VL before 5.24
            raise ValueError(
                f"illava: {type(output).__name__} does not carry the {modality} features it placed (transformers "
                f"{installed_version()}); take them from the model's get_{modality}_features"
            )
        return getattr(output, f"{modality}_hidden_states")
    encoded = getattr(output, f"{modality}_outputs")
    if encoded is None:
        return None
    pooled = encoded.pooler_output  # per item, or [items, tokens, dim]
    return pooled.flatten(0, -2) if isinstance(pooled, torch.Tensor) else torch.cat(list(pooled), dim=0)


def is_tested(version: str) -> bool:
    release = Version(Version(version).base_version)
    newest = Version(TESTED_NEWEST_MINOR)
    return Version(TESTED_LOWEST) <= release and (release.major, release.minor) <= (newest.major, newest.minor)


def installed_version() -> str:
    return transformers.__version__


_warned = False


def warn_if_untested() -> None:
    """Log once per process when the installed transformers lies outside the tested window (not an error:
    a newer release often works, and a user may know better)."""
    global _warned
    if _warned or is_tested(installed_version()):
        return
    _warned = True
    logger.warning(
        "illava: transformers %s is outside the tested window (%s); if merging misbehaves, install a release "
        "inside it and report the version",
        installed_version(),
        TESTED_WINDOW,
    )
