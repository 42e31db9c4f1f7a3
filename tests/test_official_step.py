"""The whole MSN iteration equals an independent float64 reference of the official one.

The reference below is written from the official recipe in plain PyTorch and calls none of
``msn``'s forward, loss, schedule or EMA code: a functional ViT (patch convolution, class token,
bicubic position table for the focal grid, patch dropping after the position embedding, pre-norm
blocks), the projection head once per crop size (train-mode BatchNorm with its running
statistics), the loss (sharpening, 3 Sinkhorn iterations, cross-entropy, ME-MAX and entropy),
gradients, clipping at 3.0 over encoder + head, AdamW with the official groups and per-step
lr / wd, prototype gradients summed over ranks, and the EMA of the target after the step.

Against it, :class:`msn.module.MSNModule` is trained by a real Lightning ``Trainer`` in float64
for 3 steps from the same weights, views and masks (the masks are recorded as the module draws
them and handed to the reference as inputs). Every loss part of every step, every parameter
(encoder, head, prototypes, target encoder and head) and every BatchNorm statistic must agree to
1e-9 relative.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from msn.module import MSNModule

B, STEPS, WORLD = 4, 3, 2
IMG, FOCAL, PATCH = 16, 8, 4
EPS_LN, EPS_BN, BN_MOMENTUM = 1e-6, 1e-5, 0.1
# The official values, except a warmup short enough that the 3 steps see warmup and cosine.
TAU, SHARPEN, MEMAX_W, SINKHORN_ITERS, CLIP = 0.1, 0.25, 1.0, 3, 3.0
START_LR, REF_LR, FINAL_LR, WARMUP_EPOCHS = 2e-4, 1e-3, 1e-6, 0.67
REF_WD, FINAL_WD, EMA, SCALE = 0.04, 0.4, (0.996, 1.0), 1.25
BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
ENTROPY_W = 0.5  # official 0.0; on here so that the term is checked too
RTOL = 1e-9  # of each tensor's largest entry
# A shift right before BatchNorm cancels, so these get no gradient in exact arithmetic and stay
# 0; Adam turns the float64 rounding of their gradients into changes near 1e-11, on both sides.
SHIFTS_BEFORE_BN = ("encoder.norm.bias", "head.fc1.bias", "head.fc2.bias")


class Views(Dataset):
    """Fixed views of image ``i`` (its label is ``i``): target, ``rand`` anchors, ``focal`` crops."""

    def __init__(self, n: int, rand: int, focal: int) -> None:
        self.n, self.sizes = n, [IMG] * (1 + rand) + [FOCAL] * focal

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[list[Tensor], int]:
        g = torch.Generator().manual_seed(100 + i)
        # Scaled so that the first gradient norm is well above the clipping threshold.
        return [3.0 * torch.randn(1, s, s, generator=g, dtype=torch.float64) for s in self.sizes], i


class Recording(MSNModule):
    """Records per step the loss parts, image indices, masks and gradient norm (``out`` file)."""

    out: str = ""

    def on_fit_start(self) -> None:
        self.rec: dict[str, list] = {"loss": [], "index": [], "keep": [], "grad_norm": []}
        self.criterion.register_forward_hook(lambda m, i, o: self.rec["loss"].append(o))

    def training_step(self, batch, batch_idx):
        self.rec["index"].append(batch[1].clone())
        self.rec["keep"].append([])
        return super().training_step(batch, batch_idx)

    def _keep_indices(self, group, images, mask_ratio, batch_size):
        keep = super()._keep_indices(group, images, mask_ratio, batch_size)
        self.rec["keep"][-1].append(None if keep is None else keep.clone())
        return keep

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in [*self.encoder.parameters(), *self.head.parameters()]]
        self.rec["grad_norm"].append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    def on_train_end(self) -> None:
        parts = [
            {k: getattr(o, k).item() for k in ("loss", "ce", "me_max", "entropy")} for o in self.rec["loss"]
        ]
        torch.save(
            {**self.rec, "loss": parts, "state": copy.deepcopy(self.state_dict())},
            self.out.format(rank=self.global_rank),
        )


def _module(rand_views: int, **kw) -> Recording:
    torch.manual_seed(0)
    return Recording(
        encoder={"arch": "vit_nano", "patch_size": PATCH, "img_size": IMG, "in_chans": 1},
        head={"hidden_dim": 32, "out_dim": 16},
        num_prototypes=10,
        loss={
            "temperature": TAU,
            "me_max_weight": MEMAX_W,
            "entropy_weight": ENTROPY_W,
            "sinkhorn_iterations": SINKHORN_ITERS,
        },
        mask_ratio=0.3,
        rand_views=rand_views,
        ema=EMA,
        sharpen=(SHARPEN, SHARPEN),
        optim={"warmup_epochs": WARMUP_EPOCHS},
        **kw,
    )


def _float64(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.double() if v.is_floating_point() else v.clone() for k, v in state.items()}


def _train(model: Recording, data: Views, out: Path, accelerator: str = "cpu", **trainer_kw) -> list[dict]:
    """3 steps (one epoch of 3 batches per rank) with Lightning in float64; one record per rank."""
    model.out = str(out / "rank{rank}.pt")
    L.Trainer(
        max_epochs=1,
        accelerator=accelerator,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kw,
    ).fit(model, DataLoader(data, batch_size=B, shuffle=False))
    world = trainer_kw.get("devices", 1)
    return [torch.load(out / f"rank{r}.pt", weights_only=False, map_location="cpu") for r in range(world)]


# ---------------------------------------------------------------------------------------------
# The reference: the official iteration, functional, float64
# ---------------------------------------------------------------------------------------------
def ref_encoder(P: dict[str, Tensor], x: Tensor, keep: Tensor | None) -> Tensor:
    """Class token after the final LayerNorm of the official ViT, patches dropped after pos-embed."""
    t = F.conv2d(x, P["patch_embed.proj.weight"], P["patch_embed.proj.bias"], stride=PATCH)
    n, d, gh, gw = t.shape
    t = t.flatten(2).transpose(1, 2)
    pos = P["pos_embed"]
    n0 = pos.shape[1] - 1
    if gh * gw != n0:  # the official focal-crop resampling: bicubic by scale factor
        g0 = int(math.sqrt(n0))
        grid = pos[:, 1:].reshape(1, g0, g0, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=math.sqrt(gh * gw / n0), mode="bicubic")
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)
    t = torch.cat([P["cls_token"].expand(n, -1, -1), t], dim=1) + pos
    if keep is not None:
        t = t[:, torch.cat([torch.zeros(1, dtype=torch.long), 1 + keep])]
    depth = 1 + max(int(k.split(".")[1]) for k in P if k.startswith("blocks."))
    heads = 3  # vit_nano
    for i in range(depth):
        b = {k[len(f"blocks.{i}.") :]: v for k, v in P.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(t, (d,), b["norm1.weight"], b["norm1.bias"], EPS_LN)
        qkv = (h @ b["attn.qkv.weight"].T + b["attn.qkv.bias"]).reshape(n, -1, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (d // heads) ** -0.5, dim=-1)
        a = (attn @ v).transpose(1, 2).reshape(n, -1, d)
        t = t + a @ b["attn.proj.weight"].T + b["attn.proj.bias"]
        h = F.layer_norm(t, (d,), b["norm2.weight"], b["norm2.bias"], EPS_LN)
        h = F.gelu(h @ b["mlp.fc1.weight"].T + b["mlp.fc1.bias"])
        t = t + h @ b["mlp.fc2.weight"].T + b["mlp.fc2.bias"]
    return F.layer_norm(t[:, 0], (d,), P["norm.weight"], P["norm.bias"], EPS_LN)


def ref_head(P: dict[str, Tensor], stats: dict[str, Tensor], x: Tensor) -> Tensor:
    """Linear-BN-GELU-Linear-BN-GELU-Linear; train-mode BN, running statistics updated in ``stats``."""
    for i in (1, 2):
        x = x @ P[f"fc{i}.weight"].T + P[f"fc{i}.bias"]
        mean, var = x.mean(0), x.var(0, unbiased=False)
        x = (x - mean) / torch.sqrt(var + EPS_BN) * P[f"bn{i}.weight"] + P[f"bn{i}.bias"]
        with torch.no_grad():
            m = stats[f"bn{i}.running_mean"]
            m.copy_((1 - BN_MOMENTUM) * m + BN_MOMENTUM * mean)
            rv = stats[f"bn{i}.running_var"]
            rv.copy_((1 - BN_MOMENTUM) * rv + BN_MOMENTUM * var * x.shape[0] / (x.shape[0] - 1))
            stats[f"bn{i}.num_batches_tracked"] += 1
        x = F.gelu(x)
    return x @ P["fc3.weight"].T + P["fc3.bias"]


def ref_loss(z_a: Tensor, z_t: Tensor, protos: Tensor, views: int) -> dict[str, Tensor]:
    """CE to sharpened, Sinkhorn-balanced targets + ME-MAX + entropy, over the global batch."""
    q = F.normalize(protos, dim=1)
    p_a = torch.softmax(F.normalize(z_a, dim=1) @ q.T / TAU, dim=1)
    with torch.no_grad():
        p_t = torch.softmax(F.normalize(z_t, dim=1) @ q.T / TAU, dim=1)
        t = p_t ** (1 / SHARPEN)
        t = t / t.sum(1, keepdim=True)
        Q = t.T / t.sum()  # Sinkhorn-Knopp as the official distributed_sinkhorn
        k, n = Q.shape
        for _ in range(SINKHORN_ITERS):
            Q = Q / Q.sum(1, keepdim=True) / k
            Q = Q / Q.sum(0, keepdim=True) / n
        t = (Q * n).T.repeat(views, 1)
    ce = torch.mean(torch.sum(-t * torch.log(p_a), dim=1))
    pbar = p_a.mean(0)
    me_max = torch.sum(pbar * torch.log(pbar)) + math.log(len(pbar))
    entropy = torch.mean(torch.sum(-p_a * torch.log(p_a), dim=1))
    return {
        "loss": ce + MEMAX_W * me_max + ENTROPY_W * entropy,
        "ce": ce,
        "me_max": me_max,
        "entropy": entropy,
    }


def ref_group(
    P: dict[str, Tensor],
    per_rank: list[list[list[Tensor]]],
    views: list[int],
    masks: list[list[Tensor | None]] | None = None,
    group: int = 0,
) -> Tensor:
    """Class tokens of one crop-size group of views over the global batch, view-major.

    Each rank encodes its own images (``per_rank[r]``: per image its views) with its own mask
    (``masks[r][group]``); the rows are ordered view by view, rank by rank, as the targets.
    """
    out = []
    for r, images in enumerate(per_rank):
        x = torch.cat([torch.stack([views_of[v] for views_of in images]) for v in views])
        keep = None if masks is None else masks[r][group]
        out.append(ref_encoder(P, x, keep).view(len(views), len(images), -1))
    return torch.cat([o[j] for j in range(len(views)) for o in out])


def ref_lr_wd_momentum(i: int, total: int, ipe: int) -> tuple[float, float, float]:
    """lr and wd (schedulers stepped before iteration ``i``'s optimizer step) and EMA momentum."""
    s, warmup, t_max = i + 1, int(WARMUP_EPOCHS * ipe), int(SCALE * total)
    if s < warmup:
        lr = START_LR + s / max(1, warmup) * (REF_LR - START_LR)
    else:
        progress = (s - warmup) / max(1, t_max - warmup)
        lr = max(FINAL_LR, FINAL_LR + (REF_LR - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * progress)))
    wd = min(FINAL_WD, FINAL_WD + (REF_WD - FINAL_WD) * 0.5 * (1 + math.cos(math.pi * s / t_max)))
    momentum = EMA[0] + i * (EMA[1] - EMA[0]) / (SCALE * total)
    return lr, wd, momentum


def reference(state: dict[str, Tensor], data: Views, records: list[dict], rand_views: int) -> dict:
    """The official iteration on the global batch of all ranks; returns losses and final state.

    ``records`` (one per rank) give each rank's image indices and masks of every step.
    """
    world = len(records)
    sub = {
        name: {k[len(name) + 1 :]: v.clone() for k, v in state.items() if k.startswith(name + ".")}
        for name in ("encoder", "head", "target_encoder", "target_head")
    }
    enc, head, protos = sub["encoder"], sub["head"], state["prototypes"].clone()
    trainable = {**{f"encoder.{k}": v for k, v in enc.items()}}
    trainable.update(
        {f"head.{k}": v for k, v in head.items() if "running" not in k and "num_batches" not in k}
    )
    trainable["prototypes"] = protos
    for p in trainable.values():
        p.requires_grad_(True)
    bn_stats = {k: v for k, v in head.items() if "running" in k or "num_batches" in k}
    t_bn_stats = {k: v for k, v in sub["target_head"].items() if "running" in k or "num_batches" in k}
    adam = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in trainable.items()}
    ipe = total = STEPS
    losses = []
    for i in range(STEPS):
        lr, wd, momentum = ref_lr_wd_momentum(i, total, ipe)
        per_rank = [[data[int(j)][0] for j in rec["index"][i]] for rec in records]
        masks = [rec["keep"][i] for rec in records]
        n_views = len(per_rank[0][0])
        with torch.no_grad():  # the target network: the unmasked target views, train-mode BN
            z_t = ref_head(sub["target_head"], t_bn_stats, ref_group(sub["target_encoder"], per_rank, [0]))
        anchors = [list(range(1, 1 + rand_views))]
        if n_views > 1 + rand_views:
            anchors.append(list(range(1 + rand_views, n_views)))
        z_a = torch.cat(
            [ref_head(head, bn_stats, ref_group(enc, per_rank, v, masks, g)) for g, v in enumerate(anchors)]
        )
        out = ref_loss(z_a, z_t, protos, n_views - 1)
        losses.append({k: float(v) for k, v in out.items()})
        grads = dict(zip(trainable, torch.autograd.grad(out["loss"], list(trainable.values()))))
        grads["prototypes"] = grads["prototypes"] * world  # summed over ranks, not averaged
        clipped = [k for k in grads if k != "prototypes"]
        norm = torch.sqrt(sum((grads[k] ** 2).sum() for k in clipped))
        coef = min(1.0, CLIP / (float(norm) + 1e-6))
        with torch.no_grad():
            for name, p in trainable.items():
                g = grads[name] * (coef if name in clipped else 1.0)
                decayed = not ("bias" in name or "bn" in name or p.ndim == 1 or name == "prototypes")
                p.mul_(1 - lr * (wd if decayed else 0.0))
                m, v = adam[name]
                m.mul_(BETAS[0]).add_((1 - BETAS[0]) * g)
                v.mul_(BETAS[1]).add_((1 - BETAS[1]) * g * g)
                bc1, bc2 = 1 - BETAS[0] ** (i + 1), 1 - BETAS[1] ** (i + 1)
                p.sub_(lr / bc1 * m / (v.sqrt() / math.sqrt(bc2) + ADAM_EPS))
            for src, dst in (("encoder", "target_encoder"), ("head", "target_head")):
                for k, t in sub[dst].items():
                    if "running" not in k and "num_batches" not in k:
                        t.copy_(momentum * t + (1 - momentum) * sub[src][k])
        losses[-1]["grad_norm"] = float(norm)
    final = {f"{name}.{k}": v.detach() for name, part in sub.items() for k, v in part.items()}
    final["prototypes"] = protos.detach()
    return {"loss": losses, "state": final}


def _assert_equal_to_reference(records: list[dict], initial: dict, data: Views, rand_views: int) -> None:
    ref = reference(initial, data, records, rand_views)
    world = len(records)
    for i, expected in enumerate(ref["loss"]):
        for part in ("loss", "ce", "me_max", "entropy"):
            ours = sum(rec["loss"][i][part] for rec in records) / world  # per-rank CE / H average
            assert ours == pytest.approx(expected[part], rel=RTOL), (i, part)
        assert records[0]["grad_norm"][i] == pytest.approx(expected["grad_norm"], rel=RTOL)
    # Clipping must be active, or the test would not see whether it is done right.
    assert ref["loss"][0]["grad_norm"] > CLIP
    for rec in records:
        assert set(rec["state"]) == set(ref["state"])
        for k, expected in ref["state"].items():
            got = rec["state"][k]
            if k.endswith(SHIFTS_BEFORE_BN):
                assert got.abs().max() < 1e-9 and expected.abs().max() < 1e-9, k
            elif got.is_floating_point():
                err = (got - expected).abs().max()
                assert err <= RTOL * expected.abs().max(), f"{k}: max error {float(err):.3g}"
            else:
                assert torch.equal(got, expected), k
        # The target moved, so the EMA comparison above checked something.
        assert not torch.equal(
            rec["state"]["target_encoder.blocks.0.attn.qkv.weight"],
            initial["target_encoder.blocks.0.attn.qkv.weight"],
        )


@pytest.mark.parametrize(
    ("rand_views", "kw"),
    [
        pytest.param(1, {}, id="official"),  # 1 masked anchor + 2 focal views, global-RNG masks
        pytest.param(2, {}, id="two_rand_views"),
        pytest.param(1, {"packed_views": True}, id="packed_views"),
    ],
)
def test_one_process_equals_the_official_iteration(tmp_path, rand_views, kw) -> None:
    model = _module(rand_views, **kw)
    initial = _float64(model.state_dict())
    data = Views(B * STEPS, rand_views, focal=2)
    records = _train(model, data, tmp_path)
    _assert_equal_to_reference(records, initial, data, rand_views)


@pytest.mark.cuda
@pytest.mark.parametrize("packed", [False, True])
def test_one_gpu_equals_the_official_iteration(tmp_path, packed) -> None:
    """The same iteration trained on a GPU (float64: its kernels, the fused AdamW, masks drawn on
    the device) against the CPU reference."""
    model = _module(1, packed_views=packed)
    initial = _float64(model.state_dict())
    data = Views(B * STEPS, 1, focal=2)
    records = _train(model, data, tmp_path, accelerator="gpu")
    _assert_equal_to_reference(records, initial, data, 1)


def test_two_processes_equal_the_official_iteration_on_the_global_batch(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    # Seeded shared masks: one permutation for the global batch, as the official ranks draw it.
    model = _module(1, mask_seed=3)
    initial = _float64(model.state_dict())
    data = Views(WORLD * B * STEPS, 1, focal=2)
    strategy = "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"
    records = _train(model, data, tmp_path, strategy=strategy, devices=WORLD)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(records[0]["keep"], records[1]["keep"]))
    assert not torch.equal(records[0]["index"][0], records[1]["index"][0])  # but other images
    _assert_equal_to_reference(records, initial, data, 1)
