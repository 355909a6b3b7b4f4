"""LLaVA-ViT packing encoder: checkpoint layout, packing, RoPE positions and the adjacent-pair RoPE quirk (CPU)."""

from __future__ import annotations

import pytest
import torch

from illava.models.llava_vit import (
    LLAVA_VIT_VARIANTS,
    LlavaViTPackingConfig,
    LlavaViTPackingModel,
    apply_rotary_pos_emb_vision,
    compute_patch_positions_from_grid_thw,
    compute_patch_positions_with_interpolated_temporal,
    interpolate_frame_indices,
    llava_vit_packing_config,
)

PATCH = 4


def tiny_config(**overrides) -> LlavaViTPackingConfig:
    """head_dim 32: the smallest that splits head_dim/2 = 16 into 4:6:6."""
    fields = dict(
        hidden_size=64, num_attention_heads=2, num_hidden_layers=2, intermediate_size=128, patch_size=PATCH
    )
    fields.update(overrides)
    return LlavaViTPackingConfig(**fields)


def random_model(config: LlavaViTPackingConfig, seed: int = 0) -> LlavaViTPackingModel:
    torch.manual_seed(seed)
    model = LlavaViTPackingModel(config).eval()
    # Perturb every parameter, so that norms and biases are not at their identity init.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def patches_for(grid_thw: torch.Tensor, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid_thw.prod(-1).sum()), 3 * PATCH * PATCH, generator=generator)


@pytest.fixture(scope="module")
def model() -> LlavaViTPackingModel:
    return random_model(tiny_config())


def test_state_dict_roundtrip_with_upstream_keys():
    config = llava_vit_packing_config("small", num_hidden_layers=2)
    state = random_model(config, seed=3).state_dict()
    for key in (
        "patch_embed.proj.weight",
        "layernorm_pre.weight",
        "layernorm_pre.bias",
        "encoder.layers.0.layer_norm1.weight",
        "encoder.layers.0.layer_norm2.bias",
        "encoder.layers.0.self_attn.qkv.weight",
        "encoder.layers.0.self_attn.qkv.bias",
        "encoder.layers.1.self_attn.proj.weight",
        "encoder.layers.1.mlp.fc1.weight",
        "encoder.layers.1.mlp.fc2.bias",
        "layernorm_post.weight",
        "head.probe",
        "head.attention.in_proj_weight",
        "head.attention.out_proj.weight",
        "head.norm.weight",
        "head.mlp.fc1.weight",
    ):
        assert key in state, key
    assert state["patch_embed.proj.weight"].shape == (384, 3, 16, 16)
    assert state["encoder.layers.0.self_attn.qkv.weight"].shape == (3 * 384, 384)
    assert not any("rotary" in key for key in state), "RoPE buffers must stay out of the checkpoint"

    fresh = LlavaViTPackingModel(config)
    fresh.load_state_dict(state, strict=True)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_no_head_has_no_post_norm():
    keys = LlavaViTPackingModel(tiny_config(use_head=False)).state_dict().keys()
    assert not any(key.startswith(("head.", "layernorm_post.")) for key in keys)


def test_save_and_from_pretrained(tmp_path, model):
    """transformers 5 re-creates non-persistent buffers on load; the RoPE frequencies must come back right."""
    grid = torch.tensor([[2, 3, 2]])
    x = patches_for(grid)
    model.save_pretrained(tmp_path)
    loaded = LlavaViTPackingModel.from_pretrained(tmp_path).eval()
    for name in ("inv_freq_t", "inv_freq_h", "inv_freq_w"):
        assert torch.equal(getattr(loaded.rotary_emb, name), getattr(model.rotary_emb, name))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, grid).last_hidden_state, model(x, grid).last_hidden_state)


def test_packed_equals_each_image_alone(model):
    grids = [torch.tensor([[1, 3, 5]]), torch.tensor([[1, 4, 2]])]
    inputs = [patches_for(grid, seed=i) for i, grid in enumerate(grids)]
    with torch.no_grad():
        packed = model(torch.cat(inputs), torch.cat(grids))
        alone = [model(x, grid) for x, grid in zip(inputs, grids)]
    torch.testing.assert_close(
        packed.last_hidden_state, torch.cat([out.last_hidden_state for out in alone]), atol=1e-5, rtol=1e-5
    )
    assert packed.pooler_output.shape == (2, 64)
    torch.testing.assert_close(
        packed.pooler_output, torch.cat([out.pooler_output for out in alone]), atol=1e-5, rtol=1e-5
    )


def test_positions_from_grid_match_default(model):
    grid = torch.tensor([[1, 2, 3], [3, 2, 2], [1, 1, 4]])
    x = patches_for(grid)
    positions = compute_patch_positions_from_grid_thw(grid)
    assert positions.shape == (int(grid.prod(-1).sum()), 3)
    assert positions[6:10].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]  # video frame 0
    assert positions[10].tolist() == [1, 0, 0]  # video frame 1 starts
    with torch.no_grad():
        default = model(x, grid)
        explicit = model(x, grid, patch_positions=positions)
    assert torch.equal(default.last_hidden_state, explicit.last_hidden_state)
    assert torch.equal(default.pooler_output, explicit.pooler_output)


def test_video_is_one_segment(model):
    """All frames of a video attend to each other; the image packed beside it is untouched by the video."""
    grid = torch.tensor([[3, 2, 3], [1, 2, 2]])
    x = patches_for(grid)
    edited = x.clone()
    edited[6:12] += 1.0  # video frame 1
    with torch.no_grad():
        out = model(x, grid, output_hidden_states=True)
        out_edited = model(edited, grid)
    assert out.last_hidden_state.shape == (22, 64)
    assert out.pooler_output.shape == (2, 64)
    assert len(out.hidden_states) == 3  # input of each of the 2 layers + encoder output
    assert not torch.allclose(out.last_hidden_state[:6], out_edited.last_hidden_state[:6])  # frame 0 sees frame 1
    assert torch.equal(out.last_hidden_state[18:], out_edited.last_hidden_state[18:])


def test_interpolated_video_positions(model):
    indices = interpolate_frame_indices(torch.arange(8)[None], torch.tensor([8]), target_frames=64)
    assert indices.tolist() == [[0, 9, 18, 27, 36, 45, 54, 63]]
    assert interpolate_frame_indices(torch.tensor([[0]]), torch.tensor([1])).tolist() == [[0]]

    positions = compute_patch_positions_with_interpolated_temporal(indices[:, :3], 2, 3, device="cpu")
    assert positions.dtype == torch.long and positions.shape == (18, 3)
    assert positions[5].tolist() == [0, 1, 2] and positions[6].tolist() == [9, 0, 0]
    assert positions[17].tolist() == [18, 1, 2]

    grid = torch.tensor([[3, 2, 3]])
    x = patches_for(grid)
    with torch.no_grad():
        stretched = model(x, grid, patch_positions=positions).last_hidden_state
        default = model(x, grid).last_hidden_state
    assert torch.isfinite(stretched).all()
    assert not torch.allclose(stretched, default)


def test_return_tuple(model):
    grid = torch.tensor([[1, 2, 2]])
    last, pooled, hidden = model(patches_for(grid), grid, return_dict=False)
    assert last.shape == (4, 64) and pooled.shape == (1, 64) and hidden is None


def test_bad_inputs_raise(model):
    grid = torch.tensor([[1, 2, 2]])
    with pytest.raises(ValueError):
        model(patches_for(grid)[:3], grid)
    with pytest.raises(ValueError):
        model(patches_for(grid), grid, patch_positions=torch.zeros(3, 3, dtype=torch.long))
    # rows of the wrong width would be re-cut into another number of patches
    for width in (96, 24):
        with pytest.raises(ValueError, match=rf"hidden_states must be \[seq_len, 48\] .* got \(4, {width}\)"):
            model(torch.randn(4, width), grid)


def reference_adjacent_pair_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Channel 2i and 2i+1 form a pair; each output channel uses its own angle from `angles` (layout cat(f, f))."""
    out = torch.empty_like(x)
    for i in range(0, x.shape[-1], 2):
        even, odd = x[..., i], x[..., i + 1]
        out[..., i] = even * angles[:, None, i].cos() - odd * angles[:, None, i].sin()
        out[..., i + 1] = odd * angles[:, None, i + 1].cos() + even * angles[:, None, i + 1].sin()
    return out


def rotate_half_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """The common (Qwen2-VL style) rotation, which the LLaVA-ViT weights do NOT use."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return x * angles[:, None].cos() + rotated * angles[:, None].sin()


def test_rope_rotates_adjacent_pairs(model):
    grid = torch.tensor([[2, 3, 4]])
    angles = model.rotary_emb(grid)
    assert angles.shape == (24, 32)
    half = angles[:, :16]
    assert torch.equal(angles[:, 16:], half)  # cat(freqs, freqs)
    positions = compute_patch_positions_from_grid_thw(grid).float()
    inv = model.rotary_emb
    torch.testing.assert_close(half[:, :4], positions[:, :1] * inv.inv_freq_t)  # 4:6:6 over t:h:w
    torch.testing.assert_close(half[:, 4:10], positions[:, 1:2] * inv.inv_freq_h)
    torch.testing.assert_close(half[:, 10:], positions[:, 2:] * inv.inv_freq_w)
    torch.testing.assert_close(inv.inv_freq_h, 1.0 / 10000.0 ** (torch.arange(6) / 6))

    torch.manual_seed(0)
    q, k = torch.randn(2, 24, 2, 32).unbind(0)
    q_rot, k_rot = apply_rotary_pos_emb_vision(q, k, angles.cos(), angles.sin())
    torch.testing.assert_close(q_rot, reference_adjacent_pair_rope(q, angles))
    torch.testing.assert_close(k_rot, reference_adjacent_pair_rope(k, angles))
    assert not torch.allclose(q_rot, rotate_half_rope(q, angles), atol=1e-3)


@pytest.mark.parametrize(
    ("variant", "patch", "hidden", "heads", "layers"),
    [
        ("small", 16, 384, 6, 6),
        ("base", 16, 768, 12, 12),
        ("large", 14, 1024, 16, 24),
        ("huge", 14, 1280, 20, 32),
        ("giant", 14, 1536, 16, 40),
    ],
)
def test_variant_configs(variant, patch, hidden, heads, layers):
    for name in (variant, f"hf_llava_vit_packing_{variant}_ln"):
        config = llava_vit_packing_config(name)
        assert (config.patch_size, config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (
            patch,
            hidden,
            heads,
            layers,
        )
        assert config.intermediate_size == 4 * hidden
        assert config.layer_norm_eps == 1e-6 and config.layer_norm_type == "layer_norm" and config.use_head
        assert config.model_type == "llava_vit_packing"
        assert (config.hidden_size // config.num_attention_heads) % 32 == 0
    assert set(LLAVA_VIT_VARIANTS) == {"small", "base", "large", "huge", "giant"}
    assert llava_vit_packing_config(variant, num_hidden_layers=1).num_hidden_layers == 1


def test_unknown_variant():
    with pytest.raises(ValueError):
        llava_vit_packing_config("tiny")
