"""benchmarks/feature_geometry.py: its spectrum and per-class figures against independent ones."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from msn.eval.lowshot import DEFAULT_SEEDS, lowshot_accuracy, lowshot_splits
from tests.artefacts import save_lightning


def _script():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "feature_geometry.py"
    spec = importlib.util.spec_from_file_location("msn_benchmark_feature_geometry", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spectrum_of_r_equal_orthogonal_directions_is_rank_r():
    """Rows +-e_i of r orthonormal directions in 40 dims: covariance = I_r / r, so rank exactly r."""
    geo = _script()
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(40, 40)))
    for r in (1, 4, 25):
        rows = np.concatenate([q[:r], -q[:r]])
        rank, top = geo.spectrum(rows)
        assert rank == pytest.approx(r, rel=1e-9)
        assert top == pytest.approx(min(r, geo.TOP) / r, rel=1e-9)


def test_spectrum_matches_the_eigenvalues_of_the_covariance():
    """A second formula: eigenvalues of the float64 covariance matrix instead of singular values."""
    geo = _script()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 30)) * np.linspace(0.1, 3.0, 30) + 5.0  # uneven variances, off-centre
    rank, top = geo.spectrum(x)
    eig = np.sort(np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False)))[::-1]
    p = eig / eig.sum()
    assert rank == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-9)
    assert top == pytest.approx(p[: geo.TOP].sum(), rel=1e-9)
    assert 1.0 < rank < 30.0


def test_per_class_kshot_agrees_with_the_lowshot_protocol():
    """Overall accuracy = mean of msn.eval.lowshot.lowshot_accuracy over the fixed splits; with equal
    test classes it is also the mean of the per-class accuracies."""
    geo = _script()
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(3, 8)) * 2.0
    train_y, test_y = np.repeat(np.arange(3), 30), np.repeat(np.arange(3), 50)
    train_x = centres[train_y] + rng.normal(size=(90, 8)) * 1.5
    test_x = centres[test_y] + rng.normal(size=(150, 8)) * 1.5
    splits = lowshot_splits(train_y, [2], (), DEFAULT_SEEDS)["k=2"]
    overall, per_class = geo.per_class_kshot(train_x, train_y, test_x, test_y, splits)
    expected = np.mean([lowshot_accuracy(train_x, train_y, test_x, test_y, 2, s) for s in DEFAULT_SEEDS])
    assert overall == pytest.approx(expected, abs=1e-9)
    assert per_class.shape == (3,)
    assert np.mean(per_class) == pytest.approx(overall, abs=1e-9)
    assert 0.0 < per_class.min() < per_class.max() <= 100.0  # noisy blobs: neither trivial nor empty


def test_script_prints_both_tables_for_a_checkpoint(pretrained, monkeypatch, capsys):
    """End to end on the bundled digits with a tiny random checkpoint: both rows, every class."""
    geo = _script()
    ckpt, _ = pretrained
    monkeypatch.setattr(sys, "argv", ["feature_geometry.py", str(ckpt), "--data", "digits", "--shots", "2"])
    geo.main()
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| MSN target encoder |")]
    assert len(table) == 1 and "| raw pixels | 256 |" in out  # digits at 16 px, 1 channel
    cells = table[0].strip("|").split("|")
    assert int(cells[1]) == 96 and 1.0 <= float(cells[2]) <= 96.0  # dim, effective rank
    assert all(0.0 <= float(c) <= 100.0 for c in cells[4:])
    assert sum(line.startswith("| ") and line[2].isdigit() for line in out.splitlines()) == 10


def test_too_many_shots_fail_before_the_encoder_runs(pretrained, monkeypatch):
    geo = _script()
    ckpt, _ = pretrained

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran before k was checked")

    monkeypatch.setattr(geo, "extract_features", no_encoder)
    monkeypatch.setattr(sys, "argv", ["feature_geometry.py", str(ckpt), "--data", "digits", "--shots", "500"])
    with pytest.raises(ValueError, match="cannot sample k=500 images per class"):
        geo.main()


def test_a_checkpoint_for_other_channels_is_refused_as_by_finetune_py(tmp_path, monkeypatch):
    from msn.checks import ConfigError
    from msn.module import MSNModule
    from tests.artefacts import ENCODER, HEAD, NUM_PROTOTYPES

    rgb = MSNModule(encoder={**ENCODER, "in_chans": 3}, head=HEAD, num_prototypes=NUM_PROTOTYPES)
    ckpt = save_lightning(rgb, tmp_path / "rgb.ckpt")
    monkeypatch.setattr(sys, "argv", ["feature_geometry.py", str(ckpt), "--data", "digits"])
    with pytest.raises(ConfigError, match="data.in_chans=1 but the checkpoint's encoder takes 3 channels"):
        _script().main()
