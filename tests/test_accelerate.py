"""Merge layers under accelerate's hooks, as `from_pretrained(device_map=...)` / `dispatch_model` install them (a
model split over devices, CPU or disk offload): illava's merging forward runs beneath them, so their pre-forward
(inputs to the execution device, offloaded weights loaded) and post-forward still run, and merging gives what it
gives without them. On CPU the split is over "cpu" and "disk": a disk-offloaded layer has no weights until its
hook loads them, so a merging forward that bypassed the hook would fail."""

import pytest
import torch

import illava

from .families import FAMILIES

accelerate = pytest.importorskip("accelerate")

# the blocks illava replaces the forward of; the packing encoders (AIMv2, DINOv3, SigLIP2 packing) run their layers'
# parts from a method of the encoder, never a layer's forward, so accelerate's per-layer hooks do not apply to them,
# patched or not
LAYER_CLASSES = ("SiglipEncoderLayer", "Siglip2EncoderLayer", "Qwen2VLVisionBlock", "Qwen2_5_VLVisionBlock", "Qwen3VLVisionBlock",
                 "Qwen3VLMoeVisionBlock", "Qwen3_5VisionBlock",
                 "LlavaViTEncoderLayer")
LAYERED_FAMILIES = sorted(set(FAMILIES) - {"aimv2", "dinov3", "siglip2_packing"})


def split_device_map(model) -> dict[str, str]:
    """Every vision layer alternately on "cpu" and offloaded to "disk"; everything else on "cpu"."""
    layers = [name for name, module in model.named_modules() if type(module).__name__ in LAYER_CLASSES]
    assert layers, "no vision layer found"
    device_map = {name: ("disk" if index % 2 == 0 else "cpu") for index, name in enumerate(layers)}

    def cover(prefix, module):
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path in device_map:
                continue
            if any(layer.startswith(path + ".") for layer in layers):
                cover(path + ".", child)
            else:
                device_map[path] = "cpu"
        for name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            device_map[f"{prefix}{name}"] = "cpu"

    cover("", model)
    return device_map


def merge_counts(model):
    return [entry.tokens_per_group for entry in illava.last_trace(model).vision]


@pytest.mark.parametrize("family", LAYERED_FAMILIES)
def test_merging_beneath_accelerate_hooks_gives_what_it_gives_without_them(family, tmp_path):
    model, processor, call, settings, *_ = FAMILIES[family]()
    unpatched = call(model, 1)
    with illava.applied(model, processor=processor, **settings):
        expected = call(model, 1)
        expected_counts = merge_counts(model)

    device_map = split_device_map(model)
    accelerate.dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path))
    offloaded = [name for name, device in device_map.items() if device == "disk"]
    assert any(p.device.type == "meta" for n, p in model.named_parameters() if n.startswith(offloaded[0] + "."))
    illava.apply(model, processor=processor, **settings)
    torch.testing.assert_close(call(model, 1), expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert merge_counts(model) == expected_counts
    assert expected_counts[0][-1] < expected_counts[0][0]

    illava.remove(model)
    torch.testing.assert_close(call(model, 1), unpatched, rtol=1e-5, atol=1e-5, equal_nan=True)


def counting_hook():
    class Counting(accelerate.hooks.ModelHook):
        calls = {"pre": 0, "post": 0}

        def pre_forward(self, module, *args, **kwargs):
            self.calls["pre"] += 1
            return args, kwargs

        def post_forward(self, module, output):
            self.calls["post"] += 1
            return output

    return Counting()


def merge_layer(model):
    return next(module for module in model.modules() if type(module).__name__ in LAYER_CLASSES
                and ("forward" in vars(module) or "_old_forward" in vars(module)))


def test_accelerate_hooks_added_after_apply_wrap_the_merge_and_survive_remove():
    model, processor, call, settings, *_ = FAMILIES["qwen2_vl"]()
    unpatched = call(model, 1)
    illava.apply(model, processor=processor, **settings)
    merged = call(model, 1)
    layer = merge_layer(model)
    hook = counting_hook()
    accelerate.hooks.add_hook_to_module(layer, hook)
    torch.testing.assert_close(call(model, 1), merged, equal_nan=True)
    assert hook.calls == {"pre": 1, "post": 1}

    illava.remove(model)
    assert getattr(layer, "_hf_hook", None) is hook  # accelerate's wrapper stays, around the original forward
    torch.testing.assert_close(call(model, 1), unpatched, equal_nan=True)
    assert hook.calls == {"pre": 2, "post": 2}
    accelerate.hooks.remove_hook_from_module(layer)
    assert layer.forward.__func__ is type(layer).forward and "_old_forward" not in vars(layer)


def test_accelerate_hooks_present_at_apply_run_around_the_merge_and_stay_after_remove():
    model, processor, call, settings, *_ = FAMILIES["llava_onevision"]()
    unpatched = call(model, 1)
    layers = [module for module in model.modules() if type(module).__name__ in LAYER_CLASSES]
    hooks = [counting_hook() for _ in layers]
    for layer, hook in zip(layers, hooks):
        accelerate.hooks.add_hook_to_module(layer, hook)
    wrapped = {id(layer): layer.forward for layer in layers}
    illava.apply(model, processor=processor, **settings)
    call(model, 1)
    assert merge_counts(model)[0][-1] < merge_counts(model)[0][0]
    assert all(hook.calls == {"pre": 1, "post": 1} for hook in hooks)

    illava.remove(model)
    assert all(layer.forward is wrapped[id(layer)] for layer in layers)
    torch.testing.assert_close(call(model, 1), unpatched, equal_nan=True)
    assert all(hook.calls == {"pre": 2, "post": 2} for hook in hooks)


def test_a_forward_already_replaced_by_something_else_is_named():
    model, processor, call, settings, *_ = FAMILIES["qwen2_vl"]()
    blocks = model.model.visual.blocks
    original = blocks[2].forward

    def timed_forward(*args, **kwargs):
        return original(*args, **kwargs)

    blocks[2].forward = timed_forward
    with pytest.raises(RuntimeError, match="timed_forward.*apply illava first"):
        illava.apply(model, processor=processor, **settings)
    assert not illava.is_applied(model)
    assert vars(blocks[2])["forward"] is timed_forward
