import math

import pytest
import torch

from msn.masking import apply_keep_indices, num_kept, sample_keep_indices


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
