"""The contract every family keeps, checked on every family of `families.FAMILIES` (CPU, tiny random models):

- a stage that is off, or on with r=0, computes what the unpatched model computes; on with r > 0 it merges;
- `remove` (and a failed `apply`) leaves nothing behind: hooks, instance attributes, classes, processor, outputs;
- `copy.deepcopy` gives an independent patched model; shallow copies and pickling are refused by name;
- misuse (applying twice, a layer beyond the model, an r that leaves no token) is refused, naming the value.

Per-family files test what is specific to a family (layouts, M-RoPE, DeepStack, windows)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import illava

from .conftest import same
from .families import FAMILIES

NAMES = sorted(FAMILIES)
MODES = ["merge", "drop", "shift", "pivot"]
TOO_LARGE_R = 10_000


@pytest.fixture(params=NAMES)
def case(request):
    """A fresh model per test; whatever a failing test left patched is removed."""
    built = FAMILIES[request.param]()
    yield built
    if illava.is_applied(built.model):
        illava.remove(built.model)


def outputs(case, module=None):
    """`module`'s output on every probe of the case (greedy tokens too, where the family generates)."""
    module = case.model if module is None else module
    results = [case.call(module, **probe) for probe in case.probes]
    if case.generates:
        results.append(case.call(module, **case.probes[-1], generate=True))
    return results


def all_same(first, second) -> bool:
    return len(first) == len(second) and all(same(a, b) for a, b in zip(first, second))


def vit_only(case, **options):
    return dict(case.settings, enable_illava_llm=False, **options)


def llm_only(case, **options):
    return dict(case.settings, enable_illava_vit=False, **options)


def vision_counts(model):
    return [entry.tokens_per_group for entry in illava.last_trace(model).vision]


def span_counts(model):
    return [layer.visual_tokens_per_span for layer in illava.last_trace(model).language]


# -- what remove must restore ----------------------------------------------------------------------------------


def _contents(obj) -> dict:
    """An object's instance attributes, containers copied one level down (hook dicts are changed in place)."""
    copied = {}
    for name, value in vars(obj).items():
        if isinstance(value, dict):
            value = dict(value)
        elif isinstance(value, (list, set)):
            value = type(value)(value)
        copied[name] = value
    return copied


def _equal(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)) and type(a) is type(b):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  (objects whose == is not a truth value)
        return False


def _global_hooks() -> dict:
    from torch.nn.modules import module

    names = [name for name in vars(module) if name.startswith("_global_") and name.endswith("hooks")]
    return {name: dict(getattr(module, name)) for name in names}


def snapshot(model, processor) -> dict:
    """Everything `apply` may touch: each submodule's instance attributes (hook dicts included), the configs, the
    classes of the modules and of the processor's parts, the processor's parts and torch's global hooks."""
    parts = {}
    if processor is not None:
        parts["processor"] = processor
        for name in ("image_processor", "video_processor", "tokenizer"):
            if getattr(processor, name, None) is not None:
                parts[f"processor.{name}"] = getattr(processor, name)
    objects = {f"module {name or '<model>'}": module for name, module in model.named_modules()} | parts
    classes = {cls for obj in objects.values() for cls in type(obj).__mro__ if cls is not object}
    state = {name: _contents(obj) for name, obj in objects.items()}
    state |= {f"class {cls.__module__}.{cls.__qualname__}": dict(vars(cls)) for cls in classes}
    state["config"] = model.config.to_dict()
    if getattr(model, "generation_config", None) is not None:
        state["generation_config"] = model.generation_config.to_dict()
    state["torch global hooks"] = _global_hooks()
    return state


def left_behind(before: dict, after: dict) -> list[str]:
    """What differs between two snapshots, one line per attribute."""
    found = [f"{owner}: {'added' if owner in after else 'lost'}" for owner in before.keys() ^ after.keys()]
    for owner in before.keys() & after.keys():
        old, new = before[owner], after[owner]
        for name in old.keys() | new.keys():
            if name not in new:
                found.append(f"{owner}: {name} removed")
            elif name not in old:
                found.append(f"{owner}: {name} added ({type(new[name]).__name__})")
            elif not _equal(old[name], new[name]):
                found.append(f"{owner}: {name} changed")
    return sorted(found)


def layout(model) -> dict:
    """Per submodule, the names of its instance attributes and how many hooks of each kind it holds (for a copy,
    whose objects are its own)."""
    return {name: (sorted(vars(module)),
                   {key: len(value) for key, value in vars(module).items() if key.endswith("hooks")})
            for name, module in model.named_modules()}


# -- off, r=0, on ----------------------------------------------------------------------------------------------


def test_stages_turned_off_compute_what_the_unpatched_model_computes(case):
    model, processor = case.model, case.processor
    baseline = outputs(case)
    for options in ({}, dict(case.settings, enable_illava_vit=False, enable_illava_llm=False)):
        with illava.applied(model, processor=processor, **options):
            assert all_same(outputs(case), baseline), options
            assert not illava.last_trace(model).vision and not illava.last_trace(model).language


@pytest.mark.parametrize("mode", MODES)
def test_r_zero_computes_what_the_unpatched_model_computes(case, mode):
    model, processor = case.model, case.processor
    baseline = outputs(case)
    layers = len(illava.IllavaConfig(**case.settings).illava_vit_k)
    runs = {"vit": vit_only(case, illava_vit_r=0, illava_vit_mode=mode)}
    if case.llm_layers is not None:
        runs["llm"] = llm_only(case, illava_llm_r=0, illava_llm_mode=mode)
        runs["both"] = dict(case.settings, illava_vit_r=0, illava_llm_r=0, illava_vit_mode=mode,
                            illava_llm_mode=mode)
    for stage, options in runs.items():
        with illava.applied(model, processor=processor, **options):
            assert all_same(outputs(case), baseline), stage
            counts = vision_counts(model)
            if stage != "llm":  # the merge layers ran and took nothing
                assert counts and all(row == [row[0]] * (layers + 1) for row in counts), (stage, counts)
            if stage != "vit":
                assert len(span_counts(model)) == len(options["illava_llm_k"].split("-")), stage


@pytest.mark.parametrize("mode", MODES)
def test_the_vit_stage_merges_in_every_mode(case, mode):
    model, processor = case.model, case.processor
    baseline = outputs(case)
    with illava.applied(model, processor=processor, **vit_only(case, illava_vit_mode=mode)):
        for probe, unpatched in zip(case.probes, baseline):
            output = case.call(model, **probe)
            counts = vision_counts(model)
            assert counts and all(row[-1] < row[0] for row in counts), (probe, counts)
            assert not same(output, unpatched), probe


@pytest.mark.parametrize("mode", MODES)
def test_the_llm_stage_merges_in_every_mode(case, mode):
    if case.llm_layers is None:
        pytest.skip("no language model")
    model, processor = case.model, case.processor
    for probe in case.probes:
        with illava.applied(model, processor=processor, **llm_only(case, illava_llm_r=0)):
            unmerged = case.call(model, **probe)
            full = span_counts(model)
        with illava.applied(model, processor=processor, **llm_only(case, illava_llm_mode=mode)):
            merged = case.call(model, **probe)
            counts = span_counts(model)
        assert len(counts) == len(full) and all(
            len(spans) == len(full_spans) and all(n < m for n, m in zip(spans, full_spans))
            for spans, full_spans in zip(counts, full)), (probe, counts, full)
        assert not same(merged, unmerged), probe


# -- remove ----------------------------------------------------------------------------------------------------


def everything_on(case):
    options = dict(case.settings, illava_track_vit_source=True)
    if case.llm_layers is not None:
        options["illava_track_llm_source"] = True
    return options


def test_remove_leaves_nothing_behind_and_apply_works_again(case):
    model, processor = case.model, case.processor
    baseline = outputs(case)
    before = snapshot(model, processor)
    illava.apply(model, processor=processor, **everything_on(case))
    merged = outputs(case)
    assert not all_same(merged, baseline)
    illava.remove(model)
    assert not illava.is_applied(model)
    assert all_same(outputs(case), baseline)
    assert left_behind(before, snapshot(model, processor)) == []
    # a second round merges as the first did and leaves nothing either
    illava.apply(model, processor=processor, **everything_on(case))
    assert all_same(outputs(case), merged)
    illava.remove(model)
    assert all_same(outputs(case), baseline)
    assert left_behind(before, snapshot(model, processor)) == []


def test_the_context_manager_removes_on_an_error(case):
    model, processor = case.model, case.processor
    baseline = outputs(case)
    before = snapshot(model, processor)
    with pytest.raises(KeyError, match="raised inside"):
        with illava.applied(model, processor=processor, **case.settings):
            case.call(model, **case.probes[0])
            raise KeyError("raised inside")
    assert not illava.is_applied(model)
    assert all_same(outputs(case), baseline)
    assert left_behind(before, snapshot(model, processor)) == []


def test_remove_and_last_trace_of_an_unpatched_model_are_refused(case):
    with pytest.raises(RuntimeError, match="not applied"):
        illava.remove(case.model)
    with pytest.raises(RuntimeError, match="not applied"):
        illava.last_trace(case.model)
    illava.apply(case.model, processor=case.processor, **case.settings)
    illava.remove(case.model)
    with pytest.raises(RuntimeError, match="not applied"):
        illava.remove(case.model)


# -- copies ----------------------------------------------------------------------------------------------------


def test_a_deep_copy_is_an_independent_patched_model(case):
    model, processor = case.model, case.processor
    baseline = outputs(case)
    pristine, before = layout(model), snapshot(model, processor)
    illava.apply(model, processor=processor, **case.settings)
    merged = outputs(case)
    trace = illava.last_trace(model)
    counts = vision_counts(model)

    duplicate = copy.deepcopy(model)
    assert illava.is_applied(model) and illava.is_applied(duplicate)
    assert illava.last_trace(model) is trace  # copying lost nothing
    assert all_same(outputs(case, duplicate), merged)
    assert illava.last_trace(model) is trace  # the copy's calls wrote its own trace
    assert illava.last_trace(duplicate) is not trace and vision_counts(duplicate) == counts

    # removing a copy leaves the original patched
    other = copy.deepcopy(model)
    illava.remove(other)
    assert layout(other) == pristine
    assert all_same(outputs(case), merged) and vision_counts(model) == counts

    # removing the original leaves the copy patched, with its own hooks and attributes untouched
    patched_layout = layout(duplicate)
    illava.remove(model)
    assert all_same(outputs(case), baseline)
    assert left_behind(before, snapshot(model, processor)) == []
    assert all_same(outputs(case, other), baseline)  # (run now: the processor merged for the original until here)
    assert illava.is_applied(duplicate) and layout(duplicate) == patched_layout
    if processor is None:  # (a processor goes back with its model; the copy was made without one)
        assert all_same(outputs(case, duplicate), merged) and vision_counts(duplicate) == counts
    illava.remove(duplicate)
    assert layout(duplicate) == pristine
    assert all_same(outputs(case, duplicate), baseline)


def test_shallow_copies_and_pickling_are_refused_by_name(case):
    model = case.model
    illava.apply(model, processor=case.processor, **case.settings)
    merged = outputs(case)
    for refused in (copy.copy, pickle.dumps, lambda module: torch.save(module, io.BytesIO())):
        with pytest.raises(TypeError, match="illava"):
            refused(model)
    assert illava.is_applied(model) and all_same(outputs(case), merged)  # the refusals changed nothing
    illava.remove(model)
    assert copy.copy(model) is not model  # unpatched: as usual
    try:  # (transformers' own output-capturing hooks make some models unpicklable after a forward)
        pickle.dumps(model)
    except Exception as error:  # noqa: BLE001
        assert "illava" not in str(error)


# -- misuse ----------------------------------------------------------------------------------------------------


def test_applying_twice_is_refused_and_the_first_patch_stays(case):
    model, processor = case.model, case.processor
    baseline = outputs(case)
    before = snapshot(model, processor)
    illava.apply(model, processor=processor, **case.settings)
    merged = outputs(case)
    for options in (case.settings, dict(case.settings, illava_vit_r=0), {}):
        with pytest.raises(RuntimeError, match="already applied"):
            illava.apply(model, processor=processor, **options)
    assert all_same(outputs(case), merged)
    illava.remove(model)
    assert all_same(outputs(case), baseline)
    assert left_behind(before, snapshot(model, processor)) == []


@pytest.mark.parametrize("stage", ["vit", "llm"])
def test_a_layer_beyond_the_model_is_named_and_nothing_is_left(case, stage):
    model, processor = case.model, case.processor
    depth = case.vit_layers if stage == "vit" else case.llm_layers
    if depth is None:
        pytest.skip("no language model")
    first = case.first_llm_layer if stage == "llm" else 1
    before = snapshot(model, processor)
    options = dict(case.settings, **{f"enable_illava_{stage}": True, f"illava_{stage}_k": f"{first}-{depth}"})
    named = rf"illava_{stage}_k={first}-{depth}: layer\(s\) \[{depth}\] beyond .* {depth} layers"
    with pytest.raises(ValueError, match=named):
        illava.apply(model, processor=processor, **options)
    assert not illava.is_applied(model)
    assert left_behind(before, snapshot(model, processor)) == []
    # the last layer is one the model has
    illava.apply(model, processor=processor, **dict(options, **{f"illava_{stage}_k": f"{first}-{depth - 1}"}))
    case.call(model, **case.probes[0])


def test_an_r_that_leaves_no_token_is_named(case):
    model, processor = case.model, case.processor
    baseline = outputs(case)
    before = snapshot(model, processor)
    with pytest.raises(ValueError, match=rf"illava_vit_r={TOO_LARGE_R}\b"):
        illava.apply(model, processor=processor, **vit_only(case, illava_vit_r=TOO_LARGE_R))
        case.call(model, **case.probes[0])  # families whose token counts vary per input check when merging
    if illava.is_applied(model):
        illava.remove(model)
    assert all_same(outputs(case), baseline)
    assert left_behind(before, snapshot(model, processor)) == []


def test_the_llm_stage_of_a_model_without_one_is_refused_by_name(case):
    if case.llm_layers is not None:
        pytest.skip("has a language model stage")
    model, processor = case.model, case.processor
    before = snapshot(model, processor)
    with pytest.raises(ValueError, match="enable_illava_llm"):
        illava.apply(model, processor=processor, **dict(case.settings, enable_illava_llm=True, illava_llm_k="1"))
    assert not illava.is_applied(model)
    assert left_behind(before, snapshot(model, processor)) == []
