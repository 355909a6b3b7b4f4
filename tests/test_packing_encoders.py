"""The reference implementation's packing encoders (AIMv2, DINOv3, SigLIP2 NaFlex): alignment with the transformers models, the align
CLI, and ViT-stage merging per packed frame. (Off, r=0, remove, copies and bad settings: `test_contract.py`.)"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Aimv2VisionConfig, DINOv3ViTConfig, Siglip2Config, Siglip2Model, Siglip2VisionConfig

import illava
from illava.models import AIMv2Packing, DINOv3ViTPacking, Siglip2NaflexPacking, convert_to_packing_format
from illava.tools import align

from .test_llava_vit_model import random_model, tiny_config

PATCH = 4
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, patch_size=PATCH)
CONFIGS = {
    "aimv2": (AIMv2Packing, lambda: Aimv2VisionConfig(image_size=32, is_native=True, **TINY)),
    "dinov3": (DINOv3ViTPacking, lambda: DINOv3ViTConfig(image_size=32, num_register_tokens=4, **TINY)),
    "siglip2": (Siglip2NaflexPacking, lambda: Siglip2VisionConfig(num_patches=16, **TINY)),
}
NAMES = sorted(CONFIGS)
# (frames, height, width) in pixels: different sizes and aspect ratios, one row of two frames
SIZES = [(1, 16, 16), (1, 24, 32), (2, 16, 24), (1, 32, 16)]


def random_encoder(name: str, seed: int = 0):
    encoder_class, config = CONFIGS[name]
    torch.manual_seed(seed)
    encoder = encoder_class.from_config(config()).eval()
    with torch.no_grad():  # move norms, biases, layer scales and tokens off their identity initialisation
        for parameter in encoder.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return encoder


@pytest.fixture(scope="module")
def encoders():
    return {name: random_encoder(name) for name in NAMES}


def packed_input(sizes=SIZES, seed: int = 1):
    """Images of every size, their packed patches `[N, p*p*3]` and `grid_thw`."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(t, 3, h, w, generator=generator) for t, h, w in sizes]
    patches = [convert_to_packing_format(frames, PATCH)[0] for frames in images]
    grid = torch.tensor([[t, h // PATCH, w // PATCH] for t, h, w in sizes])
    return images, torch.cat(patches), grid


def standard_output(name: str, standard, image: torch.Tensor):
    """The transformers model on one image `[1, C, H, W]`: (patch tokens of last_hidden_state, pooler_output)."""
    if name == "siglip2":
        patches, grid = convert_to_packing_format(image, PATCH)
        mask = torch.ones(1, patches.shape[0], dtype=torch.long)
        output = standard(pixel_values=patches[None], pixel_attention_mask=mask, spatial_shapes=grid[:, 1:])
        return output.last_hidden_state[0], output.pooler_output[0]
    output = standard(pixel_values=image)
    prefix = 1 + standard.config.num_register_tokens if name == "dinov3" else 0
    return output.last_hidden_state[0, prefix:], output.pooler_output[0]


def standard_model(name: str, encoder):
    """A transformers model holding the packing encoder's weights (loaded through its state dict: same keys)."""
    standard = encoder.standard_class(encoder.config).eval()
    standard.load_state_dict(encoder.state_dict(), strict=True)
    return standard


def run(encoder, patches, grid):
    with torch.no_grad():
        return encoder(patches, grid)


@pytest.mark.parametrize("name", NAMES)
def test_one_packed_call_matches_the_transformers_model_per_image(name, encoders):
    encoder = encoders[name]
    standard = standard_model(name, encoder)
    assert set(encoder.state_dict()) == set(standard.state_dict())
    images, patches, grid = packed_input()
    output = run(encoder, patches, grid)
    with torch.no_grad():
        expected = [standard_output(name, standard, frame[None]) for frames in images for frame in frames]
    tokens = torch.cat([tokens for tokens, _ in expected])
    assert output.last_hidden_state.shape == tokens.shape == (patches.shape[0], 32)
    torch.testing.assert_close(output.last_hidden_state, tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.pooler_output, torch.stack([pooled for _, pooled in expected]),
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def checkpoints(encoders, tmp_path_factory):
    """Each tiny encoder saved by its transformers model's `save_pretrained`."""
    folder = tmp_path_factory.mktemp("packing_checkpoints")
    for name, encoder in encoders.items():
        standard_model(name, encoder).save_pretrained(folder / name)
    return folder


@pytest.mark.parametrize("name", NAMES)
def test_align_cli_passes_on_a_checkpoint(name, encoders, checkpoints, capsys):
    loaded = CONFIGS[name][0].from_pretrained(checkpoints / name)
    for key, value in encoders[name].state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    status = align.main(["--model", name, "--ckpt", str(checkpoints / name), "--image_size", "16", "24x32",
                         "--batch_size", "2", "--use_real_images"])
    report = capsys.readouterr().out
    assert status == 0, report
    assert "16x16: 2 image(s), 32 tokens, cosine min 1.000000" in report
    assert "24x32: 2 image(s), 96 tokens, cosine min 1.000000" in report
    assert report.strip().endswith("PASS (threshold 0.99)")


def test_align_cli_fails_on_a_corrupted_checkpoint(encoders, tmp_path):
    standard = standard_model("siglip2", encoders["siglip2"])
    with torch.no_grad():
        standard.encoder.layers[0].mlp.fc1.weight[0, 0] = float("nan")
    standard.save_pretrained(tmp_path)
    result = subprocess.run([sys.executable, "-m", "illava.tools.align", "--model", "siglip2", "--ckpt", str(tmp_path),
                             "--image_size", "16"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL" in result.stdout.splitlines()[-1]


@pytest.mark.parametrize("name", NAMES)
def test_each_frame_merges_alone_with_int_and_float_r(name, encoders):
    encoder = encoders[name]
    _, patches, grid = packed_input()
    frames_per_row = grid[:, 0].tolist()
    patches_per_frame = (grid[:, 1] * grid[:, 2]).tolist()  # 16, 48, 24, 32
    for r, expected_counts in ((3, [[n, n - 3, n - 6] for n in patches_per_frame]),
                               (0.25, [[16, 12, 9], [48, 36, 27], [24, 18, 14], [32, 24, 18]])):
        with illava.applied(encoder, enable_illava_vit=True, illava_vit_k="0-1", illava_vit_r=r,
                            illava_track_vit_source=True):
            output = run(encoder, patches, grid)
            trace = illava.last_trace(encoder).vision
            first = patches_per_frame[0]
            alone = run(encoder, patches[:first], grid[:1])
        assert [entry.tokens_per_group for entry in trace] == expected_counts
        kept = [counts[-1] for counts in expected_counts]
        assert output.last_hidden_state.shape[0] == sum(t * k for t, k in zip(frames_per_row, kept))
        assert output.pooler_output.shape[0] == sum(frames_per_row)
        # packing never lets one frame move another
        torch.testing.assert_close(output.last_hidden_state[: kept[0]], alone.last_hidden_state, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(output.pooler_output[:1], alone.pooler_output, rtol=1e-5, atol=1e-5)
        for entry, frames, count, (t, h, w) in zip(trace, frames_per_row, kept, grid.tolist()):
            assert entry.positions.shape == (frames, count) and entry.groups_per_item == [frames]
            assert bool((entry.positions[:, 1:] > entry.positions[:, :-1]).all())  # raster order
            assert entry.source_map().shape == (frames, h, w) and len(entry.source_history) == 2
            survivors = entry.sources.gather(1, entry.positions)
            assert torch.equal(survivors, torch.arange(count).expand(frames, -1))


@pytest.mark.parametrize("name", NAMES)
def test_survivors_keep_their_true_positions(name, encoders):
    """Drop at layer 0, then the later layers must see each survivor with its own position: rebuild that run
    from the encoder's parts and the traced survivor positions."""
    encoder = encoders[name]
    _, patches, grid = packed_input()
    with illava.applied(encoder, enable_illava_vit=True, illava_vit_k="0", illava_vit_r=5, illava_vit_mode="drop"):
        merged = run(encoder, patches, grid)
        positions = [row for entry in illava.last_trace(encoder).vision for row in entry.positions]
    with torch.no_grad():
        hidden, segments = encoder.embed(patches, grid)
        layer = encoder.layers[0]
        hidden, _, _ = encoder.attention_residual(layer, hidden, segments)
        prefix = segments.num_prefix
        rows = torch.cat([torch.cat((start + torch.arange(prefix), start + prefix + survivors))
                          for start, survivors in zip(segments.cu_seqlens[:-1].tolist(), positions)])
        lengths = torch.tensor([prefix + len(survivors) for survivors in positions])
        segments.cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        full_tables = segments.rotary
        if full_tables is not None:
            segments.rotary = tuple(table[rows] for table in full_tables)
        hidden = encoder.mlp_residual(layer, hidden[rows])
        after_merge = hidden
        for index in range(1, len(encoder.layers)):
            hidden = encoder.encoder_layer(index, hidden, segments)
        expected = encoder.finish(hidden, segments)
        torch.testing.assert_close(merged.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
        if full_tables is not None:  # DINOv3: the rows of the first positions instead would change the result
            segments.rotary = tuple(table[: rows.numel()] for table in full_tables)
            hidden = after_merge
            for index in range(1, len(encoder.layers)):
                hidden = encoder.encoder_layer(index, hidden, segments)
            wrong = encoder.finish(hidden, segments).last_hidden_state
            assert not torch.allclose(wrong, merged.last_hidden_state, atol=1e-3)


def test_dinov3_prefix_tokens_are_never_merged_nor_counted(encoders):
    encoder = encoders["dinov3"]
    _, patches, grid = packed_input([(1, 16, 16), (1, 16, 24)])  # 16 and 24 patches, 5 prefix tokens each
    baseline = run(encoder, patches, grid)
    # merging in the last layer leaves the CLS token exactly as it was: it is never a candidate
    with illava.applied(encoder, enable_illava_vit=True, illava_vit_k="2", illava_vit_r=15):
        merged = run(encoder, patches, grid)
        assert [entry.tokens_per_group for entry in illava.last_trace(encoder).vision] == [[16, 1], [24, 9]]
    assert merged.last_hidden_state.shape == (1 + 9, 32)
    torch.testing.assert_close(merged.pooler_output, baseline.pooler_output, rtol=0, atol=1e-6)
    with illava.applied(encoder, enable_illava_vit=True, illava_vit_k="2", illava_vit_r=0.5):
        run(encoder, patches, grid)
        assert [entry.tokens_per_group for entry in illava.last_trace(encoder).vision] == [[16, 8], [24, 12]]
    # the 5 prefix tokens do not count as tokens left
    with illava.applied(encoder, enable_illava_vit=True, illava_vit_k="2", illava_vit_r=16):
        with pytest.raises(ValueError, match=r"illava_vit_r=16 leaves no token in segment 0 \(grid_thw row 0, 4x4"):
            run(encoder, patches, grid)


def test_bad_settings_and_inputs_are_named(encoders):
    encoder = encoders["aimv2"]
    _, patches, grid = packed_input([(1, 16, 16), (1, 8, 8)])
    with illava.applied(encoder, enable_illava_vit=True, illava_vit_k="0-1", illava_vit_r=2):
        with pytest.raises(ValueError, match=r"illava_vit_r=2 leaves no token in segment 1 \(grid_thw row 1, 2x2"):
            run(encoder, patches, grid)
    with pytest.raises(ValueError, match="grid_thw covers 20 patches but hidden_states has 19 rows"):
        run(encoder, patches[:-1], grid)
    with pytest.raises(ValueError, match="do not split into 4x4 patches"):
        convert_to_packing_format(torch.zeros(1, 3, 18, 16), PATCH)
    fixed_size = AIMv2Packing.from_config(Aimv2VisionConfig(image_size=16, is_native=False, **TINY)).eval()
    assert run(fixed_size, patches[:16], grid[:1]).last_hidden_state.shape == (16, 32)
    with pytest.raises(ValueError, match="learned position embeddings for 4x4 patches; got an image of 2x2"):
        run(fixed_size, patches, grid)


@pytest.mark.parametrize("mode", ["drop", "shift", "pivot"])
@pytest.mark.parametrize("name", NAMES)
def test_every_merge_mode_keeps_the_default_counts(name, mode, encoders):
    encoder = encoders[name]
    _, patches, grid = packed_input()
    found = {}
    for current in ("merge", mode):
        with illava.applied(encoder, enable_illava_vit=True, illava_vit_k="0-1", illava_vit_r=0.25,
                            illava_vit_mode=current, illava_pc_ratio=0.3, illava_track_vit_source=True):
            output = run(encoder, patches, grid)
            trace = illava.last_trace(encoder).vision
        found[current] = [entry.tokens_per_group for entry in trace]
        assert bool(torch.isfinite(output.last_hidden_state).all())
        owners = trace[0].source_map()
        if current == "drop":
            assert bool((owners < 0).any())  # dropped patches: no survivor stands for them
        assert owners.shape == (1, 4, 4)
    assert found[mode] == found["merge"]


@pytest.mark.parametrize(("name", "other"), [("aimv2", "dinov3"), ("dinov3", "siglip2"), ("siglip2", "aimv2")])
def test_align_cli_refuses_a_checkpoint_of_another_encoder(name, other, checkpoints, capsys):
    """Loading another encoder's checkpoint leaves the weights random on both sides, which then agree: no PASS."""
    with pytest.raises(SystemExit) as exit_info:
        align.main(["--model", name, "--ckpt", str(checkpoints / other), "--image_size", "16"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert "PASS" not in captured.out
    standard_class = CONFIGS[name][0].standard_class.__name__
    assert f"does not fit --model {name} ({standard_class}): " in captured.err
    missing = re.search(r"\d+ missing weight\(s\): (\S+),", captured.err)
    unexpected = re.search(r"\d+ unexpected weight\(s\): (\S+),", captured.err)
    assert missing and unexpected, captured.err
    own_keys = set(CONFIGS[name][0].standard_class(CONFIGS[name][1]()).state_dict())
    assert missing.group(1) in own_keys and unexpected.group(1) not in own_keys


def test_align_cli_refuses_extra_weights_but_leaves_out_other_towers(encoders, tmp_path, capsys):
    # a checkpoint with a layer more than its config: weights under the model's own names it has no place for
    standard = standard_model("aimv2", encoders["aimv2"])
    standard.save_pretrained(tmp_path / "extra_layer")
    config_file = tmp_path / "extra_layer" / "config.json"
    config_file.write_text(config_file.read_text().replace('"num_hidden_layers": 3', '"num_hidden_layers": 2'))
    with pytest.raises(SystemExit) as exit_info:
        align.main(["--model", "aimv2", "--ckpt", str(tmp_path / "extra_layer"), "--image_size", "16"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "unexpected weight(s): encoder.layers.2." in error and "missing" not in error
    # a full SigLIP2 checkpoint (vision and text towers, as google/siglip2-*-naflex): the text tower is left out
    vision = Siglip2VisionConfig(num_patches=16, **TINY).to_dict()
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    Siglip2Model(Siglip2Config(text_config=text, vision_config=vision)).save_pretrained(tmp_path / "full")
    status = align.main(["--model", "siglip2", "--ckpt", str(tmp_path / "full"), "--image_size", "16"])
    report = capsys.readouterr().out
    assert status == 0, report
    assert re.search(r"left out \d+ checkpoint weight\(s\) outside Siglip2VisionModel", report)
    assert report.strip().endswith("PASS (threshold 0.99)")


_, GOOD_PATCHES, GOOD_GRID = packed_input()  # 144 patches; grid [[1, 4, 4], [1, 6, 8], [2, 4, 6], [1, 8, 4]]
INTEGER_TENSOR = r"grid_thw must be an integer tensor \[images, 3\] of \(t, h, w\) in patches"
BAD_GRIDS = {
    "no rows": (GOOD_PATCHES, GOOD_GRID[:0], ValueError,
                INTEGER_TENSOR + r" with at least one row, got shape \(0, 3\)"),
    "float": (GOOD_PATCHES, GOOD_GRID.float(), TypeError,
              INTEGER_TENSOR + r", got dtype torch.float32 \(shape \(4, 3\)\)"),
    "list": (GOOD_PATCHES, GOOD_GRID.tolist(), TypeError, INTEGER_TENSOR + ", got a list"),
    "bool": (GOOD_PATCHES, GOOD_GRID > 0, TypeError, INTEGER_TENSOR + ", got dtype torch.bool"),
    "two columns": (GOOD_PATCHES, GOOD_GRID[:, 1:], ValueError, INTEGER_TENSOR + r".*got shape \(4, 2\)"),
    "negative": (GOOD_PATCHES, GOOD_GRID * torch.tensor([1, -1, -1]), ValueError,
                 r"grid_thw row 0 is \[1, -4, -4\]: t, h and w must be at least"),
    "too few patches": (GOOD_PATCHES[:-1], GOOD_GRID, ValueError,
                        "grid_thw covers 144 patches but hidden_states has 143 rows"),
}


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
@pytest.mark.parametrize("name", [*NAMES, "llava_vit"])
def test_every_packing_encoder_names_a_bad_grid(name, patched, encoders):
    """All four packing encoders check `grid_thw` at their entry (`check_grid_thw`), merging or not."""
    encoder = random_model(tiny_config()) if name == "llava_vit" else encoders[name]
    merging = illava.applied(encoder, enable_illava_vit=True, illava_vit_k="1", illava_vit_r=2)
    with merging if patched else contextlib.nullcontext():
        for patches, grid, error, message in BAD_GRIDS.values():
            with pytest.raises(error, match=message):
                run(encoder, patches, grid)
        if name == "llava_vit":  # takes rows without patches, but not a grid without any
            with pytest.raises(ValueError, match=r"every row of grid_thw \(shape \(1, 3\)\) is empty: no patch"):
                run(encoder, GOOD_PATCHES[:0], torch.tensor([[0, 4, 4]]))
        else:
            with pytest.raises(ValueError, match=r"grid_thw row 4 is \[1, 0, 4\]: t, h and w must be at least 1"):
                run(encoder, GOOD_PATCHES, torch.cat((GOOD_GRID, torch.tensor([[1, 0, 4]]))))
