import math

import pytest
import torch

from msn.masking import (
    MASK_MODES,
    apply_keep_indices,
    keep_indices,
    mask_generator,
    mask_problems,
    num_kept,
    sample_keep_indices,
    seeded_keep_indices,
)


@pytest.mark.parametrize("n", [4, 9, 16, 49, 196])
@pytest.mark.parametrize("ratio", [0.0, 0.15, 0.3, 0.5, 0.7])
def test_num_kept_is_floor_of_kept_fraction(n, ratio):
    assert num_kept(n, ratio) == max(1, math.floor(n * (1 - ratio)))


def test_num_kept_official_values():
    # ViT-S/16 at 224: 196 patches; the official recipe keeps 166 (0.15), 137 (0.3), 58 (0.7).
    assert [num_kept(196, r) for r in (0.15, 0.3, 0.7)] == [166, 137, 58]


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_num_kept_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        num_kept(16, ratio)


def test_shared_indices_are_one_sorted_subset():
    g = torch.Generator().manual_seed(0)
    idx = sample_keep_indices(8, 16, 10, "shared", generator=g)
    assert idx.shape == (10,)
    assert torch.equal(idx, idx.sort().values)
    assert len(set(idx.tolist())) == 10 and idx.min() >= 0 and idx.max() < 16


def test_per_sample_indices_differ_between_images():
    g = torch.Generator().manual_seed(0)
    idx = sample_keep_indices(32, 16, 8, "per_sample", generator=g)
    assert idx.shape == (32, 8)
    for row in idx:
        assert len(set(row.tolist())) == 8
        assert torch.equal(row, row.sort().values)
    assert len({tuple(r.tolist()) for r in idx}) > 1


def test_unknown_mode():
    with pytest.raises(ValueError, match="per_sample"):
        sample_keep_indices(2, 4, 2, "blockwise")


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_apply_keeps_class_token_and_selected_patches(mode):
    b, n, d = 3, 9, 5
    tokens = torch.randn(b, 1 + n, d)
    idx = sample_keep_indices(b, n, 4, mode, generator=torch.Generator().manual_seed(1))
    out = apply_keep_indices(tokens, idx)
    assert out.shape == (b, 5, d)
    assert torch.equal(out[:, 0], tokens[:, 0])
    for i in range(b):
        rows = idx if idx.dim() == 1 else idx[i]
        # brute force: pick each kept patch by hand (patch j is token j + 1)
        expected = torch.stack([tokens[i, 1 + j] for j in rows.tolist()])
        assert torch.equal(out[i, 1:], expected)


def test_mask_problems_name_the_model_keys():
    assert mask_problems(0.3, "shared") == [] and MASK_MODES == ("shared", "per_sample")
    assert mask_problems(1.0, "blocks") == [
        "mask_ratio=1.0 must be a number in [0, 1)",
        "mask_mode='blocks' is unknown; allowed: shared, per_sample",
    ]
    with pytest.raises(ValueError, match="mask_mode='blocks'"):
        mask_generator(0, "blocks", (1,))


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_global_and_seeded_draws_are_one_sampler_fed_by_another_generator(mode):
    # Seeded: the sampler of the global-state draw, fed by the generator of (seed, mode, key).
    seeded = seeded_keep_indices(7, (3, 0, 1), 2, 4, 16, 9, mode)
    assert torch.equal(seeded, keep_indices(mode, 16, 9, 2, 4, generator=mask_generator(7, mode, (3, 0, 1))))
    # Global state: V views of B images draw what one view of V*B images draws, call for call.
    torch.manual_seed(5)
    grouped = keep_indices(mode, 16, 9, views=2, batch_size=4)
    torch.manual_seed(5)
    assert torch.equal(grouped, sample_keep_indices(8, 16, 9, mode))
    assert grouped.shape == ((9,) if mode == "shared" else (8, 9))


def test_per_sample_ranks_slice_the_draw_of_the_global_batch():
    whole = keep_indices("per_sample", 9, 5, 2, 6, generator=torch.Generator().manual_seed(1)).view(2, 6, 5)
    for rank in range(3):
        local = keep_indices("per_sample", 9, 5, 2, 2, rank, 3, generator=torch.Generator().manual_seed(1))
        assert torch.equal(local.view(2, 2, 5), whole[:, rank::3])
    with pytest.raises(ValueError, match=r"rank=3 must be in \[0, 3\)"):
        keep_indices("per_sample", 9, 5, rank=3, world_size=3)
