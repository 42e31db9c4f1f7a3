"""Tests for msn.eval.reports's low-shot report: percent subsets, lambda lists, official subset files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import Subset, TensorDataset

from msn.checks import ConfigError
from msn.cli.common import CONFIG_DIR
from msn.data import build_dataset, eval_transform
from msn.eval.lowshot import format_table
from msn.eval.reports import (
    EvalRun,
    LowShotEvaluation,
    build_evaluation,
    lowshot_json_keys,
    lowshot_report,
    plot_lowshot,
)
from msn.eval.splits import dataset_file_paths


class DummyModel:
    """The part of ``MSNModule`` the report uses: ``features``, ``eval()``, ``device``."""

    device = torch.device("cpu")

    def __init__(self, in_dim: int, dim: int = 8, seed: int = 0) -> None:
        self.proj = torch.randn(in_dim, dim, generator=torch.Generator().manual_seed(seed))

    def eval(self) -> DummyModel:
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.proj


def blob_dataset(n_classes: int, per_class: int, seed: int) -> TensorDataset:
    """``(1, 3, 3)`` images: noisy class templates, so the task is learnable but not trivial."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(n_classes, 1, 3, 3, generator=torch.Generator().manual_seed(123))
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = templates[y] + 1.5 * torch.randn(len(y), 1, 3, 3, generator=g)
    return TensorDataset(x, y)


def _cfg(**overrides):
    """configs/eval/lowshot.yaml with small settings and ``overrides``."""
    base = OmegaConf.load(CONFIG_DIR / "eval" / "lowshot.yaml")
    small = {"shots": [1, 2], "seeds": [0, 1], "batch_size": 16, "random_init": False}
    return OmegaConf.merge(base, small, overrides)


def lowshot_from_config(model, train, test, cfg, *, dataset, seed, output_dir):
    """The low-shot evaluation of ``cfg`` run on ``model`` (held in memory, as train.py's)."""
    run = EvalRun(train, test, dataset=dataset, output_dir=output_dir, seed=seed, preloaded=model)
    return build_evaluation("lowshot", cfg)(run)


def _header(table: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith("| features"))
    return [c.strip() for c in line.strip("|").split("|")]


def _rows(table: str) -> list[str]:
    return [line.split("|")[1].strip() for line in table.splitlines()[4:]]


@pytest.fixture(scope="module")
def data():
    return blob_dataset(3, 10, seed=0), blob_dataset(3, 12, seed=1)


def test_default_config_output_unchanged(data, tmp_path):
    train, test = data
    table = lowshot_from_config(
        DummyModel(9), train, test, _cfg(), dataset="toy", seed=0, output_dir=tmp_path
    )
    assert table.splitlines()[0] == (
        "Low-shot accuracy (%), toy: logistic regression on k labelled images per class, "
        "mean ± std over 2 splits, 36 test images"
    )
    assert _header(table) == ["features", "k=1", "k=2"]
    assert _rows(table) == ["MSN target encoder", "raw pixels"]
    payload = json.loads((tmp_path / "lowshot.json").read_text())
    assert list(payload) == ["MSN target encoder", "raw pixels"]
    assert list(payload["raw pixels"]) == ["1", "2"]
    assert payload["MSN target encoder"]["1"]["lambd"] == 0.0025
    # Same table as the int-keyed (pre-extension) rendering of the same numbers.
    int_keyed = {
        name: {int(k): (v["mean"], v["std"]) for k, v in row.items()} for name, row in payload.items()
    }
    assert format_table(int_keyed, title=table.splitlines()[0]) == table
    assert (tmp_path / "lowshot.png").read_bytes().startswith(b"\x89PNG")


def test_percents_and_lambda_list(data, tmp_path):
    train, test = data
    cfg = _cfg(shots=[2, 1], percents=[10, 50], lambd=[0.0025, 1.0])
    table = lowshot_from_config(DummyModel(9), train, test, cfg, dataset="toy", seed=0, output_dir=tmp_path)
    assert _header(table) == ["features", "k=1", "k=2", "10%", "50%"]
    msn_rows = ["MSN target encoder (λ=0.0025)", "MSN target encoder (λ=1)"]
    assert _rows(table) == [*msn_rows, "raw pixels"]
    payload = json.loads((tmp_path / "lowshot.json").read_text())
    assert list(payload) == [*msn_rows, "raw pixels"]
    for name, lam in [(msn_rows[0], 0.0025), (msn_rows[1], 1.0), ("raw pixels", 0.0025)]:
        assert list(payload[name]) == ["1", "2", "10%", "50%"]
        assert all(v["lambd"] == lam and 0 <= v["mean"] <= 100 for v in payload[name].values())
    assert sorted(lowshot_json_keys(cfg.shots, cfg.percents)) == sorted(payload[msn_rows[0]])
    # 10% of 10 images is 1 per class, i.e. the same subsets as k=1 (nested, same seeds).
    assert payload[msn_rows[0]]["10%"] == payload[msn_rows[0]]["1"]
    # A single lambda equals the corresponding row of the sweep.
    single = tmp_path / "single"
    lowshot_from_config(
        DummyModel(9), train, test, _cfg(percents=[50], lambd=1.0), dataset="toy", seed=0, output_dir=single
    )
    one = json.loads((single / "lowshot.json").read_text())["MSN target encoder"]
    assert one["50%"] == payload[msn_rows[1]]["50%"] and one["2"] == payload[msn_rows[1]]["2"]


def test_report_input_errors(data, tmp_path):
    train, test = data
    kw = {"seeds": [0], "batch_size": 8, "title": "t", "output_dir": tmp_path, "raw_pixels": False}
    model = DummyModel(9)
    with pytest.raises(ValueError, match=r"\(0, 100\]"):
        lowshot_report(model, train, test, shots=[1], lambd=0.1, percents=[0], **kw)
    with pytest.raises(ValueError, match=r"\(0, 100\]"):
        lowshot_report(model, train, test, shots=[1], lambd=0.1, percents=[101], **kw)
    with pytest.raises(ValueError, match="lowshot.lambd"):
        lowshot_report(model, train, test, shots=[1], lambd=[], **kw)
    with pytest.raises(ValueError, match="lowshot.lambd"):
        lowshot_report(model, train, test, shots=[1], lambd=[0.1, 0.0], **kw)
    with pytest.raises(ValueError, match="class 0 has only 10"):
        lowshot_report(model, train, test, shots=[11], lambd=0.1, **kw)
    with pytest.raises(ValueError, match=r"lowshot.subset_files: no such subset file .*missing.txt"):
        lowshot_report(
            model, train, test, shots=[1], lambd=0.1, subset_files=[tmp_path / "missing.txt"], **kw
        )
    (tmp_path / "s.txt").write_text("a_1.png\n")
    with pytest.raises(
        ValueError, match=r"lowshot.subset_files needs a dataset with file names \(data=imagefolder\)"
    ):
        lowshot_report(model, train, test, shots=[1], lambd=0.1, subset_files=[tmp_path / "s.txt"], **kw)


@pytest.fixture
def folder(tmp_path):
    """``root/{a,b}/{a,b}_{0..5}.png``: 8x8 grey images, class ``b`` brighter than ``a``."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c, base in (("a", 40), ("b", 200)):
        (root / c).mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(base + rng.normal(0, 20, size=(8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / c / f"{c}_{i}.png")
    return root


def test_subset_files_on_imagefolder(folder, tmp_path):
    tf = eval_transform(8, in_chans=1, mean=[0.5], std=[0.5], crop_pct=1.0)
    ds = build_dataset("imagefolder", split="all", root=str(folder), transform=tf, in_chans=1)
    paths = dataset_file_paths(ds)
    assert paths is not None and len(paths) == 12
    assert dataset_file_paths(Subset(ds, [3, 0])) == [paths[3], paths[0]]
    files = tmp_path / "splits"
    files.mkdir()
    (files / "1img.txt").write_text("a_2.png\n\nb_5.png\n")
    (files / "2img.txt").write_text("a_2.png\na_4.png\nb_5.png\nb_0.png\n")
    cfg = _cfg(shots=[1], percents=[50], subset_files=[str(files / "1img.txt"), str(files / "2img.txt")])
    out = tmp_path / "out"
    table = lowshot_from_config(DummyModel(64), ds, ds, cfg, dataset="folder", seed=0, output_dir=out)
    assert _header(table) == ["features", "k=1", "50%", "1img", "2img"]
    payload = json.loads((out / "lowshot.json").read_text())
    assert list(payload["MSN target encoder"]) == ["1", "50%", "1img", "2img"]
    assert lowshot_json_keys(cfg.shots, cfg.percents, cfg.subset_files) == ["1", "50%", "1img", "2img"]
    for row in payload.values():
        assert row["1img"]["std"] == 0.0 and row["2img"]["std"] == 0.0
        assert 0 <= row["1img"]["mean"] <= 100
    # Names that are not in the dataset: how many, and the first five.
    (files / "bad.txt").write_text("a_1.png\n" + "".join(f"n0_{i}.JPEG\n" for i in range(6)))
    with pytest.raises(ValueError, match=r"6 of 7 image name\(s\) are not in the dataset.*n0_4.JPEG'\]"):
        lowshot_from_config(
            DummyModel(64),
            ds,
            ds,
            _cfg(subset_files=[str(files / "bad.txt")]),
            dataset="folder",
            seed=0,
            output_dir=out,
        )


def test_plot_skips_non_shot_columns(tmp_path):
    results = {
        "MSN": {"k=1": (50.0, 1.0), "k=5": (60.0, 2.0), "10%": (70.0, 0.5), "file": (65.0, 0.0)},
        "only files": {"file": (10.0, 0.0)},
    }
    path = plot_lowshot(results, tmp_path / "p.png", title="x")
    assert path.read_bytes().startswith(b"\x89PNG")
    plot_lowshot({"only files": {"file": (10.0, 0.0)}}, tmp_path / "q.png")
    assert (tmp_path / "q.png").exists()


class CountingModel(DummyModel):
    """Counts the images it encodes."""

    seen = 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return super().features(x)


def test_only_the_k_shot_pool_of_the_train_split_is_encoded(tmp_path):
    from msn.eval.lowshot import lowshot_eval_splits, lowshot_splits

    train, test = blob_dataset(4, 50, seed=1), blob_dataset(4, 10, seed=2)
    model = CountingModel(9)
    kw = {"seeds": [0, 1, 2], "batch_size": 16, "title": "t", "output_dir": tmp_path, "raw_pixels": False}
    lowshot_report(model, train, test, shots=[1, 2], lambd=0.1, **kw)
    # At most 2 images per class and split over 3 splits, of 200: not the whole split.
    assert model.seen <= 4 * 2 * 3 + len(test) and model.seen < len(train)
    payload = json.loads((tmp_path / "lowshot.json").read_text())["MSN target encoder"]
    # The same numbers as encoding everything.
    x, y = train.tensors
    full_x = DummyModel(9).features(x).numpy()
    test_x = DummyModel(9).features(test.tensors[0]).numpy()
    splits = lowshot_splits(y.numpy(), [1, 2], [], [0, 1, 2])
    expected = lowshot_eval_splits(full_x, y.numpy(), test_x, test.tensors[1].numpy(), splits, [0.1])[0.1]
    for column, key in (("k=1", "1"), ("k=2", "2")):
        assert payload[key]["mean"] == pytest.approx(expected[column][0], abs=1e-9)


def test_lowshot_evaluation_is_built_from_its_yaml():
    evaluation = build_evaluation("lowshot", OmegaConf.load(CONFIG_DIR / "eval" / "lowshot.yaml"))
    assert isinstance(evaluation, LowShotEvaluation)
    assert (evaluation.shots, evaluation.seeds, evaluation.lambd) == ([1, 2, 5], [0, 1, 2], 0.0025)
    assert evaluation.random_init and evaluation.raw_pixels and evaluation.enabled
    assert evaluation.json_keys() == ["1", "2", "5"]
    # null lists are empty ones
    assert build_evaluation("lowshot", _cfg(percents=None, subset_files=None)).percents == []


def test_lowshot_evaluation_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        LowShotEvaluation(
            shots=[0, 2],
            seeds=[],
            lambd=[0.1, -1],
            batch_size=8,
            random_init=False,
            raw_pixels=False,
            percents=[150],
        )
    assert err.value.problems == [
        "lowshot.shots=[0, 2] must be a non-empty list of integers >= 1",
        "lowshot.lambd=[0.1, -1] must be a number > 0 or a non-empty list of them",
        "lowshot.seeds must be non-empty",
        "percent (lowshot.percents) must be a number in (0, 100], got 150",
    ]
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        build_evaluation("lowshot", _cfg(shots=[]))
    build_evaluation("lowshot", _cfg(shots=[], percents=[10]))  # percents alone are a table
    # a misspelt key names the config node
    with pytest.raises(ConfigError, match="lowshot: .*unexpected keyword argument 'shot'"):
        build_evaluation("lowshot", OmegaConf.merge(_cfg(), {"shot": [1]}))
