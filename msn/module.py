"""The MSN LightningModule: wires encoders, head, prototypes, masking, loss and schedules.

All the math lives in pure modules (``msn.loss``, ``msn.masking``, ``msn.schedules``,
``msn.ema``); this class only decides what runs when.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel

from msn import backbone, distributed
from msn.backbone.vit import features_problems, vit_problems
from msn.checks import is_int, is_number, raise_problems
from msn.ema import ema_update_
from msn.head import ProjectionHead, init_prototypes, prototypes_problems
from msn.loss import MSNLoss, prototype_probs
from msn.masking import keep_indices, mask_generator, mask_problems, num_kept
from msn.schedules import linear_at, lr_at, wd_at

DEFAULT_ENCODER: dict[str, Any] = {"arch": "vit_small", "patch_size": 16, "img_size": 224, "in_chans": 3}
# Every keyword of build_vit is a valid model.encoder key (defaults come from build_vit itself).
_BUILD_VIT_ARGS = tuple(inspect.signature(backbone.build_vit).parameters)
_LOSS_ARGS = tuple(inspect.signature(MSNLoss).parameters)
DEFAULT_HEAD: dict[str, Any] = {"hidden_dim": 2048, "out_dim": 256, "use_bn": True}
DEFAULT_OPTIM: dict[str, Any] = {
    "start_lr": 2e-4,
    "ref_lr": 1e-3,
    "final_lr": 1e-6,
    "warmup_epochs": 15,
    "ref_wd": 0.04,
    "final_wd": 0.4,
    "betas": (0.9, 0.999),
    "schedule_scale": 1.25,  # every schedule spans 1.25 x the real iterations (official ipe_scale)
    "clip_grad": 3.0,  # over encoder + head, never the prototypes; 0 disables
    "fused": "auto",  # fused AdamW kernel on CUDA
    "lr_scaling": "none",  # official: the lrs as given, whatever the global batch
}
#: ``model.optim.lr_scaling`` values (see :func:`scaled_optim`).
LR_SCALINGS = ("none", "linear")
#: Global batch of the official learning rates (64 per GPU x 16 GPUs).
REFERENCE_BATCH = 1024


def global_batch(batch_size: int, world_size: int = 1, accumulate_grad_batches: int = 1) -> int:
    """Images per optimizer step: per-process batch x processes (devices x nodes) x accumulation."""
    return batch_size * world_size * accumulate_grad_batches


def scaled_optim(optim: Mapping[str, Any], batch: int, rule: str | None = None) -> dict[str, Any]:
    """``optim`` (over ``DEFAULT_OPTIM``) with its learning rates for a global batch of ``batch``.

    ``rule`` (default ``optim["lr_scaling"]``): ``none`` keeps them; ``linear`` multiplies
    ``start_lr`` and ``ref_lr`` by ``batch / 1024`` (the usual rule for the official recipe's
    batch). ``final_lr`` is kept: it is the floor of the cosine, not a rate of the batch.
    """
    out = {**DEFAULT_OPTIM, **optim}
    rule = out["lr_scaling"] if rule is None else rule
    if rule == "linear":
        factor = batch / REFERENCE_BATCH
        out["start_lr"] = out["start_lr"] * factor
        out["ref_lr"] = out["ref_lr"] * factor
    elif rule != "none":
        raise ValueError(f"lr_scaling={rule!r} is unknown; allowed: {', '.join(LR_SCALINGS)}")
    return out


def _node_problems(key: str, given: Any, defaults: Mapping, allowed: Sequence[str], check: Any) -> list[str]:
    """The keys of sub-node ``key`` outside ``allowed``, else what ``check`` finds in it over ``defaults``."""
    unknown = sorted(set(given or {}) - set(allowed))
    if unknown:
        return [f"{key}: unknown keys {unknown}; allowed: {sorted(allowed)}"]
    return [f"{key}.{p}" for p in check(**{**defaults, **(given or {})})]


def _optim_problems(**optim: Any) -> list[str]:
    # clip_grad null disables clipping, as 0 does.
    rates = ("start_lr", "ref_lr", "final_lr") + (("clip_grad",) if optim["clip_grad"] is not None else ())
    bad = [k for k in rates if not (is_number(optim[k]) and optim[k] >= 0)]
    problems = [f"{k}={optim[k]} must be a number >= 0" for k in bad]
    if optim["lr_scaling"] not in LR_SCALINGS:
        problems.append(f"lr_scaling={optim['lr_scaling']!r} is unknown; allowed: {', '.join(LR_SCALINGS)}")
    return problems


# Prefixes that wrappers (FSDP units, activation checkpointing, torch.compile) add to parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _unwrapped_name(name: str) -> str:
    """``name`` as the unwrapped module spells it (e.g. ``blocks.0.attn.qkv.weight``)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class MSNModule(L.LightningModule):
    """Masked Siamese Networks pre-training.

    Batch layout: ``(views, labels)`` where ``views`` is a list of tensors (B, C, H, W): the
    target view first, then ``rand_views`` anchor views at full size (masked), then the focal
    views (small crops, unmasked unless ``mask_focal``). Labels are ignored.

    Args:
        encoder: kwargs of :func:`msn.backbone.build_vit` (arch, patch_size, img_size, in_chans, ...).
        head: ``hidden_dim``, ``out_dim``, ``use_bn`` of the projection head.
        num_prototypes: K learnable prototypes of dimension ``head.out_dim``.
        loss: kwargs of :class:`msn.loss.MSNLoss`.
        mask_ratio: fraction of patches dropped from the full-size anchor views.
        mask_mode: ``shared`` (one permutation per batch, official) or ``per_sample``.
        mask_focal: also mask the focal views (official: no).
        rand_views: number of full-size anchor views in each batch (official 1).
        ema: (start, end) momentum of the target network, linear over ``schedule_scale`` x steps.
        sharpen: (start, end) sharpening temperature, linear likewise (official 0.25 -> 0.25).
        optim: learning-rate / weight-decay schedule and clipping, see ``DEFAULT_OPTIM``.
        prototypes_grad: ``sum`` (official: prototype gradients summed over ranks) or ``mean``
            (what DDP does by itself).
        features: which token :meth:`features` returns for evaluation (``cls_prenorm`` official).
        mask_seed: ``None`` (default): masks come from the global random state, as in the official
            code. An integer: from :func:`msn.masking.mask_generator` keyed by (seed, step,
            micro-batch, view group), so a resumed run redraws the same ones and W processes with B
            images draw the ``per_sample`` masks of one with W*B. ``shared``: every rank alike.
        packed_views: encode the masked anchor views and all focal views in ONE encoder pass,
            tokens concatenated, attention kept inside each view
            (:func:`msn.backbone.encode_packed`): ``true``/``"segments"`` (attention per crop
            size, no wasted pairs) or ``"mask"`` (one sequence per image, block-diagonal mask);
            default ``false``: one call per crop size (official). Same result up to rounding.
        compile: ``torch.compile`` the encoder forwards (``True`` = inductor, or a backend name such
            as ``"aot_eager"``). Shapes are static (fixed keep counts): each crop size compiles once.
        sync_bn: with several processes the heads' BatchNorm uses the statistics of the global batch
            (:class:`msn.distributed.SyncBatchNorm1d`, GPUs and CPUs alike), as the official code's
            SyncBatchNorm. No effect in a single process.
    """

    def __init__(
        self,
        encoder: Mapping[str, Any] | None = None,
        head: Mapping[str, Any] | None = None,
        num_prototypes: int = 1024,
        loss: Mapping[str, Any] | None = None,
        mask_ratio: float = 0.15,
        mask_mode: str = "shared",
        mask_focal: bool = False,
        rand_views: int = 1,
        ema: Sequence[float] = (0.996, 1.0),
        sharpen: Sequence[float] = (0.25, 0.25),
        optim: Mapping[str, Any] | None = None,
        prototypes_grad: str = "sum",
        features: str = "cls_prenorm",
        mask_seed: int | None = None,
        packed_views: bool | str = False,
        compile: bool | str = False,
        sync_bn: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        raise_problems(MSNModule.problems(**self.hparams), prefix="model.")
        encoder_cfg = {**DEFAULT_ENCODER, **(encoder or {})}
        head_cfg = {**DEFAULT_HEAD, **(head or {})}
        self.optim_cfg = {**DEFAULT_OPTIM, **(optim or {})}

        self.encoder = backbone.build_vit(**encoder_cfg)
        self.head = ProjectionHead(self.encoder.embed_dim, **head_cfg)
        self.prototypes = nn.Parameter(init_prototypes(num_prototypes, head_cfg["out_dim"]))
        # The target network starts as an exact copy and is only ever moved by EMA.
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_head = copy.deepcopy(self.head).requires_grad_(False)
        self.criterion = MSNLoss(**dict(loss or {}))

        self.mask_ratio = mask_ratio
        self.mask_mode = mask_mode
        self.mask_focal = mask_focal
        self.rand_views = rand_views
        self.ema_range = tuple(float(v) for v in ema)
        self.sharpen_range = tuple(float(v) for v in sharpen)
        self.prototypes_grad = prototypes_grad
        self.feature_kind = features
        self.mask_seed = mask_seed
        # None: separate forwards; else the attention layout of the packed forward.
        self.packed_attention: str | None = (
            ("segments" if packed_views is True else packed_views) if packed_views else None
        )
        self.compile_backend: str | None = ("inductor" if compile is True else compile) or None
        self.sync_bn = bool(sync_bn)
        # The encoder forwards; replaced by their torch.compile'd versions in setup() when asked.
        self._encode = backbone.encode
        self._encode_packed = backbone.encode_packed
        self._batch_idx = 0
        # Parameter ranks before any wrapping (FSDP flattens them), for the weight-decay groups.
        self._param_ndim = {name: p.ndim for name, p in self.named_parameters()}
        self._momentum = self.ema_range[0]
        self._last_batch_time: float | None = None

    @staticmethod
    def problems(**kwargs: Any) -> list[str]:
        """Every problem of these arguments (defaults for the missing ones), keys relative to ``model``."""
        given = inspect.signature(MSNModule).bind_partial(**kwargs)
        given.apply_defaults()
        a = given.arguments
        problems = _node_problems("encoder", a["encoder"], DEFAULT_ENCODER, _BUILD_VIT_ARGS, vit_problems)
        problems += _node_problems("head", a["head"], DEFAULT_HEAD, [*DEFAULT_HEAD], ProjectionHead.problems)
        problems += _node_problems("loss", a["loss"], {}, _LOSS_ARGS, MSNLoss.problems)
        problems += _node_problems("optim", a["optim"], DEFAULT_OPTIM, [*DEFAULT_OPTIM], _optim_problems)
        problems += prototypes_problems(a["num_prototypes"]) + mask_problems(a["mask_ratio"], a["mask_mode"])
        ema, seed, packed, backend = a["ema"], a["mask_seed"], a["packed_views"], a["compile"]
        if not (is_int(a["rand_views"]) and a["rand_views"] >= 1):
            problems.append(f"rand_views={a['rand_views']} must be an integer >= 1")
        momentums = isinstance(ema, Sequence) and len(ema) == 2 and all(is_number(m) for m in ema)
        if not (momentums and all(0 <= m <= 1 for m in ema)):
            problems.append(f"ema={ema!r} must be [start, end] momentums in [0, 1]")
        if a["prototypes_grad"] not in ("sum", "mean"):
            problems.append(f"prototypes_grad={a['prototypes_grad']!r} is unknown; allowed: sum, mean")
        if not (seed is None or (is_int(seed) and seed >= 0)):
            problems.append(f"mask_seed={seed!r} must be null or an integer >= 0")
        if not (isinstance(packed, bool) or packed in backbone.PACKED_ATTENTION):
            allowed = ", ".join(map(str, (False, True, *backbone.PACKED_ATTENTION)))
            problems.append(f"packed_views={packed!r} is unknown; allowed: {allowed}")
        if not isinstance(backend, (bool, str)) or backend == "":
            problems.append(f"compile={backend!r} must be true, false or a torch.compile backend name")
        return problems + features_problems(a["features"])

    # ------------------------------------------------------------------ schedules
    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (known once attached to a trainer)."""
        return max(1, int(self.trainer.estimated_stepping_batches))

    @property
    def steps_per_epoch(self) -> float:
        """Optimizer steps in one epoch (from the loader length, so max_steps runs agree too)."""
        batches = self.trainer.num_training_batches
        if math.isinf(batches) or batches <= 0:  # iterable data without a length
            return self.total_steps / max(1, self.trainer.max_epochs or 1)
        return math.ceil(batches / self.trainer.accumulate_grad_batches)

    @property
    def warmup_steps(self) -> int:
        return int(self.optim_cfg["warmup_epochs"] * self.steps_per_epoch)

    def _batch_per_process(self) -> int | None:
        """Images per process and micro-batch: the data module's ``batch_size``, else the loader's."""
        trainer = self.trainer
        # The loader given to fit() directly is only loaded after configure_optimizers.
        given = getattr(getattr(trainer.fit_loop, "_data_source", None), "instance", None)
        for source in (trainer.datamodule, trainer.train_dataloader, given):
            size = getattr(source, "batch_size", None)
            if is_int(size) and size > 0:
                return int(size)
        return None

    @property
    def run_optim_cfg(self) -> dict[str, Any]:
        """``optim_cfg`` with ``lr_scaling`` applied to this trainer's global batch (data batch x
        world size x accumulation; see :func:`scaled_optim`)."""
        if self.optim_cfg["lr_scaling"] == "none" or self._trainer is None:
            return self.optim_cfg
        size = self._batch_per_process()
        if size is None:
            raise ValueError(
                f"model.optim.lr_scaling={self.optim_cfg['lr_scaling']} needs the batch size per process: "
                "train from a data module or a DataLoader with a batch_size"
            )
        batch = global_batch(size, self.trainer.world_size, self.trainer.accumulate_grad_batches)
        return scaled_optim(self.optim_cfg, batch)

    def schedule_values(self, step: int) -> dict[str, float]:
        """lr, wd, EMA momentum and sharpening temperature used by (0-based) iteration ``step``."""
        o, total, scale = self.run_optim_cfg, self.total_steps, self.optim_cfg["schedule_scale"]
        # lr/wd schedulers are stepped before the optimizer in the official loop, hence step + 1.
        return {
            "lr": lr_at(step + 1, total, self.warmup_steps, o["start_lr"], o["ref_lr"], o["final_lr"], scale),
            "wd": wd_at(step + 1, total, o["ref_wd"], o["final_wd"], scale),
            "momentum": linear_at(step, total, *self.ema_range, scale=scale),
            "sharpen_temperature": linear_at(step, total, *self.sharpen_range, scale=scale),
        }

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        world = self.trainer.world_size
        if world > 1 and self.sync_bn:
            if getattr(self.trainer.strategy, "_layer_sync", None) is not None and (
                self.trainer.strategy.root_device.type == "cpu"
            ):
                raise ValueError(
                    "trainer.sync_batchnorm=true converts to torch.nn.SyncBatchNorm, which only runs on "
                    "GPUs; the module synchronises its heads itself (model.sync_bn): set "
                    "trainer.sync_batchnorm=false"
                )
            distributed.sync_batchnorm(self.head)
            distributed.sync_batchnorm(self.target_head)
        if world > 1 and self.mask_seed is None and self.mask_mode == "per_sample":
            rank_zero_warn(
                "model.mask_seed=null with model.mask_mode=per_sample and several processes: every rank "
                "draws the same per-image masks from its (alike seeded) random state; set model.mask_seed "
                "so that each image of the global batch gets its own"
            )
        if self.compile_backend is not None:
            self.compile_encoders(self.compile_backend)

    def compile_encoders(self, backend: str = "inductor") -> None:
        """``torch.compile`` the encoder forwards (anchor, focal, packed and target calls).

        Called by :meth:`setup` when ``compile`` is set (in every process, after spawning, so no
        compiled function is ever pickled). The state dict is untouched (the modules themselves
        are not wrapped). Each input shape compiles once; shapes are static.
        """
        self._encode = torch.compile(backbone.encode, backend=backend)
        self._encode_packed = torch.compile(backbone.encode_packed, backend=backend)

    def teardown(self, stage: str) -> None:
        # Back to plain BatchNorm1d: after fit (evaluation in a single process) nothing syncs.
        distributed.revert_sync_batchnorm(self.head)
        distributed.revert_sync_batchnorm(self.target_head)

    # ------------------------------------------------------------------ forward
    def _keep_indices(self, group: int, images: Tensor, mask_ratio: float, batch_size: int) -> Tensor | None:
        """Patches to keep for one group of views (V*B, C, H, W); None when nothing is masked.

        Shapes as :func:`msn.backbone.encode`: (K,) in ``shared`` mode, (V*B, K) in ``per_sample``.
        """
        if mask_ratio <= 0:
            return None
        n = backbone.num_patches(self.encoder, *images.shape[-2:])
        # mode, patches, kept, views, images per view: the same draw whichever generator feeds it.
        draw = (self.mask_mode, n, num_kept(n, mask_ratio), images.shape[0] // batch_size, batch_size)
        if self.mask_seed is None:  # the global random state: the very draw encode() itself makes
            return keep_indices(*draw, device=images.device)
        # Keyed by the optimizer step (restored exactly on resume) and the micro-batch inside it.
        micro = self._batch_idx % self.trainer.accumulate_grad_batches if self._trainer is not None else 0
        generator = mask_generator(self.mask_seed, self.mask_mode, (self.global_step, micro, group))
        idx = keep_indices(*draw, distributed.rank(), distributed.world_size(), generator=generator)
        return idx.to(images.device, non_blocking=True)

    def anchor_projections(self, anchor_views: Sequence[Tensor]) -> Tensor:
        """Projections (B*V, d) of the anchor views, view-major.

        Views of one crop size go through the encoder in one call (the official multi-crop
        trick), or all views in one packed call with ``packed_views``. The head then runs once
        per crop size, as in the official encoder: its BatchNorm normalises the masked full-size
        views and the focal views each with their own batch statistics (and updates its running
        statistics once per group).
        """
        batch_size = anchor_views[0].shape[0]
        groups = [(torch.cat(list(anchor_views[: self.rand_views])), self.mask_ratio)]
        if len(anchor_views) > self.rand_views:
            focal_ratio = self.mask_ratio if self.mask_focal else 0.0
            groups.append((torch.cat(list(anchor_views[self.rand_views :])), focal_ratio))
        if self.packed_attention is not None:
            packed = [(x, self._keep_indices(g, x, r, batch_size)) for g, (x, r) in enumerate(groups)]
            _, h = self._encode_packed(self.encoder, packed, batch_size, self.packed_attention)
            cls_per_group = h.split([x.shape[0] for x, _ in groups])
        else:
            cls_per_group = []
            for g, (x, r) in enumerate(groups):
                # Drawn right before its forward, so the random draws happen in the official order.
                keep = self._keep_indices(g, x, r, batch_size)
                cls_per_group.append(self._encode(self.encoder, x, keep_idx=keep)[1])
        return torch.cat([self.head(h) for h in cls_per_group])

    @torch.no_grad()
    def target_projections(self, target_view: Tensor) -> Tensor:
        """Projections (B, d) of the unmasked target view by the EMA network (train-mode BN)."""
        _, h = self._encode(self.target_encoder, target_view)
        return self.target_head(h)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Frozen evaluation features of the target encoder, (B, D)."""
        return backbone.extract(self.target_encoder, images, self.feature_kind)

    @torch.no_grad()
    def prototype_probs(self, images: Tensor) -> Tensor:
        """Soft assignment (B, K) of ``images`` to the prototypes by the target network.

        ``softmax(cos(z, prototypes) / tau)`` without sharpening: what the targets are built from.
        Uses the modules' current mode (call ``.eval()`` for running BatchNorm statistics).
        """
        _, h = backbone.encode(self.target_encoder, images)
        return prototype_probs(self.target_head(h), self.prototypes, self.criterion.temperature)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: tuple[list[Tensor], Tensor], batch_idx: int) -> Tensor:
        views, _ = batch
        self._batch_idx = batch_idx
        if len(views) < 1 + self.rand_views:
            raise ValueError(
                f"batch has {len(views)} views; MSN needs a target view and model.rand_views="
                f"{self.rand_views} anchor views (check data.transform.rand_views)"
            )
        batch_size = views[0].shape[0]
        sched = self.schedule_values(self.global_step)
        self._apply_schedules(sched)
        self._momentum = sched["momentum"]

        z_t = self.target_projections(views[0])
        z_a = self.anchor_projections(views[1:])
        out = self.criterion(z_a, z_t, self.prototypes, sharpen_temperature=sched["sharpen_temperature"])

        self.log_dict(
            {
                "train/loss": out.loss,
                "train/ce": out.ce,
                "train/me_max": out.me_max,
                "train/entropy": out.entropy,
                "train/num_prototypes_used": out.num_prototypes_used,
                "train/max_target_prob": out.max_target_prob,
                "train/min_target_prob": out.min_target_prob,
            },
            prog_bar=False,
            batch_size=batch_size,
        )
        self.log("loss", out.loss, prog_bar=True, logger=False, batch_size=batch_size)
        self.log_dict({f"schedule/{k}": v for k, v in sched.items()}, batch_size=batch_size)
        now = time.perf_counter()
        if self._last_batch_time is not None:
            ips = batch_size * distributed.world_size() / max(now - self._last_batch_time, 1e-9)
            self.log("train/images_per_sec", ips, batch_size=batch_size)
            self.log("img/s", ips, prog_bar=True, logger=False, batch_size=batch_size)  # fits the bar
        self._last_batch_time = now
        return out.loss

    def on_train_epoch_start(self) -> None:
        # Don't count the data-loader start-up between epochs as step time.
        self._last_batch_time = None

    def _apply_schedules(self, sched: Mapping[str, float]) -> None:
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = sched["lr"]
            if group.get("apply_wd", False):
                group["weight_decay"] = sched["wd"]

    def on_after_backward(self) -> None:
        # DDP averages gradients; the official code sums the prototype gradients over ranks.
        if self.prototypes_grad == "sum" and self.prototypes.grad is not None:
            self.prototypes.grad.mul_(distributed.world_size())

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Clip encoder + head only: the official recipe never clips the prototypes, which
        # Lightning's trainer-level clipping (all parameters) would do.
        clip = self.optim_cfg["clip_grad"]
        if clip and clip > 0:
            params = [*self.encoder.parameters(), *self.head.parameters()]
            # Under FSDP every rank holds a shard of each gradient: the norm is summed over ranks.
            distributed.clip_grad_norm_(params, clip, sharded=self._fsdp_root() is not None)

    def _fsdp_root(self) -> nn.Module | None:
        """The root FSDP module when the trainer shards this module with FSDP, else None."""
        trainer = self._trainer
        if trainer is None or not isinstance(trainer.strategy, FSDPStrategy):
            return None
        return trainer.strategy.model

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        optimizer.step(closure=optimizer_closure)
        # EMA after every optimizer step, with the momentum of the step that just ran.
        root = self._fsdp_root()
        if root is None:
            ema_update_(self.target_encoder, self.encoder, self._momentum)
            ema_update_(self.target_head, self.head, self._momentum)
            return
        # FSDP (configs/trainer/fsdp.yaml wraps every Block and each head as its own unit): the
        # shards of an encoder unit and of its target twin line up element for element, but the
        # parameters left in the root unit (class token, position table, patch embedding, final
        # norm, prototypes) sit at different offsets of one flat shard. Gathering the root alone
        # (recurse=False, small) makes those whole while the blocks stay sharded.
        with FullyShardedDataParallel.summon_full_params(root, recurse=False, writeback=True):
            ema_update_(self.target_encoder, self.encoder, self._momentum)
            ema_update_(self.target_head, self.head, self._momentum)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW with the official groups: decayed weights; biases and 1-D params; prototypes."""
        decay, no_decay = [], []
        for prefix, module in (("encoder", self.encoder), ("head", self.head)):
            for name, p in module.named_parameters():
                # Biases, norms and every 1-D parameter are not decayed; cls_token, pos_embed
                # and the patch conv are (they are not 1-D), as in the official code. The shape
                # is the one at construction: under FSDP every parameter is a 1-D shard by now.
                ndim = self._param_ndim.get(f"{prefix}.{_unwrapped_name(name)}", p.ndim)
                (no_decay if name.endswith("bias") or ndim == 1 else decay).append(p)
        o = self.run_optim_cfg
        groups = [
            {"params": decay, "weight_decay": o["ref_wd"], "apply_wd": True},
            {"params": no_decay, "weight_decay": 0.0, "apply_wd": False},
            {"params": [self.prototypes], "weight_decay": 0.0, "apply_wd": False},
        ]
        fused = o["fused"]
        if fused == "auto":
            fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=o["start_lr"], betas=tuple(o["betas"]), fused=bool(fused))
