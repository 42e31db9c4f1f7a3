"""Every config composes and validates; invalid values stop before any compute with one message."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from msn.checks import ConfigError
from msn.cli.common import CONFIG_DIR
from msn.training.config import validate_config

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# (arch, patch, mask ratio, epochs) of the paper recipes
PAPER = {
    "msn_vits16": ("vit_small", 16, 0.15, 800),
    "msn_vitb16": ("vit_base", 16, 0.3, 600),
    "msn_vitl16": ("vit_large", 16, 0.5, 600),
    "msn_vitb4": ("vit_base", 4, 0.7, 300),
    "msn_vitl7": ("vit_large", 7, 0.7, 200),
}


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=["output_dir=/tmp/unused", "name=test", *overrides])


def test_all_experiments_listed():
    assert {"digits", "fmnist_cpu", *PAPER} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(experiment, tmp_path):
    root = [] if experiment == "digits" else [f"data.root={tmp_path}"]  # digits is bundled: no folder
    cfg = _compose([f"experiment={experiment}", *root])
    validate_config(cfg, environment=False)  # the paper recipes ask for GPUs this machine may not have
    assert cfg.model.encoder.img_size == cfg.data.transform.rand_size
    assert cfg.model.rand_views == cfg.data.transform.rand_views


@pytest.mark.parametrize("experiment", sorted(PAPER))
def test_paper_recipes_match_reference(experiment, tmp_path):
    cfg = _compose([f"experiment={experiment}", f"data.root={tmp_path}"])
    arch, patch, ratio, epochs = PAPER[experiment]
    assert (cfg.model.encoder.arch, cfg.model.encoder.patch_size) == (arch, patch)
    assert (cfg.model.mask_ratio, cfg.trainer.max_epochs) == (ratio, epochs)
    t = cfg.data.transform
    assert (t.rand_size, t.focal_size, t.rand_views, t.focal_views) == (224, 96, 1, 10)
    assert list(t.rand_scale) == [0.3, 1.0] and list(t.focal_scale) == [0.05, 0.3]
    assert (t.color_jitter, t.color_jitter_p, t.grayscale_p, t.blur_p, t.hflip_p) == (0.5, 0.8, 0.2, 0.5, 0.5)
    m = cfg.model
    assert (m.num_prototypes, m.head.hidden_dim, m.head.out_dim, m.mask_mode, m.mask_focal) == (
        1024,
        2048,
        256,
        "shared",
        False,
    )
    assert (m.loss.temperature, m.loss.sharpen_temperature, m.loss.sinkhorn_iterations) == (0.1, 0.25, 3)
    assert (m.loss.me_max_weight, m.loss.entropy_weight) == (1.0, 0.0)
    o = m.optim
    assert (o.start_lr, o.ref_lr, o.final_lr, o.warmup_epochs) == (2e-4, 1e-3, 1e-6, 15)
    assert (o.ref_wd, o.final_wd, o.clip_grad, o.schedule_scale) == (0.04, 0.4, 3.0, 1.25)
    assert list(m.ema) == [0.996, 1.0] and cfg.data.batch_size == 64
    assert cfg.trainer.precision == "32-true"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.mask_ratio=1.0"], "model.mask_ratio=1.0 must be a number in [0, 1)"),
        (["model.mask_ratio=-0.1"], "model.mask_ratio=-0.1 must be a number in [0, 1)"),
        (
            ["data.transform.focal_views=2", "data.transform.focal_size=2"],
            "data.transform.focal_size=2 is smaller than one patch (model.encoder.patch_size=8); use a "
            "larger focal crop or data.transform.focal_views=0",
        ),
        (["model.num_prototypes=0"], "model.num_prototypes=0 must be an integer >= 1"),
        (["trainer.max_steps=-5"], "trainer.max_steps=-5 must be -1 (no step limit) or an integer >= 1"),
        (["trainer.max_steps=abc"], "trainer.max_steps='abc' must be -1 (no step limit) or an integer >= 1"),
        (
            ["trainer.precision=abc"],
            "trainer.precision='abc' is unknown; allowed: 64, 32, 16, transformer-engine, "
            "transformer-engine-float16, 16-true, 16-mixed, bf16-true, bf16-mixed, 32-true, 64-true, bf16, "
            "auto",
        ),
        (
            ["data.root=/some/folder"],
            "data.root='/some/folder' is given, but data=digits is bundled and reads no folder; for your "
            "own images use data=imagefolder data.root=...",
        ),
        (
            ["model.encoder.patch_size=7"],
            "data.transform.rand_size=16 is not a multiple of model.encoder.patch_size=7: the last 2 pixel "
            "rows and columns would be dropped",
        ),
        (
            ["data=imagefolder", "data.root=/no/such/folder"],
            "data.root='/no/such/folder' does not exist or is not a folder (data=imagefolder)",
        ),
        (["data=imagefolder"], "data.root is required for data=imagefolder (a folder of images)"),
        (
            ["model.encoder.arch=vit_gigantic"],
            "model.encoder.arch='vit_gigantic' is unknown; allowed: vit_nano, vit_micro, vit_tiny, "
            "vit_small, vit_base, vit_large, vit_huge",
        ),
        (
            ["model.encoder.patch_size=5"],
            "model.encoder.patch_size=5 is not supported; allowed: (2, 4, 7, 8, 14, 16)",
        ),
        (
            ["data.batch_size=1"],
            "data.batch_size=1 with BatchNorm in the projection head (model.head.use_bn=true): batch "
            "statistics of one sample are undefined; use data.batch_size >= 2 or model.head.use_bn=false",
        ),
        (
            ["data.name=mnist3d"],
            "data.name='mnist3d' is unknown; allowed: digits, fashion_mnist, cifar10, cifar100, stl10, "
            "imagefolder, hf, litdata",
        ),
        (["model.mask_mode=blocks"], "model.mask_mode='blocks' is unknown; allowed: shared, per_sample"),
        (["lowshot.shots=[0]"], "lowshot.shots=[0] must be a non-empty list of integers >= 1"),
        (["lowshot.lambd=0"], "lowshot.lambd=0 must be a number > 0 or a non-empty list of them"),
        (
            ["lowshot.lambd=[0.1,-1]"],
            "lowshot.lambd=[0.1, -1] must be a number > 0 or a non-empty list of them",
        ),
        (["report.embedding=pca"], "report.embedding='pca' is unknown; allowed: auto, umap, tsne"),
        (["report.max_images=0"], "report.max_images must be an integer >= 4, got 0"),
        (["ckpt_path=/no/such.ckpt"], "ckpt_path='/no/such.ckpt': no such checkpoint file"),
        (["init_from=/no/such.ckpt"], "init_from='/no/such.ckpt': no such checkpoint file"),
        # ranges
        (["model.loss.temperature=0"], "model.loss.temperature=0 must be a number > 0"),
        (["model.optim.ref_lr=-1"], "model.optim.ref_lr=-1 must be a number >= 0"),
        (["model.ema=[0.9,1.5]"], "model.ema=[0.9, 1.5] must be [start, end] momentums in [0, 1]"),
        (
            ["data.num_workers=-2"],
            "data.num_workers=-2 must be an integer >= 0, or -1 for one per CPU core (max 8)",
        ),
        (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0 must be an integer >= 1"),
        # failure handling
        (["data.on_bad_image=ignore"], "data.on_bad_image='ignore' is unknown; allowed: skip, raise"),
        (
            ["callbacks.resume_checkpoint.every_n_train_steps=0"],
            "callbacks.resume_checkpoint.every_n_train_steps=0 must be an integer >= 1",
        ),
        (
            ["callbacks.resume_checkpoint.keep_last=-1"],
            "callbacks.resume_checkpoint.keep_last=-1 must be an integer >= 0",
        ),
        (
            ["callbacks.preemption.signals=[SIGTERM,SIGNOPE]"],
            "callbacks.preemption.signals: 'SIGNOPE' is not a signal name (e.g. SIGTERM)",
        ),
        (
            ["~callbacks.resume_checkpoint"],
            "callbacks.preemption needs callbacks.resume_checkpoint (the checkpoint it saves on a signal)",
        ),
        (
            ["callbacks.nonfinite.on_nonfinite=ignore"],
            "callbacks.nonfinite.on_nonfinite='ignore' is unknown; allowed: stop, skip_step",
        ),
        (
            ["callbacks.nonfinite.max_consecutive_skips=-1"],
            "callbacks.nonfinite.max_consecutive_skips=-1 must be an integer >= 0",
        ),
        (
            ["callbacks.collapse.min_fraction=1.5"],
            "callbacks.collapse.min_fraction=1.5 must be a number in [0, 1]",
        ),
        (["callbacks.collapse.patience=0"], "callbacks.collapse.patience=0 must be an integer >= 1"),
        # this machine
        (
            ["trainer.devices=0"],
            "trainer.devices=0 must be an integer >= 1, -1 (all), a list of indices or auto",
        ),
        (["trainer.num_nodes=0"], "trainer.num_nodes=0 must be an integer >= 1"),
        # sweeps
        (["optimized_metric=3"], "optimized_metric='3' is not a low-shot column; allowed: 1, 2, 5"),
        (
            ["optimized_metric=1", "lowshot.enabled=false"],
            "optimized_metric='1' needs lowshot.enabled=true (it is read from that table)",
        ),
    ],
)
def test_invalid_config_messages(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate_config(_compose(overrides))
    assert err.value.problems == [message]


@pytest.mark.parametrize(
    ("visible", "overrides", "message"),
    [
        (
            0,
            ["trainer.accelerator=gpu"],
            "trainer.accelerator=gpu but no CUDA GPU is visible on this machine; use trainer=cpu "
            "(or trainer.accelerator=cpu)",
        ),
        (
            2,
            ["trainer.accelerator=gpu", "trainer.devices=4"],
            "trainer.devices=4 but only 2 GPU(s) are visible on this machine",
        ),
        (
            2,
            ["trainer.accelerator=cuda", "trainer.devices=[1,2]"],
            "trainer.devices=[1, 2]: the visible GPUs are 0..1",
        ),
        (0, ["trainer.accelerator=mps"], "trainer.accelerator=mps but MPS is not available on this machine"),
    ],
)
def test_devices_must_exist(monkeypatch, visible, overrides, message):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        validate_config(_compose(overrides))
    assert err.value.problems == [message]
    validate_config(_compose(overrides), environment=False)  # fine for another machine


def test_output_dir_must_be_writable(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError) as err:
        validate_config(_compose([f"output_dir={tmp_path}/a_file/run"]))
    assert err.value.problems == [
        f"output_dir='{tmp_path}/a_file/run' is not writable: '{tmp_path}/a_file' is a file, not a folder"
    ]
    validate_config(_compose([f"output_dir={tmp_path}/new/run"]))  # created later: its parent is writable
    assert not (tmp_path / "new").exists()  # validation writes nothing


def test_ckpt_path_last_is_resolved_later_not_rejected():
    validate_config(_compose(["ckpt_path=last"]))


def test_lambda_sweep_is_valid():
    validate_config(_compose(["lowshot.lambd=[0.001,0.0025,0.01]", "lowshot.percents=[1,10]"]))


def test_batch_size_one_is_fine_without_batchnorm():
    validate_config(_compose(["data.batch_size=1", "model.head.use_bn=false"]))


@pytest.mark.parametrize(
    ("overrides", "messages"),
    [
        # model.encoder.img_size follows the crop size: the encoder's own rule and the crop rule.
        (
            ["data.transform.rand_size=3"],
            [
                "model.encoder.img_size=3 is smaller than one patch (patch_size=8)",
                "data.transform.rand_size=3 is smaller than one patch (model.encoder.patch_size=8)",
            ],
        ),
        (
            ["data.transform.rand_views=0"],
            [
                "model.rand_views=0 must be an integer >= 1",
                "data.transform.rand_views must be an integer >= 1, got 0",
            ],
        ),
        # Rules that only the constructors knew of are reported before anything is built too.
        (["model.head.out_dim=0"], ["model.head.out_dim=0 must be an integer >= 1"]),
        (["+model.foo=1"], ["model: got an unexpected keyword argument 'foo'"]),
        (
            ["+data.train_split=val"],
            ["data.train_split must be one of ['train', 'test', 'all'] for 'digits', got 'val'"],
        ),
        (["data.transform.blur_p=2"], ["data.transform.blur_p must be a probability in [0, 1], got 2"]),
        (
            ["callbacks.resume_checkpoint.save_last=link", "callbacks.resume_checkpoint.keep_last=0"],
            ["callbacks.resume_checkpoint.save_last='link' needs keep_last >= 1 (a step file to link to)"],
        ),
        (
            ["callbacks=online_eval", "callbacks.online_eval.collapse_fraction=2"],
            ["callbacks.online_eval.collapse_fraction=2 must be a number in [0, 1]"],
        ),
    ],
)
def test_owners_report_their_rules(overrides, messages):
    with pytest.raises(ConfigError) as err:
        validate_config(_compose(overrides))
    assert err.value.problems == messages


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        validate_config(_compose(["model.mask_ratio=2", "model.num_prototypes=0", "data.batch_size=1"]))
    assert len(err.value.problems) == 3


def test_defaults_are_the_digits_experiment():
    cfg = _compose()
    assert cfg.data.name == "digits" and cfg.model.encoder.arch == "vit_nano"
    assert Path(CONFIG_DIR / "train.yaml").is_file()
