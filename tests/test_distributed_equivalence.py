"""Two processes (gloo, CPU) with B images each train exactly like one process with 2B images.

The 2-process run goes through Lightning's own DDP path (``strategy="ddp_fork"``: what
``trainer=ddp_cpu`` selects but for the start method): DDP gradient averaging, the module's
SyncBatchNorm in both heads, global-batch ME-MAX and Sinkhorn, prototype gradients summed over
ranks, EMA on every rank. Both runs see the same images (Lightning's shuffled DistributedSampler
hands rank r the global positions ``r, r + 2, ...`` of one permutation) and, with ``mask_seed``
and ``mask_mode=per_sample``, the same masks. After 3 optimizer steps the loss of every step and
every parameter and buffer (encoder, head, prototypes, target encoder and head, BatchNorm
statistics) agree to 1e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy
from timm.models.vision_transformer import Block
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from msn.cli.common import CONFIG_DIR
from msn.distributed import SyncBatchNorm1d, clip_grad_norm_, revert_sync_batchnorm, sync_batchnorm
from msn.head import ProjectionHead
from msn.masking import seeded_keep_indices
from msn.module import MSNModule
from tests.helpers import fit_steps, tiny_module

WORLD, B, STEPS = 2, 4, 3
VIEWS = (16, 16, 8, 8)  # target, one masked anchor, two focal views


class IndexedViews(Dataset):
    """Views that depend on the index only; the label is the index (to check the shards)."""

    def __len__(self) -> int:
        return WORLD * B * STEPS

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        g = torch.Generator().manual_seed(1000 + i)
        return [torch.randn(1, s, s, generator=g) for s in VIEWS], i


class RecordingMSN(MSNModule):
    """Records losses, sample indices and masks of every step; saves everything at the end
    (to ``out_file``, where ``{rank}`` becomes the global rank).

    ``proto_grad_scale`` multiplies the prototype gradient of a single-process run: the official
    rule sums prototype gradients over W ranks, i.e. W x the gradient of the global batch.
    """

    out_file: str = ""
    proto_grad_scale: float = 1.0

    def on_fit_start(self) -> None:
        self.record: dict[str, list] = {"loss": [], "index": [], "keep": []}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.record["loss"].append(loss.detach().clone())
        self.record["index"].append(batch[1].clone())
        return loss

    def _keep_indices(self, group, images, mask_ratio, batch_size):
        keep = super()._keep_indices(group, images, mask_ratio, batch_size)
        if keep is not None:
            self.record["keep"].append(keep.clone())
        return keep

    def on_after_backward(self) -> None:
        super().on_after_backward()
        if self.proto_grad_scale != 1.0:
            self.prototypes.grad.mul_(self.proto_grad_scale)

    def on_train_end(self) -> None:
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        bn = [type(m).__name__ for m in (self.head.bn1, self.target_head.bn2)]
        out = self.out_file.format(rank=self.global_rank)
        torch.save({**self.record, "state": state, "bn": bn, "rank": self.global_rank}, out)


def _model(out_file: Path, proto_grad_scale: float = 1.0) -> RecordingMSN:
    model = tiny_module(
        RecordingMSN,
        mask_mode="per_sample",
        mask_seed=7,
        optim={"warmup_epochs": 1},
        ema=(0.9, 1.0),  # a target that moves visibly in 3 steps
    )
    model.out_file = str(out_file)
    model.proto_grad_scale = proto_grad_scale
    return model


def _fit(model: MSNModule, batch_size: int, sampler: Sampler | None = None, **trainer_kw) -> None:
    loader = DataLoader(IndexedViews(), batch_size=batch_size, sampler=sampler, drop_last=True)
    # float64: Adam divides each gradient by its own running RMS, which turns float32 rounding
    # differences in gradients that are zero in exact arithmetic (biases followed by BatchNorm,
    # the key bias of attention) into visible parameter differences. In float64 the rounding
    # stays far below the tolerance, so the test checks the math of the distributed step.
    fit_steps(model, loader, STEPS, precision="64-true", **trainer_kw)


def test_two_processes_train_like_one_process_with_the_global_batch(tmp_path, monkeypatch):
    # Loopback only: keeps gloo off whatever interface the host name resolves to.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    # ddp_fork: the children inherit the imported modules (seconds instead of a fresh import of
    # torch + Lightning per process); ddp_spawn (trainer=ddp_cpu) once CUDA is initialised.
    strategy = "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"
    _fit(_model(tmp_path / "rank{rank}.pt"), B, strategy=strategy, devices=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    # Lightning gives each rank a shuffled DistributedSampler (seed 0); the same sampler with one
    # replica yields the same global order to the single process.
    order = DistributedSampler(IndexedViews(), num_replicas=1, rank=0, shuffle=True, seed=0)
    _fit(_model(tmp_path / "single.pt", proto_grad_scale=WORLD), WORLD * B, sampler=order, devices=1)
    single = torch.load(tmp_path / "single.pt", weights_only=False)

    # Lightning really ran two ranks with the module's global-batch BatchNorm in both heads.
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["bn"] == [SyncBatchNorm1d.__name__] * 2 for r in ranks)
    assert single["bn"] == ["BatchNorm1d"] * 2

    for step in range(STEPS):
        # Each rank a different shard: rank r holds the global positions r, r + W, ...
        idx = [r["index"][step] for r in ranks]
        assert set(idx[0].tolist()).isdisjoint(idx[1].tolist())
        torch.testing.assert_close(torch.stack(idx, dim=1).flatten(), single["index"][step])
        # ... and its own masks, which interleaved are exactly the single process's masks.
        keep = [r["keep"][step] for r in ranks]
        assert not torch.equal(keep[0], keep[1])
        torch.testing.assert_close(torch.stack(keep, dim=1).flatten(0, 1), single["keep"][step])
        # The DDP objective (mean of the rank losses) is the single-process loss.
        mean_loss = sum(r["loss"][step] for r in ranks) / WORLD
        torch.testing.assert_close(mean_loss, single["loss"][step], rtol=1e-5, atol=1e-5)

    init = _model(tmp_path / "unused.pt").state_dict()
    for name, value in single["state"].items():
        # Identical on every rank (gradients all-reduced, EMA and BN statistics alike) ...
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        # ... and equal to the single process.
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-5, atol=1e-5, msg=name)
    # The comparison is not vacuous: the weights moved far more than the tolerance.
    for name in (
        "encoder.blocks.0.attn.qkv.weight",
        "head.fc3.weight",
        "prototypes",
        "target_encoder.cls_token",
    ):
        assert (single["state"][name] - init[name]).abs().max() > 1e-4, name


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_seeded_masks_repeat_for_a_key_and_differ_between_steps(mode):
    draw = lambda key, rank: seeded_keep_indices(3, key, 1, 4, 16, 10, mode, rank, 2)  # noqa: E731
    assert torch.equal(draw((5, 0, 0), 0), draw((5, 0, 0), 0))  # a resumed run redraws the same
    assert not torch.equal(draw((5, 0, 0), 0), draw((6, 0, 0), 0))  # each step its own
    # shared: one permutation for the global batch, as the alike-seeded official processes draw;
    # per_sample: each rank its own images' masks.
    assert torch.equal(draw((5, 0, 0), 0), draw((5, 0, 0), 1)) == (mode == "shared")
    keep = draw((5, 0, 0), 1)
    assert keep.shape[-1] == 10 and torch.equal(keep, keep.sort(dim=-1).values)


def test_per_sample_seeded_masks_of_ranks_interleave_into_the_global_batch_masks():
    views, per_rank, world, n, k = 2, 3, 4, 9, 5
    whole = seeded_keep_indices(1, (2,), views, per_rank * world, n, k, "per_sample")
    whole = whole.view(views, per_rank * world, k)
    for r in range(world):
        local = seeded_keep_indices(1, (2,), views, per_rank, n, k, "per_sample", r, world)
        # Local image i of rank r is global image i * world + r, view by view.
        torch.testing.assert_close(local.view(views, per_rank, k), whole[:, r::world])
    assert all(len(set(row.tolist())) == k for row in whole.flatten(0, 1))


# --------------------------------------------------------------------------------------
# Sharded gradient clipping (FSDP) on two gloo processes
# --------------------------------------------------------------------------------------


def _clip_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD
    )
    try:
        full = [torch.arange(10.0).view(2, 5), torch.linspace(-3, 3, 7)]
        # Each rank holds half of every gradient, as FSDP shards them.
        params = [torch.zeros(g.numel()).chunk(WORLD)[rank].requires_grad_() for g in full]
        for p, g in zip(params, full):
            p.grad = g.flatten().chunk(WORLD)[rank].clone()
        total = clip_grad_norm_(params, 2.0, sharded=True)
        torch.save({"total": total, "grads": [p.grad for p in params]}, Path(out_dir) / f"clip{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_sharded_clip_grad_norm_scales_by_the_norm_of_the_whole_gradient(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    ctx = torch.multiprocessing.get_context("spawn" if torch.cuda.is_initialized() else "fork")
    procs = [
        ctx.Process(target=_clip_worker, args=(r, str(tmp_path / "init"), str(tmp_path)))
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    out = [torch.load(tmp_path / f"clip{r}.pt") for r in range(WORLD)]

    full = [torch.arange(10.0).view(2, 5), torch.linspace(-3, 3, 7)]
    ref = [torch.zeros_like(g, requires_grad=True) for g in full]
    for p, g in zip(ref, full):
        p.grad = g.clone()
    expected_total = torch.nn.utils.clip_grad_norm_(ref, 2.0)
    for r in range(WORLD):
        torch.testing.assert_close(out[r]["total"], expected_total)
    for i, p in enumerate(ref):
        torch.testing.assert_close(torch.cat([o["grads"][i] for o in out]), p.grad.flatten())


def test_unsharded_clip_grad_norm_is_torch_clip():
    grads = [torch.randn(3, 4), torch.randn(5)]
    a = [torch.zeros_like(g, requires_grad=True) for g in grads]
    b = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, q, g in zip(a, b, grads):
        p.grad, q.grad = g.clone(), g.clone()
    torch.testing.assert_close(clip_grad_norm_(a, 0.5), torch.nn.utils.clip_grad_norm_(b, 0.5))
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)


def test_sync_batchnorm_conversion_keeps_parameters_and_is_reverted():
    head = ProjectionHead(8, 16, 4)
    before = dict(head.state_dict())
    ids = [id(p) for p in head.parameters()]
    assert sync_batchnorm(head) == 2 and isinstance(head.bn1, SyncBatchNorm1d)
    assert [id(p) for p in head.parameters()] == ids and head.state_dict().keys() == before.keys()
    # Without a process group it is a plain BatchNorm1d.
    x = torch.randn(6, 8)
    y = head(x)
    assert revert_sync_batchnorm(head) == 2 and type(head.bn1) is torch.nn.BatchNorm1d
    head.load_state_dict(before)
    torch.testing.assert_close(head(x), y)


# --------------------------------------------------------------------------------------
# Trainer and sweep configs
# --------------------------------------------------------------------------------------


def _compose(overrides: list[str], hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(
            "train", overrides=["output_dir=/tmp/unused", *overrides], return_hydra_config=hydra_cfg
        )


def test_distributed_trainer_configs():
    ddp = _compose(["trainer=ddp"]).trainer
    assert (ddp.strategy, ddp.accelerator, ddp.devices, ddp.sync_batchnorm) == ("ddp", "gpu", -1, False)
    cpu = _compose(["trainer=ddp_cpu"]).trainer
    assert (cpu.strategy, cpu.accelerator, cpu.devices, cpu.sync_batchnorm) == ("ddp_spawn", "cpu", 2, False)
    multi = _compose(["trainer=ddp_multinode", "trainer.num_nodes=4"]).trainer
    assert (multi.strategy, multi.num_nodes) == ("ddp", 4)
    cfg = _compose([])
    assert cfg.model.mask_seed == cfg.seed and cfg.model.sync_bn is True
    assert (cfg.model.packed_views, cfg.model.compile) == (False, False)


def test_fsdp_config_wraps_every_block_and_head():
    trainer_cfg = _compose(["trainer=fsdp"]).trainer
    strategy = instantiate(trainer_cfg.strategy)
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    assert set(policy._module_classes) == {Block, ProjectionHead}
    assert trainer_cfg.precision == "bf16-mixed" and trainer_cfg.sync_batchnorm is False


def test_hparams_search_config_is_a_multirun_over_mask_ratio_and_prototypes():
    cfg = _compose(["+hparams_search=digits"], hydra_cfg=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert set(cfg.hydra.sweeper.params) == {"model.mask_ratio", "model.num_prototypes"}
    assert cfg.name == "digits_sweep" and cfg.data.name == "digits"


@pytest.mark.slow
def test_multirun_with_two_processes_per_job_writes_each_job_to_its_own_folder(tmp_path):
    """``--multirun`` over 2 values, 2 gloo processes per job, started from inside each job.

    ``ddp_fork`` instead of the ``ddp_spawn`` of ``trainer=ddp_cpu`` only to skip the fresh
    imports of spawned processes; both start the processes from inside the job.
    """
    cmd = [
        sys.executable,
        str(Path(CONFIG_DIR).parent / "train.py"),
        "--multirun",
        f"hydra.sweep.dir={tmp_path}",
        "trainer=ddp_cpu",
        "trainer.strategy=ddp_fork",
        "trainer.max_steps=2",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "data.batch_size=8",
        "model.head.hidden_dim=64",
        "model.num_prototypes=32",
        "lowshot.enabled=false",
        "report.enabled=false",
        "model.mask_ratio=0.1,0.2",
    ]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, ratio in ((0, 0.1), (1, 0.2)):
        run_dir = tmp_path / str(job)
        assert f"model.mask_ratio={ratio}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
        state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert state["global_step"] == 2 and state["hyper_parameters"]["mask_ratio"] == ratio
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["0", "1"]
