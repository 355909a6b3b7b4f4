"""The family registry: `apply`, processor claiming and the CLI read it, and outside code extends it."""

import pytest
import torch

import illava
from illava import registry
from illava.tools import cli


class ToyEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, hidden):
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


class ToyProcessor:
    pass


def halve_tokens(state, model, processor=None):
    """A toy family: the ViT stage keeps every other token after the chosen layers."""
    state.config.validate_vit(len(model.layers))
    for index in state.config.illava_vit_k if state.config.enable_illava_vit else ():
        state.after_forward(model.layers[index], lambda module, args, output: output[:, ::2])


@pytest.fixture
def toy_family():
    family = illava.register_family(illava.Family(
        name="toy", model_classes=(ToyEncoder,), apply=halve_tokens, vision_tower=lambda model: model,
        processor_class_names=("ToyProcessor",), model_types=("toy_vlm",),
    ))
    yield family
    with registry._lock:
        registry._registered.remove(family)


def test_an_outside_family_is_applied_and_removed(toy_family):
    model = ToyEncoder()
    hidden = torch.randn(1, 8, 4)
    unpatched = model(hidden)
    illava.apply(model, enable_illava_vit=True, illava_vit_k="0-2", illava_vit_r=1)
    assert illava.find_family(model) is toy_family
    assert model(hidden).shape == (1, 2, 4)
    illava.remove(model)
    torch.testing.assert_close(model(hidden), unpatched)


def test_an_outside_family_has_its_settings_validated_and_its_processor_claimed(toy_family):
    with pytest.raises(ValueError, match="illava_vit_k"):
        illava.apply(ToyEncoder(), enable_illava_vit=True, illava_vit_k="5", illava_vit_r=1)
    with pytest.raises(ValueError, match="ToyProcessor"):
        illava.apply(ToyEncoder(), processor=object(), enable_illava_vit=True, illava_vit_k="0", illava_vit_r=1)
    model, processor = ToyEncoder(), ToyProcessor()
    illava.apply(model, processor=processor, enable_illava_vit=True, illava_vit_k="0", illava_vit_r=1)
    with pytest.raises(RuntimeError, match="already patched"):
        illava.apply(ToyEncoder(), processor=processor, enable_illava_vit=True, illava_vit_k="0", illava_vit_r=1)


def test_a_registered_family_replaces_the_built_in_one_of_its_name():
    builtin = next(family for family in registry.families() if family.name == "siglip2")
    replacement = illava.register_family(illava.Family(
        name="siglip2", model_classes=builtin.model_classes, apply=halve_tokens, vision_tower=builtin.vision_tower))
    try:
        assert [family.name for family in registry.families()].count("siglip2") == 1
        assert registry.families()[0] is replacement
    finally:
        with registry._lock:
            registry._registered[registry._registered.index(replacement)] = builtin


def test_an_unsupported_model_names_every_supported_class():
    with pytest.raises(TypeError, match="illava does not support Linear; supported: .*Qwen2VLModel.*LlavaViTPackingModel"):
        illava.apply(torch.nn.Linear(2, 2), enable_illava_vit=True, illava_vit_k="0", illava_vit_r=1)


def test_the_cli_loads_the_model_types_of_the_registry(toy_family, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(cli.CliError, match="'bert' is not supported; supported: .*'toy_vlm'.*'qwen2_5_vl'"):
        cli.load_model(cli.build_parser().parse_args(["--model_path", str(tmp_path), "--input_path", "unused.jpg"]))
