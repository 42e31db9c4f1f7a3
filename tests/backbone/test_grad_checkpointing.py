"""``model.encoder.grad_checkpointing``: the project's own block loops (encode, packed views)
honour timm's flag, and the gradients are those of the plain forward."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from msn import backbone
from msn.backbone.vit import checkpointing, vit_problems
from msn.masking import num_kept, sample_keep_indices
from msn.module import MSNModule
from tests.helpers import TINY_ENCODER, composed, tiny_module

B = 3


def _vit(checkpoint: bool = False, **kw) -> VisionTransformer:
    torch.manual_seed(0)
    vit = backbone.build_vit(**{**TINY_ENCODER, **kw})
    # timm's own switch, not the build_vit keyword: the counting tests then show that the flag
    # reaches the project's block loops whichever way it was set.
    vit.set_grad_checkpointing(checkpoint)
    return vit


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 1, 16, 16, generator=g), torch.randn(2 * B, 1, 8, 8, generator=g)


def _loss(cls: torch.Tensor) -> torch.Tensor:
    return (cls * torch.linspace(-1, 1, cls.numel()).view_as(cls)).mean()


def _grads(vit: VisionTransformer, forward: Callable[[VisionTransformer], torch.Tensor]) -> list:
    """Gradients of every parameter (None for unused ones) of the loss of ``forward(vit)``."""
    loss = _loss(forward(vit))
    return torch.autograd.grad(loss, list(vit.parameters()), allow_unused=True)


def _assert_same_grads(plain: list, ckpt: list, vit: VisionTransformer) -> None:
    for name, g_plain, g_ckpt in zip([n for n, _ in vit.named_parameters()], plain, ckpt):
        if g_plain is None:
            assert g_ckpt is None, name
            continue
        torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-6, atol=1e-6, msg=name)


@contextmanager
def _block_runs(vit: VisionTransformer) -> Iterator[list[int]]:
    """Forward runs per block while inside: a pre-hook on each block's first LayerNorm (every path
    calls it, the packed segments included; a post-hook on the block would miss recomputations
    that torch's non-reentrant checkpoint stops early, once the last saved tensor is rebuilt)."""
    counts = [0] * len(vit.blocks)

    def hook(i: int) -> Callable:
        def count(*_: object) -> None:
            counts[i] += 1

        return count

    handles = [block.norm1.register_forward_pre_hook(hook(i)) for i, block in enumerate(vit.blocks)]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def _keep(mode: str | None) -> torch.Tensor | None:
    if mode is None:
        return None
    return sample_keep_indices(B, 16, num_kept(16, 0.3), mode, generator=torch.Generator().manual_seed(2))


ENCODE_CASES = ["unmasked", "shared", "per_sample"]


def _encode(vit: VisionTransformer, case: str) -> torch.Tensor:
    full, _ = _images()
    return backbone.encode(vit, full, keep_idx=_keep(None if case == "unmasked" else case))[1]


def _packed(attention: str) -> Callable[[VisionTransformer], torch.Tensor]:
    full, focal = _images()
    return lambda vit: backbone.encode_packed(vit, [(full, _keep("shared")), (focal, None)], B, attention)[1]


def test_flag_is_a_validated_build_vit_keyword():
    assert backbone.build_vit(**TINY_ENCODER).grad_checkpointing is False  # the official default
    assert backbone.build_vit(**TINY_ENCODER, grad_checkpointing=True).grad_checkpointing is True
    assert vit_problems() == []
    assert vit_problems(grad_checkpointing="yes") == ["grad_checkpointing='yes' must be true or false"]
    with pytest.raises(ValueError, match="grad_checkpointing=1 must be true or false"):
        backbone.build_vit(**TINY_ENCODER, grad_checkpointing=1)
    with pytest.raises(ValueError, match="model.encoder.grad_checkpointing"):
        tiny_module(encoder={**TINY_ENCODER, "grad_checkpointing": "on"})
    assert composed("train").model.encoder.grad_checkpointing is False
    assert tiny_module(encoder={**TINY_ENCODER, "grad_checkpointing": True}).encoder.grad_checkpointing


@pytest.mark.parametrize("case", ENCODE_CASES)
def test_encode_checkpointed_gradients_equal_plain(case):
    forward = lambda v: _encode(v, case)  # noqa: E731
    plain, ckpt = _vit(False), _vit(True)
    _assert_same_grads(_grads(plain, forward), _grads(ckpt, forward), plain)


def test_checkpointed_stochastic_depth_replays_the_same_drops():
    # The recomputation restores the RNG state, so drop_path draws the masks of the first pass.
    grads = []
    for flag in (False, True):
        vit = _vit(flag, drop_path_rate=0.5)
        torch.manual_seed(7)
        grads.append(_grads(vit, lambda v: _encode(v, "shared")))
    _assert_same_grads(*grads, vit)


@pytest.mark.parametrize("attention", ["segments", "mask"])
def test_packed_checkpointed_gradients_equal_plain(attention):
    forward = _packed(attention)
    plain, ckpt = _vit(False), _vit(True)
    _assert_same_grads(_grads(plain, forward), _grads(ckpt, forward), plain)


@pytest.mark.parametrize(
    "forward",
    [lambda v: _encode(v, "unmasked"), lambda v: _encode(v, "shared"), _packed("segments"), _packed("mask")],
    ids=["encode", "encode-masked", "packed-segments", "packed-mask"],
)
def test_checkpointing_recomputes_every_block_in_backward(forward):
    """With the flag each block runs twice per step (forward, then again in backward); a loop that
    ignored timm's flag (the project's code before it honoured it) runs them once."""
    for flag, runs in ((False, 1), (True, 2)):
        vit = _vit(flag)
        with _block_runs(vit) as counts:
            _loss(forward(vit)).backward()
        assert counts == [runs] * len(vit.blocks), f"grad_checkpointing={flag}"


def test_no_recomputation_without_grad_or_in_eval():
    vit = _vit(True)
    assert checkpointing(vit)
    with torch.no_grad(), _block_runs(vit) as counts:
        _encode(vit, "shared")
    assert counts == [1] * len(vit.blocks) and not checkpointing(vit.eval())
    with _block_runs(vit) as counts:
        _loss(_encode(vit, "shared")).backward()  # eval mode: plain forward, grads still flow
    assert counts == [1] * len(vit.blocks)


@pytest.mark.parametrize("packed_views", [False, True])
def test_module_step_checkpoints_the_anchor_encoder_only(packed_views):
    """MSNModule with ``encoder.grad_checkpointing``: same anchor projections and gradients; the
    anchor blocks run twice, the no-grad target encoder once."""
    g = torch.Generator().manual_seed(2)
    views = [torch.randn(B, 1, s, s, generator=g) for s in (16, 16, 8, 8)]
    outs = []
    for flag in (False, True):
        model: MSNModule = tiny_module(
            encoder={**TINY_ENCODER, "grad_checkpointing": flag}, packed_views=packed_views
        )
        with _block_runs(model.target_encoder) as target_runs:
            model.target_projections(views[0])
        with _block_runs(model.encoder) as anchor_runs:
            z = model.anchor_projections(views[1:])
            grads = torch.autograd.grad(_loss(z), list(model.encoder.parameters()), allow_unused=True)
        groups = 1 if packed_views else 2  # one encoder call per crop size unless packed
        assert target_runs == [1] * len(model.encoder.blocks)
        assert anchor_runs == [groups * (1 + flag)] * len(model.encoder.blocks)
        outs.append((z, grads, model.encoder))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-6, atol=1e-6)
    _assert_same_grads(outs[0][1], outs[1][1], outs[0][2])
