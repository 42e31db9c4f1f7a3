"""Tiny checkpoints of every format, built locally with random weights (no hub access)."""

from __future__ import annotations

from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from msn.backbone import embed_tokens, forward_tokens
from msn.head import ProjectionHead
from msn.module import MSNModule
from tests.helpers import tiny_module

# A 2-block, 96-wide ViT on 16 px grey images, patch 4: fast, and every key kind is present.
ENCODER = {"arch": "vit_nano", "patch_size": 4, "img_size": 16, "in_chans": 1, "depth": 2}
HEAD = {"hidden_dim": 32, "out_dim": 16}
NUM_PROTOTYPES = 8


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (HF zero-initialises cls token and positions; LayerNorms start at 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 if p.ndim == 1 and name.endswith("weight") else 0.0  # norm scales near 1
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + scale)
    return module


def msn_module(seed: int = 0) -> MSNModule:
    """An MSNModule whose anchor and target networks differ (so loading the wrong one shows)."""
    model = tiny_module(
        seed=seed,
        encoder=ENCODER,
        head=HEAD,
        num_prototypes=NUM_PROTOTYPES,
        loss={"temperature": 0.1},
        optim={"ref_lr": 1e-3},
    )
    randomize_(model.target_encoder, seed + 1)
    randomize_(model.target_head, seed + 2)
    return model.eval()


def save_lightning(model: MSNModule, path: Path) -> Path:
    """What train.py writes, minus optimizer and loop state."""
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "epoch": 3}, path)
    return path


def timm_vit(seed: int = 0, img_size: int = 16, num_classes: int = 0) -> VisionTransformer:
    """A timm ViT of the same shape as :data:`ENCODER`, built with timm's own constructor."""
    torch.manual_seed(seed)
    vit = VisionTransformer(
        img_size=img_size,
        patch_size=4,
        in_chans=1,
        num_classes=num_classes,
        embed_dim=96,
        depth=2,
        num_heads=3,
        qkv_bias=True,
    )
    return randomize_(vit, seed).eval()


def official_dict(
    target: VisionTransformer,
    anchor: VisionTransformer | None = None,
    *,
    prefix: str = "module.",
    with_head: bool = True,
    with_prototypes: bool = True,
) -> dict:
    """An official .pth.tar dict: ``module.``-prefixed encoder keys (fused ``attn.qkv``, the
    official names), the projection head inside as ``fc.*``, prototypes and bookkeeping."""

    def encoder_state(vit: VisionTransformer, seed: int) -> dict:
        state = {f"{prefix}{k}": v.clone() for k, v in vit.state_dict().items()}
        if with_head:
            torch.manual_seed(seed)
            head = ProjectionHead(96, **HEAD)
            state.update({f"{prefix}fc.{k}": v for k, v in head.state_dict().items()})
        return state

    out = {"target_encoder": encoder_state(target, 10), "epoch": 7, "lr": 1e-3, "temperature": 0.1}
    if anchor is not None:
        out["encoder"] = encoder_state(anchor, 11)
        out["opt"] = {"state": {}, "param_groups": []}
    if with_prototypes:
        out["prototypes"] = torch.randn(NUM_PROTOTYPES, HEAD["out_dim"])
    return out


def hidden_states(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """All tokens after the final norm (B, 1 + N, D): HF's ``last_hidden_state``."""
    with torch.no_grad():
        return vit.norm(forward_tokens(vit, embed_tokens(vit, images)))


def finetuned_checkpoint(path: Path, seed: int = 0, num_classes: int = 3) -> tuple[Path, object]:
    """What ``finetune.py mode=finetune`` writes (weights and hyper-parameters), random weights."""
    from msn.eval.finetune import FineTuneModule

    torch.manual_seed(seed)
    labels = {i: f"class_{i}" for i in range(num_classes)}
    model = FineTuneModule(encoder=ENCODER, num_classes=num_classes, id2label=labels, mean=[0.5], std=[0.5])
    randomize_(model.vit, seed)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path, model.eval()
