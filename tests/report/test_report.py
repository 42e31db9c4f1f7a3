"""The visual report: every figure and the page from a checkpoint's run folder, unlabelled data,
checkpoints without prototypes, the curves' reader and the loggers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from msn.checks import ConfigError
from msn.cli.evaluate import evaluate
from msn.eval.reports import build_evaluation, plot_lowshot
from msn.report import PAGE, REPORT_DIR, ReportEvaluation, log_report_images
from msn.report.curves import moving_average, plot_curves, read_metrics
from msn.report.page import lowshot_html
from tests.helpers import composed, tiny_module

FIGURES = ["attention.png", "embedding.png", "prototypes.png", "curves.png", "lowshot.png"]
METRICS = """epoch,schedule/lr,step,train/ce,train/loss,train/me_max,online/knn
0,0.001,4,5.5,5.6,0.01,
0,0.002,9,5.0,5.2,0.02,
0,,9,,,,41.5
1,0.003,14,4.0,4.1,0.03,
1,0.0031,14,3.9,4.0,0.03,
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as train.py leaves it: a checkpoint, metrics.csv, lowshot.json/png, the config."""
    run = tmp_path_factory.mktemp("run")
    model = tiny_module(num_prototypes=8, mask_ratio=0.3, mask_seed=None)
    (run / "checkpoints").mkdir()
    payload = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "global_step": 14}
    torch.save(payload, run / "checkpoints" / "last.ckpt")
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text(METRICS)
    lowshot = {"MSN target encoder": {"1": {"mean": 55.5, "std": 2.5, "lambd": 0.0025}}}
    (run / "lowshot.json").write_text(json.dumps(lowshot))
    plot_lowshot({"MSN target encoder": {"k=1": (55.5, 2.5)}}, run / "lowshot.png")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("name: tiny_<run>\n")
    return run


def _cfg(out: Path, ckpt: Path, *overrides: str):
    return composed(
        "finetune",
        f"output_dir={out}",
        f"ckpt={ckpt}",
        "mode=report",
        "report.attention_images=4",
        "report.max_images=120",
        "report.embedding=tsne",
        *overrides,
    )


def test_report_mode_draws_every_figure_and_the_page(run_dir, tmp_path):
    out = evaluate(_cfg(tmp_path, run_dir / "checkpoints" / "last.ckpt"))
    report = tmp_path / REPORT_DIR
    assert f"{report / PAGE} ({', '.join(FIGURES)})" in out["report"]
    for name in FIGURES:
        with Image.open(report / name) as image:
            assert image.format == "PNG" and min(image.size) > 200, name
    record = json.loads((report / "report.json").read_text())
    assert record["step"] == 14 and record["labelled"] and record["images"] == 120
    assert record["feature_dim"] == 96 and 1 <= record["rankme"] <= 96
    assert 1 <= record["prototypes_used"] <= record["num_prototypes"] == 8
    assert record["figures"] == FIGURES and record["skipped"] == []
    page = (report / PAGE).read_text()
    for name in FIGURES:
        assert f'<img src="{name}"' in page
    assert "55.5 ± 2.5" in page and "k=1" in page  # the run's low-shot table
    assert "name: tiny_&lt;run&gt;" in page  # its config, escaped
    assert "MSN report: digits, step 14" in page


def test_unlabelled_data_gives_a_one_colour_map(run_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"{i}.png")
    data = ["data=imagefolder", f"data.root={folder}", "data.in_chans=1", "data.mean=[0.5]", "data.std=[0.5]"]
    out = evaluate(_cfg(tmp_path / "out", run_dir / "checkpoints" / "last.ckpt", *data))
    record = json.loads((tmp_path / "out" / REPORT_DIR / "report.json").read_text())
    assert not record["labelled"] and record["images"] == 12
    assert "embedding.png" in out["report"]
    assert "the data has no labels" in (tmp_path / "out" / REPORT_DIR / PAGE).read_text()
    # The other modes still refuse unlabelled data.
    with pytest.raises(ValueError, match="label"):
        evaluate(
            composed(
                "finetune", f"output_dir={tmp_path}", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", *data
            )
        )


def test_a_checkpoint_without_prototypes_or_run_records(tmp_path):
    # timm weights: an encoder only, in a folder with nothing else.
    vit = tiny_module().target_encoder
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    out = evaluate(_cfg(tmp_path / "out", tmp_path / "vit.pth", "strict=false"))
    assert "attention.png, embedding.png)" in out["report"]
    assert "not drawn: prototypes.png: the checkpoint (timm) holds no prototypes" in out["report"]
    assert "not drawn: curves.png: no metrics.csv in" in out["report"]
    page = (tmp_path / "out" / REPORT_DIR / PAGE).read_text()
    assert "Not in this report" in page and "no lowshot.json in" in page
    assert "not recorded in the checkpoint" in page  # timm weights say nothing of their step
    assert json.loads((tmp_path / "out" / REPORT_DIR / "report.json").read_text())["step"] is None


def test_a_file_of_another_kind_gets_the_message_of_the_other_modes(tmp_path):
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    messages = []
    for mode in ("report", "lowshot"):
        with pytest.raises(ValueError) as err:
            evaluate(_cfg(tmp_path, tmp_path / "junk.ckpt", f"mode={mode}"))
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "not a readable PyTorch checkpoint" in messages[0]


def test_bad_report_values_are_config_errors(tmp_path):
    node = composed("finetune", "ckpt=x").report
    assert type(build_evaluation("report", node)) is ReportEvaluation
    node.embedding = "pca"
    node.max_images = 2
    with pytest.raises(ConfigError) as err:
        build_evaluation("report", node)
    assert err.value.problems == [
        "report.max_images must be an integer >= 4, got 2",
        "report.embedding='pca' is unknown; allowed: auto, umap, tsne",
    ]


def test_read_metrics_keeps_the_last_value_of_a_step_and_skips_empty_cells(tmp_path):
    (tmp_path / "metrics.csv").write_text(METRICS)
    metrics = read_metrics(tmp_path / "metrics.csv")
    steps, loss = metrics["train/loss"]
    assert steps.tolist() == [4, 9, 14] and loss.tolist() == [5.6, 5.2, 4.0]  # step 14 logged twice
    assert metrics["online/knn"][0].tolist() == [9] and metrics["online/knn"][1].tolist() == [41.5]
    assert "epoch" not in metrics
    plot_curves(metrics, tmp_path / "curves.png", title="t")
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="none of the metrics"):
        plot_curves({"other": (np.arange(3), np.ones(3))}, tmp_path / "x.png", title="t")


def test_moving_average_against_a_loop():
    values = np.random.default_rng(0).normal(size=50)
    got = moving_average(values, 7)
    expected = [values[max(0, i - 3) : i + 4].mean() for i in range(50)]
    np.testing.assert_allclose(got, expected)
    assert moving_average(values, 1) is values


def test_lowshot_table_is_escaped_and_heads_k_columns():
    table = lowshot_html({"<b>row</b>": {"5": {"mean": 1.25, "std": 0.5}, "10%": {"mean": 2.0, "std": 0.0}}})
    assert "&lt;b&gt;row&lt;/b&gt;" in table and "<th>k=5</th>" in table and "<th>10%</th>" in table
    assert "1.2 ± 0.5" in table or "1.3 ± 0.5" in table


def test_report_images_go_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = tmp_path / "report"
    report.mkdir()
    for name, size in (("attention", (40, 30)), ("curves", (20, 10))):
        Image.new("RGB", size, (200, 10, 10)).save(report / f"{name}.png")
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    assert log_report_images([logger], report, step=7) == ["tensorboard"]
    logger.finalize("success")
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert sorted(events.Tags()["images"]) == ["report/attention", "report/curves"]
    image = events.Images("report/attention")[0]
    assert image.step == 7 and (image.width, image.height) == (40, 30)
