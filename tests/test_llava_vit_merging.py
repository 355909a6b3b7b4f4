"""ViT-stage merging inside the LLaVA-ViT packing encoder. (Off, r=0, remove, copies and bad settings:
`test_contract.py`.)"""

import pytest
import torch

import illava
from illava.models.llava_vit import compute_patch_positions_from_grid_thw

from .test_llava_vit_model import patches_for, random_model, tiny_config

VIT = dict(enable_illava_vit=True, illava_vit_k="1-2", illava_vit_r=5)


@pytest.fixture(scope="module")
def encoder():
    return random_model(tiny_config(num_hidden_layers=4, use_head=True))


def test_counts_isolation_and_pooling_on_survivors(encoder):
    grid = torch.tensor([[1, 4, 6], [3, 4, 4]])  # an image (24 patches) and a 3-frame video (48): one segment each
    patches = patches_for(grid)
    with torch.no_grad(), illava.applied(encoder, illava_track_vit_source=True, **VIT):
        packed = encoder(patches, grid)
        image, video = illava.last_trace(encoder).vision
        alone = [encoder(patches[:24], grid[:1]), encoder(patches[24:], grid[1:])]
        changed = patches.clone()
        changed[24:] = torch.randn_like(changed[24:])
        with_other_video = encoder(changed, grid)
    assert image.tokens_per_group == [24, 19, 14] and video.tokens_per_group == [48, 43, 38]
    assert packed.last_hidden_state.shape[0] == 14 + 38
    # packing equals running each segment alone, and segment B never moves segment A
    torch.testing.assert_close(packed.last_hidden_state[:14], alone[0].last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.last_hidden_state[14:], alone[1].last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.pooler_output, torch.cat([a.pooler_output for a in alone]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_other_video.last_hidden_state[:14], packed.last_hidden_state[:14], rtol=0, atol=1e-6)
    # the head pooled each segment's survivors (the final layer norm applied), nothing else
    manual = encoder.head(packed.last_hidden_state[:14][None])
    torch.testing.assert_close(packed.pooler_output[:1], manual, rtol=1e-5, atol=1e-5)
    # sources: every survivor stands for its own patch, and patches of the video map inside the video
    assert image.positions.shape == (1, 14) and int(video.positions.max()) < 48
    assert torch.equal(image.sources[0, image.positions[0]], torch.arange(14))


def test_patch_positions_give_the_same_merge_as_grid(encoder):
    grid = torch.tensor([[2, 4, 4]])
    patches = patches_for(grid, seed=5)
    with torch.no_grad(), illava.applied(encoder, **VIT):
        by_grid = encoder(patches, grid)
        kept_by_grid = illava.last_trace(encoder).vision[0].positions
        by_positions = encoder(patches, grid, patch_positions=compute_patch_positions_from_grid_thw(grid))
        kept_by_positions = illava.last_trace(encoder).vision[0].positions
    assert torch.equal(kept_by_grid, kept_by_positions)
    torch.testing.assert_close(by_grid.last_hidden_state, by_positions.last_hidden_state)


def test_r_leaving_nothing_is_named(encoder):
    grid = torch.tensor([[1, 2, 3]])
    with illava.applied(encoder, enable_illava_vit=True, illava_vit_k="1", illava_vit_r=6):
        with pytest.raises(ValueError, match=r"illava_vit_r=6 leaves no token in segment 0 \(t, h, w = 1, 2, 3\)"):
            encoder(patches_for(grid), grid)


@pytest.mark.parametrize("track", [False, True], ids=["untracked", "tracked"])
def test_rows_without_patches_add_nothing_and_move_nothing(encoder, track):
    """A row with t or h 0 (an empty image, which the unpatched model takes) is left out of merging: the other
    rows merge as without it, and the model's own output for it (no token, a pooled row of nothing) is kept."""
    grid = torch.tensor([[1, 4, 6], [3, 4, 4]])
    with_empty = torch.tensor([[0, 4, 4], [1, 4, 6], [1, 0, 5], [3, 4, 4]])
    patches = patches_for(grid)
    with torch.no_grad():
        unpatched = encoder(patches, with_empty)
        with illava.applied(encoder, illava_track_vit_source=track, **VIT):
            expected = encoder(patches, grid)
            expected_trace = illava.last_trace(encoder).vision
            merged = encoder(patches, with_empty)
            trace = illava.last_trace(encoder).vision
    assert merged.last_hidden_state.shape[0] == 14 + 38
    torch.testing.assert_close(merged.last_hidden_state, expected.last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged.pooler_output[[1, 3]], expected.pooler_output, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged.pooler_output[[0, 2]], unpatched.pooler_output[[0, 2]], rtol=0, atol=1e-6)
    assert len(trace) == 4  # one entry per grid_thw row
    for empty, grid_of_row in ((trace[0], (0, 4)), (trace[2], (0, 5))):
        assert empty.tokens_per_group == [0, 0, 0] and empty.grid == grid_of_row
        assert empty.positions.shape == (1, 0)
        assert (empty.sources is None) != track and all(step.numel() == 0 for step in empty.source_history)
    for entry, reference in zip((trace[1], trace[3]), expected_trace):
        assert entry.tokens_per_group == reference.tokens_per_group and entry.grid == reference.grid
        assert torch.equal(entry.positions, reference.positions)
        if track:
            assert torch.equal(entry.sources, reference.sources)


def test_unpatched_rows_without_patches_add_no_tokens(encoder):
    grid = torch.tensor([[1, 4, 6], [3, 4, 4]])
    patches = patches_for(grid)
    with torch.no_grad():
        plain = encoder(patches, grid)
        with_empty = encoder(patches, torch.tensor([[0, 4, 4], [1, 4, 6], [1, 0, 5], [3, 4, 4]]))
        nothing_pooled = encoder.head(patches.new_zeros(1, 0, 64))
    torch.testing.assert_close(with_empty.last_hidden_state, plain.last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(with_empty.pooler_output[[1, 3]], plain.pooler_output, rtol=0, atol=1e-6)
    torch.testing.assert_close(with_empty.pooler_output[[0, 2]], nothing_pooled.expand(2, -1), rtol=0, atol=1e-6)


def test_r_leaving_nothing_names_the_grid_row_after_an_empty_row(encoder):
    grid = torch.tensor([[0, 4, 4], [1, 2, 3]])
    with illava.applied(encoder, enable_illava_vit=True, illava_vit_k="1", illava_vit_r=6):
        with pytest.raises(ValueError, match=r"illava_vit_r=6 leaves no token in segment 1 \(t, h, w = 1, 2, 3\)"):
            encoder(patches_for(grid), grid)


def test_small_integer_grid_merges_as_a_long_one(encoder):
    """t*h = 300 does not fit uint8: the grid is widened before any product is taken."""
    grid = torch.tensor([[3, 100, 1]])
    patches = patches_for(grid)
    with torch.no_grad(), illava.applied(encoder, **VIT):
        wide = encoder(patches, grid)
        wide_trace = illava.last_trace(encoder).vision[0]
        narrow = encoder(patches, grid.to(torch.uint8))
        narrow_trace = illava.last_trace(encoder).vision[0]
    assert narrow_trace.grid == wide_trace.grid == (300, 1)
    assert torch.equal(narrow_trace.positions, wide_trace.positions)
    assert torch.equal(narrow.last_hidden_state, wide.last_hidden_state)
