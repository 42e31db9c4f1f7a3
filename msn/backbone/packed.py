"""Packed forward: several views of different sizes in one pass of the blocks.

Every view keeps attending only to itself, so the class tokens equal those of separate forwards;
what is saved is the per-call overhead of running the blocks once per crop size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from msn.backbone.vit import checkpointing, embed_tokens, run_block
from msn.masking import apply_keep_indices


def block_diagonal_mask(lengths: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """Boolean attention mask (L, L), ``L = sum(lengths)``: True where query and key share a block.

    Token ``i`` of a packed sequence may attend to token ``j`` only inside its own view, so each
    view is encoded exactly as on its own (``F.scaled_dot_product_attention`` convention: True =
    take part in attention).
    """
    ids = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.tensor(list(lengths), device=device)
    )
    return ids.unsqueeze(0) == ids.unsqueeze(1)


PACKED_ATTENTION = ("segments", "mask")


def _segmented_attention(attn: nn.Module, x: Tensor, segments: Sequence[tuple[int, int, int]]) -> Tensor:
    """timm ``Attention`` on a token matrix (N, D) in which every view attends only to itself.

    qkv and the output projection run once over all N tokens; the attention runs once per
    segment ``(start, sequences, tokens)``: rows ``start ..`` hold ``sequences`` views of
    ``tokens`` tokens each, one after the other, so a view of the qkv rows is the batch
    (sequences, tokens) without a copy. Exactly the pairs of the separate forwards are computed.
    """
    qkv = attn.qkv(x)  # (N, 3 * heads * head_dim)
    dropout = attn.attn_drop.p if attn.training else 0.0
    outputs = []
    for start, sequences, tokens in segments:
        part = qkv[start : start + sequences * tokens].view(
            sequences, tokens, 3, attn.num_heads, attn.head_dim
        )
        q, k, v = part.permute(2, 0, 3, 1, 4).unbind(0)  # (sequences, heads, tokens, head_dim)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        outputs.append(out.transpose(1, 2).reshape(sequences * tokens, attn.attn_dim))
    return attn.proj_drop(attn.proj(attn.norm(torch.cat(outputs))))


def _segmented_block(block: Block, x: Tensor, segments: Sequence[tuple[int, int, int]]) -> Tensor:
    """timm ``Block.forward`` on a token matrix, with :func:`_segmented_attention`."""
    x = x + block.ls1(_segmented_attention(block.attn, block.norm1(x), segments))
    return x + block.ls2(block.mlp(block.norm2(x)))


def encode_packed(
    vit: VisionTransformer,
    groups: Sequence[tuple[Tensor, Tensor | None]],
    batch_size: int,
    attention: str = "segments",
) -> tuple[Tensor, Tensor]:
    """All anchor views (every crop size) in ONE transformer pass: the packed multi-crop forward.

    The separate forward (:func:`encode` once per crop size) runs the blocks once per group of
    views. Here the (masked) tokens of all views are concatenated, so every block runs its
    LayerNorms, qkv, output projection and MLP once, on bigger matrices, whatever the number of
    crop sizes. Attention stays inside each view:

    - ``attention="segments"`` (default): the tokens form one matrix (sum of V*B*T over the
      groups, D), views one after the other; attention runs per crop size on (V*B, T): exactly
      the pairs of the separate forwards, no wasted work, no padding.
    - ``attention="mask"``: the views of each image form one sequence (B, L, D) and timm's own
      ``Block.forward`` runs with a block-diagonal ``attn_mask`` (:func:`block_diagonal_mask`):
      one attention call per block, but dense kernels also compute the masked-out pairs (L^2
      instead of the sum of T^2).

    Both equal the separate forwards up to floating-point rounding. Stochastic depth is per
    sequence, which packing changes, so ``drop_path_rate`` must be 0 (the official value).

    Args:
        vit: the encoder.
        groups: ``(images, keep_idx)`` per crop size: ``images`` (V*B, C, H, W), V views of the same
            B images, view-major (as ``torch.cat`` of the per-view batches); ``keep_idx`` None
            (no masking), (K,) or (V*B, K) as in :func:`encode`.
        batch_size: B, images per view.
        attention: ``segments`` or ``mask``.

    Returns:
        ``(cls_prenorm, cls)``, each (sum of V*B over the groups, D): the class tokens in group
        order, view-major inside a group, i.e. the concatenation of the :func:`encode` outputs.
    """
    if not groups:
        raise ValueError("encode_packed needs at least one group of views")
    if attention not in PACKED_ATTENTION:
        raise ValueError(f"attention={attention!r} is unknown; allowed: {', '.join(PACKED_ATTENTION)}")
    for block in vit.blocks:
        if type(block) is not Block or getattr(block.attn, "gate", None) is not None:
            raise ValueError(
                f"encode_packed supports timm's plain ViT Block only, not {type(block).__name__}"
            )
        if not isinstance(block.drop_path1, nn.Identity) and vit.training:
            raise ValueError("packed views need drop_path_rate=0 (stochastic depth is per sequence)")
    tokens = []  # per group: (V*B, T, D), view-major
    for images, keep_idx in groups:
        if images.shape[0] % batch_size:
            raise ValueError(
                f"a group of {images.shape[0]} images is not a whole number of views of {batch_size} images"
            )
        x = embed_tokens(vit, images)
        tokens.append(x if keep_idx is None else apply_keep_indices(x, keep_idx.to(x.device)))
    if attention == "mask":
        cls_prenorm = _packed_masked_blocks(vit, tokens, batch_size)
    else:
        segments, cls_rows, start = [], [], 0
        for x in tokens:
            segments.append((start, x.shape[0], x.shape[1]))
            cls_rows.append(torch.arange(x.shape[0], device=x.device) * x.shape[1] + start)
            start += x.shape[0] * x.shape[1]
        x = vit.norm_pre(torch.cat([x.flatten(0, 1) for x in tokens]))
        ckpt = checkpointing(vit)  # the blocks are run here, not by timm: apply its flag ourselves
        for block in vit.blocks:
            x = run_block(_segmented_block, block, x, segments, checkpoint=ckpt)
        cls_prenorm = x[torch.cat(cls_rows)]
    return cls_prenorm, vit.norm(cls_prenorm)


def _packed_masked_blocks(vit: VisionTransformer, tokens: Sequence[Tensor], batch_size: int) -> Tensor:
    """``attention="mask"`` of :func:`encode_packed`: one sequence per image, block-diagonal mask.

    ``tokens``: per group (V*B, T, D) view-major. Returns the class tokens (sum of V*B, D) before
    the final norm, in the order of ``tokens``.
    """
    per_image, lengths, cls_pos, start = [], [], [], 0
    for x in tokens:
        views, length = x.shape[0] // batch_size, x.shape[1]
        # (V*B, T, D) -> (B, V*T, D): the V views of image i side by side in one sequence.
        per_image.append(x.unflatten(0, (views, batch_size)).transpose(0, 1).flatten(1, 2))
        lengths += [length] * views
        cls_pos += [start + v * length for v in range(views)]
        start += views * length
    x = vit.norm_pre(torch.cat(per_image, dim=1))
    mask = block_diagonal_mask(lengths, x.device)
    ckpt = checkpointing(vit)
    for block in vit.blocks:
        x = run_block(block, x, attn_mask=mask, checkpoint=ckpt)
    # Class tokens (B, total views, D) -> view-major (total views * B, D).
    return x[:, cls_pos].transpose(0, 1).flatten(0, 1)
