"""End-to-end runs of train.py (subprocess, as a user runs it)."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from PIL import Image

from msn.checks import ConfigError
from msn.cli.train import objective_value, run_evaluation
from msn.eval.reports import EvalRun, LowShotEvaluation, build_evaluation
from tests.helpers import FAST, composed, tiny_module

ROOT = Path(__file__).resolve().parents[2]


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}", *FAST, *overrides]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_step_run_checkpoints_and_prints_lowshot_table(tmp_path):
    report = [
        "report.enabled=true",
        "report.attention_images=4",
        "report.max_images=100",
        "report.embedding=tsne",
    ]
    proc = _train(tmp_path, "logger=many", *report)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MSN target encoder" in proc.stdout and "raw pixels" in proc.stdout
    # The visual report comes last, its images also in TensorBoard.
    figures = "attention.png, embedding.png, prototypes.png, curves.png, lowshot.png"
    assert f"report: {tmp_path / 'report' / 'index.html'} ({figures})" in proc.stdout
    assert "images also logged to tensorboard" in proc.stdout
    assert json.loads((tmp_path / "report" / "report.json").read_text())["step"] == 2
    shutil.rmtree(tmp_path / "report")
    # The effective recipe comes first.
    assert "recipe digits (experiment=digits):" in proc.stdout
    assert "model    vit_nano/8 (96 wide, 4 blocks), head 64-128, 32 prototypes" in proc.stdout
    assert "batch    16 x 1 process(es) x 1 accumulated = 16 per step" in proc.stdout
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    keys = state["state_dict"].keys()
    assert {"prototypes", "encoder.cls_token", "target_encoder.cls_token", "head.fc1.weight"} <= set(keys)
    table = json.loads((tmp_path / "lowshot.json").read_text())
    assert set(table) == {"MSN target encoder", "random init", "raw pixels"}
    assert 0 <= table["raw pixels"]["1"]["mean"] <= 100
    metrics = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0]
    for name in (
        "train/loss",
        "train/me_max",
        "train/num_prototypes_used",
        "schedule/lr",
        "schedule/momentum",
    ):
        assert name in metrics

    # ckpt_path=last resumes from this run dir and continues the step count
    proc = _train(
        tmp_path,
        "logger=many",
        "ckpt_path=last",
        "trainer.max_steps=4",
        "trainer.max_epochs=2",
        "lowshot.enabled=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 4
    assert not (tmp_path / "report").exists()  # report.enabled=false (FAST)
    # The console holds what a user needs: no advertising, no warnings about Lightning internals.
    for text in ("Tip:", "deprecated", "Be aware that", "dirpath has changed"):
        assert text not in proc.stdout + proc.stderr, text


def test_progress_bar_counts_epochs_from_one_and_names_a_step_limit():
    from types import SimpleNamespace

    from msn.cli.console import TrainingProgressBar

    bar = TrainingProgressBar()
    for (epochs, steps), label in (
        ((100, -1), "Epoch 3/100"),
        ((100, 50), "Epoch 3, step limit 50"),  # 50 steps end the run long before 100 epochs
        ((5, 500), "Epoch 3/5"),  # 500 steps would take 12 epochs: the epochs end it
        ((-1, 50), "Epoch 3, step limit 50"),
    ):
        trainer = SimpleNamespace(
            max_epochs=epochs, max_steps=steps, num_training_batches=42, accumulate_grad_batches=1
        )
        bar._trainer = trainer
        assert bar._get_train_description(2) == label


@pytest.mark.slow
def test_invalid_config_stops_before_compute_with_one_message(tmp_path):
    proc = _train(tmp_path, "model.mask_ratio=1.5", "data.batch_size=1")
    assert proc.returncode == 2
    assert "model.mask_ratio=1.5 must be a number in [0, 1)" in proc.stderr
    assert "data.batch_size=1 with BatchNorm" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_multirun_sweep_writes_one_dir_per_job(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--multirun",
        f"hydra.sweep.dir={tmp_path}",
        "model.mask_ratio=0.1,0.3",
        *FAST,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratios = []
    for job in ("0", "1"):
        ckpt = torch.load(
            tmp_path / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
        )
        ratios.append(ckpt["hyper_parameters"]["mask_ratio"])
    assert ratios == [0.1, 0.3]
    # It ends with one row per job: its overrides and its low-shot score.
    summary = proc.stdout[proc.stdout.index("Sweep of") :].splitlines()
    assert summary[1].startswith("| job | overrides | k=1 |")
    for job, ratio in (("0", 0.1), ("1", 0.3)):
        score = json.loads((tmp_path / job / "lowshot.json").read_text())["MSN target encoder"]["1"]["mean"]
        row = next(line for line in summary if line.startswith(f"| {job} |"))
        assert f"model.mask_ratio={ratio}" in row and row.endswith(f"| {score:.1f} |")


def test_end_of_training_table_is_the_lowshot_evaluation(tmp_path, monkeypatch):
    cfg = composed("train", "lowshot.shots=[1,2]", "lowshot.seeds=[0]", f"output_dir={tmp_path}")
    datamodule = instantiate(cfg.data, _convert_="all")
    model = tiny_module().eval()
    runs = []
    call = LowShotEvaluation.__call__
    monkeypatch.setattr(LowShotEvaluation, "__call__", lambda self, run: runs.append(run) or call(self, run))
    table = run_evaluation("lowshot", model, datamodule, cfg, tmp_path / "train")
    assert len(runs) == 1 and runs[0].model is model and runs[0].cache is None
    assert table.splitlines()[0].startswith("Low-shot accuracy (%), digits:")
    # What finetune.py mode=lowshot prints for the same model, from the same config node.
    train_ds, test_ds = datamodule.eval_datasets()
    run = EvalRun(train_ds, test_ds, dataset="digits", output_dir=tmp_path / "again", preloaded=model)
    assert build_evaluation("lowshot", cfg.lowshot)(run) == table
    assert (tmp_path / "train" / "lowshot.json").read_text() == (
        tmp_path / "again" / "lowshot.json"
    ).read_text()


def test_objective_value_reads_the_msn_row_of_the_lowshot_table():
    table = {
        "MSN target encoder": {"1": {"mean": 41.5, "std": 2.0, "lambd": 0.0025}, "10%": {"mean": 70.0}},
        "random init": {"1": {"mean": 20.0}},
    }
    assert objective_value(table, "1") == 41.5 and objective_value(table, "10%") == 70.0
    message = "optimized_metric='5' is not a low-shot column; this run has: 1, 10%"
    with pytest.raises(ConfigError, match=message):
        objective_value(table, "5")
    with pytest.raises(ConfigError, match="has no MSN row"):
        objective_value({"raw pixels": {"1": {"mean": 1.0}}}, "1")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
    reason='the Optuna sweeper is an extra: pip install -e ".[sweep]"',
)
def test_optuna_sweep_maximises_the_lowshot_metric(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "+hparams_search=digits_optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=3",
        f"hydra.sweep.dir={tmp_path}",
        *(o for o in FAST if not o.startswith("model.num_prototypes")),  # swept here
        "trainer.max_steps=4",
        "lowshot.random_init=false",
        "lowshot.raw_pixels=false",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores, params = [], []
    for trial in ("0", "1", "2"):
        table = json.loads((tmp_path / trial / "lowshot.json").read_text())
        scores.append(table["MSN target encoder"]["1"]["mean"])
        overrides = (tmp_path / trial / ".hydra" / "overrides.yaml").read_text()
        params.append(next(line for line in overrides.splitlines() if "model.mask_ratio=" in line))
    assert len(set(params)) == 3  # the sampler proposed three different mask ratios
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(scores))
    assert set(results["best_params"]) == {"model.mask_ratio", "model.num_prototypes", "model.optim.ref_lr"}


def _bad_folders(root: Path) -> dict[str, Path]:
    (root / "empty").mkdir()
    (root / "texts").mkdir()
    (root / "texts" / "notes.txt").write_text("not an image")
    for name in ("a", "b"):
        (root / "empty_classes" / name).mkdir(parents=True)
    return {k: root / k for k in ("empty", "texts", "empty_classes")}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "data: no images found under"),
        ("texts", "data: no images found under"),
        ("empty_classes", "data: no images found under"),
        ("png_ckpt", "is not a readable PyTorch checkpoint"),
        ("misspelt", "model: got an unexpected keyword argument 'mask_rato'"),
        ("run_dir", "hydra.run.dir='/proc/no/such' is not writable"),
        ("finetune_without_ckpt", "ckpt is required (give ckpt=...)"),
    ],
)
def test_bad_input_stops_before_compute_with_one_line_and_exit_2(tmp_path, case, message):
    folders = _bad_folders(tmp_path)
    run = [f"hydra.run.dir={tmp_path / 'run'}", *FAST]
    if case in folders:
        args = [str(ROOT / "train.py"), *run, "data=imagefolder", f"data.root={folders[case]}"]
    elif case == "png_ckpt":
        png = tmp_path / "picture.ckpt"
        Image.new("RGB", (4, 4)).save(png, format="PNG")
        args = [str(ROOT / "train.py"), *run, f"ckpt_path={png}"]
    elif case == "misspelt":
        args = [str(ROOT / "train.py"), *run, "+model.mask_rato=0.3"]
    elif case == "run_dir":
        args = [str(ROOT / "train.py"), "hydra.run.dir=/proc/no/such", *FAST]
    else:
        args = [str(ROOT / "finetune.py"), f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training
