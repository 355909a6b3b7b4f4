"""`apply` / `remove`: patch one loaded model instance in place, and restore it exactly."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Mapping
from typing import Any

from . import compat
from .config import IllavaConfig
from .registry import find_family
from .state import STATE_ATTRIBUTE, IllavaState
from .trace import IllavaTrace

logger = logging.getLogger(__name__)


def _as_config(config: IllavaConfig | Mapping[str, Any] | None, options: dict[str, Any]) -> IllavaConfig:
    if config is None:
        return IllavaConfig.from_dict(options)
    if options:
        raise TypeError("pass either a config or keyword options, not both")
    if isinstance(config, IllavaConfig):
        return config
    if isinstance(config, Mapping):
        return IllavaConfig.from_dict(config)
    raise TypeError(f"config must be an IllavaConfig or a mapping, not {type(config).__name__}")


def apply(model, config: IllavaConfig | Mapping[str, Any] | None = None, processor=None, **options):
    """Patch `model` (this instance only) to merge visual tokens as `config` says; returns the model.

    `processor`: the model's processor; pass it so that prompts get as many image/video placeholders as the
    merged model produces (it is patched on the instance too, and restored by `remove`).
    Options may also be given as keywords: `apply(model, enable_illava_vit=True, illava_vit_k="5-6-7-8")`.
    """
    config = _as_config(config, options)
    compat.warn_if_untested()
    if getattr(model, STATE_ATTRIBUTE, None) is not None:
        raise RuntimeError("illava is already applied to this model; call illava.remove(model) first")
    family = find_family(model)
    state = IllavaState(config)
    try:
        if processor is not None:
            _claim_processor(state, family, model, processor)
        family.apply(state, model, processor)
        state.one_call_at_a_time(model)
    except BaseException:
        state.undo()
        raise
    state.processor = processor
    # copy.deepcopy looks `__deepcopy__` up on the instance: a copy must get patches of its own
    state.set_attribute(model, "__deepcopy__", functools.partial(_deepcopy_patched, model))
    # copy.copy and pickle look `__reduce_ex__` up on the instance too: refuse them by name
    state.set_attribute(model, "__reduce_ex__", _refuse_pickling)
    setattr(model, STATE_ATTRIBUTE, state)
    logger.debug("illava applied to %s: %s", type(model).__name__, config)
    return model


PROCESSOR_OWNER_ATTRIBUTE = "_illava_patched_for"


def _claim_processor(state: IllavaState, family, model, processor) -> None:
    """One processor serves one patched model (its placeholder counts follow that model's settings), is saved
    as it was before `apply`, and must be the kind of processor the model uses."""
    expected = family.processor_class_names
    if expected is None:  # the family leaves processors alone
        return
    if type(processor).__name__ not in expected:
        raise ValueError(
            f"illava: this processor ({type(processor).__name__}) does not belong to this model "
            f"({type(model).__name__}, which uses {' or '.join(expected)}); pass the processor loaded from the "
            "model's own checkpoint"
        )
    owner = processor.__dict__.get(PROCESSOR_OWNER_ATTRIBUTE)
    if owner is not None:
        raise RuntimeError(
            f"illava: this processor is already patched by illava.apply for another model ({owner}); give each "
            "patched model its own processor (copy.deepcopy(processor)) or illava.remove the other model first"
        )
    state.set_attribute(processor, PROCESSOR_OWNER_ATTRIBUTE, f"{type(model).__name__} at {id(model):#x}")

    def as_before_apply(self, original, *args, **kwargs):
        with state.unpatched(self):
            return original(*args, **kwargs)

    for name in ("save_pretrained", "to_dict"):  # what saving and printing the processor read
        if hasattr(processor, name):
            state.override_method(processor, name, as_before_apply)


def _deepcopy_patched(model, memo):
    """An independent patched copy: copy the unpatched model, then patch the copy and the original again (the
    original keeps its trace and processor; the copy gets the same settings and no processor)."""
    state = getattr(model, STATE_ATTRIBUTE)
    remove(model)
    try:
        duplicate = copy.deepcopy(model, memo)
    finally:
        apply(model, state.config, processor=state.processor)
        getattr(model, STATE_ATTRIBUTE).trace = state.trace
    return apply(duplicate, state.config)


def _refuse_pickling(protocol):
    raise TypeError(
        "illava: a patched model cannot be shallow-copied or pickled (its patches are bound to this instance); "
        "use copy.deepcopy(model) for an independent patched copy, save_pretrained for the weights, or "
        "illava.remove(model) first"
    )


def remove(model):
    """Undo `apply` on `model` (and on the processor passed to it); returns the model."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is None:
        raise RuntimeError("illava is not applied to this model")
    state.undo()
    delattr(model, STATE_ATTRIBUTE)
    return model


@contextlib.contextmanager
def applied(model, config: IllavaConfig | Mapping[str, Any] | None = None, processor=None, **options):
    """`with illava.applied(model, config, processor=p): ...` applies on entry and removes on exit."""
    apply(model, config, processor=processor, **options)
    try:
        yield model
    finally:
        remove(model)


@contextlib.contextmanager
def prompt_ends(model, lengths):
    """Inside the block, the LLM stage treats the first `lengths[b]` tokens of row b (an int: of every row) as the
    prompt: merging is scored by the prompt's last token and ignores the tokens after it, as the prefill of the
    prompt alone would. For scoring continuations (a loglikelihood): every candidate then sees the same merge.
    Without the LLM stage this changes nothing. Each length must be positive; whether it fits the input (one per
    row, within the row, after its images and videos) is checked when the forward runs."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is None:
        raise RuntimeError("illava is not applied to this model")
    lengths = _prompt_lengths(lengths)
    merger = state.language_merger
    if merger is None:
        yield model
        return
    outer, merger.prompt_end = merger.prompt_end, lengths
    try:
        yield model
    finally:
        merger.prompt_end = outer


def _prompt_lengths(lengths) -> int | list[int]:
    plain = lengths.tolist() if hasattr(lengths, "tolist") else lengths
    values = plain if isinstance(plain, (list, tuple)) else [plain]
    if not values or not all(isinstance(value, int) and not isinstance(value, bool) and value >= 1
                             for value in values):
        raise ValueError(f"illava.prompt_ends: {lengths!r} is not a positive token count or a list of them, one per row")
    return list(values) if isinstance(plain, (list, tuple)) else plain


def is_applied(model) -> bool:
    return getattr(model, STATE_ATTRIBUTE, None) is not None


def last_trace(model) -> IllavaTrace:
    """What the last forward that ran the vision encoder recorded (token counts, survivor positions, sources)."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is None:
        raise RuntimeError("illava is not applied to this model")
    return state.trace
