"""Tests for msn.eval.lowshot: the MSN low-shot logistic-regression protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from msn.eval.features import extract_features, raw_pixel_features
from msn.eval.lowshot import (
    fit_logistic,
    format_table,
    lowshot_accuracy,
    lowshot_eval,
    lowshot_eval_splits,
    lowshot_splits,
    preprocess,
    sample_k_per_class,
)
from msn.eval.splits import (
    match_subset,
    percent_counts,
    read_subset_file,
    sample_per_class,
    sample_percent_per_class,
)

# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def msn_objective(W: np.ndarray, x: np.ndarray, y: np.ndarray, lambd: float) -> float:
    """The official objective: (1/n) sum CE(y_i, W x_i) + (lambd / (2n)) ||W||^2."""
    n = len(y)
    logits = x @ W.T
    m = logits.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(lse - logits[np.arange(n), y]) + lambd / (2 * n) * np.sum(W * W))


def brute_force_W(x: np.ndarray, y: np.ndarray, n_classes: int, lambd: float) -> np.ndarray:
    """Minimise the objective directly with float64 L-BFGS in torch (independent of sklearn)."""
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    n = len(y)
    W = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [W],
        lr=1.0,
        max_iter=5000,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ W.T, yt) + lambd / (2 * n) * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().numpy()


def toy_problem(
    n_classes: int = 3, n: int = 12, dim: int = 5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Small float64 problem with every class present."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    y = np.arange(n) % n_classes
    return x, y.astype(np.int64)


def blobs(
    n_classes: int, per_class: int, dim: int, seed: int, spread: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around well-separated class centres (offset so centring matters)."""
    rng = np.random.default_rng(seed)
    centres = 3.0 * np.eye(n_classes, dim)
    y = np.repeat(np.arange(n_classes), per_class)
    x = centres[y] + spread * rng.normal(size=(len(y), dim)) + 5.0
    return x, y.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# fit_logistic vs. brute force
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lambd", [0.5, 2.0, 10.0])
def test_fit_logistic_matches_brute_force_multinomial(lambd: float) -> None:
    x, y = toy_problem()
    clf = fit_logistic(x, y, lambd=lambd)
    W_ref = brute_force_W(x, y, 3, lambd)
    assert clf.coef_.shape == (3, 5)
    np.testing.assert_allclose(clf.coef_, W_ref, atol=1e-4)
    assert msn_objective(clf.coef_, x, y, lambd) == pytest.approx(msn_objective(W_ref, x, y, lambd), abs=1e-9)
    # No intercept: the protocol's model is purely linear.
    assert np.all(clf.intercept_ == 0)


def test_fit_logistic_matches_brute_force_default_lambd() -> None:
    # With the (weak) default penalty the problem must be non-separable for a finite, well
    # conditioned optimum: every input appears once with each of the three labels, plus noise.
    rng = np.random.default_rng(1)
    base = rng.normal(size=(4, 5))
    x = np.repeat(base, 3, axis=0) + 0.05 * rng.normal(size=(12, 5))
    y = np.tile(np.arange(3), 4).astype(np.int64)
    clf = fit_logistic(x, y)  # lambd = 0.0025
    W_ref = brute_force_W(x, y, 3, 0.0025)
    np.testing.assert_allclose(clf.coef_, W_ref, atol=1e-4)
    assert msn_objective(clf.coef_, x, y, 0.0025) == pytest.approx(
        msn_objective(W_ref, x, y, 0.0025), abs=1e-9
    )


def test_fit_logistic_binary_equals_multinomial() -> None:
    # sklearn fits a single sigmoid vector for two classes; it must equal W[1] - W[0] of the
    # multinomial (softmax) solution of the same objective.
    x, y = toy_problem(n_classes=2, n=10, dim=4, seed=3)
    lambd = 1.0
    clf = fit_logistic(x, y, lambd=lambd)
    W_ref = brute_force_W(x, y, 2, lambd)
    assert clf.coef_.shape == (1, 4)
    np.testing.assert_allclose(clf.coef_[0], W_ref[1] - W_ref[0], atol=1e-4)
    W_from_clf = np.stack([-clf.coef_[0] / 2, clf.coef_[0] / 2])
    assert msn_objective(W_from_clf, x, y, lambd) == pytest.approx(
        msn_objective(W_ref, x, y, lambd), abs=1e-9
    )


def test_fit_logistic_separable_predictions() -> None:
    x, y = blobs(n_classes=4, per_class=6, dim=8, seed=0)
    x_tr, _ = preprocess(x, x)
    clf = fit_logistic(x_tr, y)
    np.testing.assert_array_equal(clf.predict(x_tr), y)


def test_lowshot_accuracy_separable_is_100() -> None:
    train_x, train_y = blobs(n_classes=4, per_class=10, dim=8, seed=0)
    test_x, test_y = blobs(n_classes=4, per_class=20, dim=8, seed=1)
    for k in (1, 5):
        assert lowshot_accuracy(train_x, train_y, test_x, test_y, k=k, seed=0) == 100.0


def test_lowshot_accuracy_chance_on_shuffled_labels_is_lower() -> None:
    # Sanity check that accuracy is computed on the test labels (not trivially 100).
    train_x, train_y = blobs(n_classes=4, per_class=10, dim=8, seed=0)
    test_x, test_y = blobs(n_classes=4, per_class=20, dim=8, seed=1)
    wrong = (test_y + 1) % 4
    assert lowshot_accuracy(train_x, train_y, test_x, wrong, k=2, seed=0) == 0.0


# ----------------------------------------------------------------------------------------------
# preprocess
# ----------------------------------------------------------------------------------------------


def test_preprocess_centres_with_train_mean_and_normalises() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(20, 6)) + 3.0
    test = rng.normal(size=(7, 6)) - 2.0  # a different mean, so "own mean" would differ
    train_orig, test_orig = train.copy(), test.copy()
    tr, te = preprocess(train, test, centering="train_mean")

    mean = train.mean(axis=0)
    # Before normalisation the train set is centred: undo the per-row scaling and check.
    centred_train = train - mean
    np.testing.assert_allclose(centred_train.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(tr * np.linalg.norm(centred_train, axis=1, keepdims=True), centred_train)
    # Unit rows.
    np.testing.assert_allclose(np.linalg.norm(tr, axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(te, axis=1), 1.0)
    # The test set uses the TRAIN mean, not its own.
    expected_te = (test - mean) / np.linalg.norm(test - mean, axis=1, keepdims=True)
    np.testing.assert_allclose(te, expected_te)
    own = (test - test.mean(0)) / np.linalg.norm(test - test.mean(0), axis=1, keepdims=True)
    assert not np.allclose(te, own)
    # Inputs untouched.
    np.testing.assert_array_equal(train, train_orig)
    np.testing.assert_array_equal(test, test_orig)


def test_preprocess_row_centring_is_the_official_default() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(size=(5, 4)) + 3.0
    test = rng.normal(size=(3, 4)) - 1.0
    tr, te = preprocess(train, test)
    for x, out in ((train, tr), (test, te)):
        for row, got in zip(x, out):
            centred = [v - sum(row) / len(row) for v in row]  # each row minus its own mean
            norm = sum(c * c for c in centred) ** 0.5
            np.testing.assert_allclose(got, [c / norm for c in centred], rtol=1e-12)
    # a test row's output does not depend on the train set
    _, te_other = preprocess(train * 7 + 1, test)
    np.testing.assert_allclose(te, te_other)
    with pytest.raises(ValueError, match="centering"):
        preprocess(train, test, centering="median")


def test_preprocess_zero_rows_are_safe() -> None:
    train = np.array([[1.0, 2.0], [1.0, 2.0]], dtype=np.float32)  # centred rows are all zero
    test = np.array([[1.0, 2.0], [2.0, 2.0]], dtype=np.float32)
    tr, te = preprocess(train, test, centering="train_mean")
    assert np.isfinite(tr).all() and np.isfinite(te).all()
    np.testing.assert_array_equal(tr, 0)
    np.testing.assert_allclose(te, [[0.0, 0.0], [1.0, 0.0]])
    assert tr.dtype == np.float64


def test_preprocess_dim_mismatch() -> None:
    with pytest.raises(ValueError, match="different feature dims"):
        preprocess(np.ones((3, 4)), np.ones((3, 5)))


# ----------------------------------------------------------------------------------------------
# sample_k_per_class
# ----------------------------------------------------------------------------------------------


def _labels() -> np.ndarray:
    rng = np.random.default_rng(0)
    # Unequal class sizes (min 6), shuffled, non-contiguous class ids.
    y = np.concatenate([np.full(n, c) for c, n in [(0, 10), (3, 6), (7, 15), (9, 8)]])
    return rng.permutation(y).astype(np.int64)


def test_sampler_exactly_k_per_class_and_deterministic() -> None:
    y = _labels()
    for k in (1, 2, 5, 6):
        idx = sample_k_per_class(y, k, seed=0)
        assert idx.dtype == np.int64
        assert len(np.unique(idx)) == len(idx) == 4 * k
        classes, counts = np.unique(y[idx], return_counts=True)
        np.testing.assert_array_equal(classes, [0, 3, 7, 9])
        assert (counts == k).all()
        np.testing.assert_array_equal(idx, sample_k_per_class(y, k, seed=0))


def test_sampler_nested_across_k() -> None:
    y = _labels()
    for seed in (0, 1, 2):
        subsets = [set(sample_k_per_class(y, k, seed).tolist()) for k in (1, 2, 5, 6)]
        for small, large in zip(subsets, subsets[1:], strict=False):
            assert small < large


def test_sampler_seeds_differ() -> None:
    y = _labels()
    splits = [tuple(sample_k_per_class(y, 2, seed)) for seed in (0, 1, 2)]
    assert len(set(splits)) == 3


def test_sampler_errors() -> None:
    y = _labels()
    with pytest.raises(ValueError, match=r"class 3 has only 6"):
        sample_k_per_class(y, 7, seed=0)
    with pytest.raises(ValueError, match="positive integer"):
        sample_k_per_class(y, 0, seed=0)
    with pytest.raises(ValueError, match="dataset has no labels"):
        sample_k_per_class(np.full(10, -1), 1, seed=0)


# ----------------------------------------------------------------------------------------------
# lowshot_eval and validation
# ----------------------------------------------------------------------------------------------


def test_lowshot_eval_matches_numpy_over_seeds() -> None:
    # Noisy blobs so accuracies differ between seeds and std is non-trivial.
    train_x, train_y = blobs(n_classes=3, per_class=8, dim=6, seed=0, spread=2.5)
    test_x, test_y = blobs(n_classes=3, per_class=30, dim=6, seed=1, spread=2.5)
    shots, seeds = (1, 3), (0, 1, 2)
    res = lowshot_eval(train_x, train_y, test_x, test_y, shots=shots, seeds=seeds)
    assert list(res) == [1, 3]
    for k in shots:
        accs = [lowshot_accuracy(train_x, train_y, test_x, test_y, k, s) for s in seeds]
        assert res[k] == (pytest.approx(np.mean(accs)), pytest.approx(np.std(accs)))
        assert all(0.0 <= a <= 100.0 for a in accs)
    assert any(res[k][1] > 0 for k in shots)


def test_validation_errors() -> None:
    x, y = blobs(n_classes=3, per_class=4, dim=5, seed=0)
    with pytest.raises(
        ValueError, match="dataset has no labels; low-shot evaluation needs a labelled dataset"
    ):
        lowshot_eval(x, np.full_like(y, -1), x, y)
    with pytest.raises(ValueError, match="dataset has no labels"):
        lowshot_accuracy(x, y, x, np.full_like(y, -1), k=1, seed=0)
    with pytest.raises(ValueError, match="rows"):
        lowshot_eval(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="different feature dims"):
        lowshot_eval(x, y, x[:, :4], y)
    with pytest.raises(ValueError, match="lambd"):
        lowshot_eval(x, y, x, y, lambd=0.0)
    with pytest.raises(ValueError, match="lambd"):
        fit_logistic(x, y, lambd=-1.0)
    with pytest.raises(ValueError, match="class"):
        lowshot_eval(x, y, x, y, shots=(5,))
    with pytest.raises(ValueError, match="NaN"):
        fit_logistic(np.full_like(x, np.nan), y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit_logistic(x, np.zeros_like(y))


# ----------------------------------------------------------------------------------------------
# Feature extraction and reporting
# ----------------------------------------------------------------------------------------------


def test_extract_features_linear_encode() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(10, 2, 3, generator=g)
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    proj = torch.randn(6, 4, generator=g)

    feats, labs = extract_features(
        lambda x: x.flatten(1) @ proj, TensorDataset(images, labels), batch_size=3, progress=False
    )
    assert feats.dtype == np.float32 and feats.shape == (10, 4)
    assert labs.dtype == np.int64
    np.testing.assert_allclose(feats, (images.flatten(1) @ proj).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(labs, labels.numpy())


def test_extract_features_rejects_non_2d_output() -> None:
    ds = TensorDataset(torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, dim\)"):
        extract_features(lambda x: x, ds, progress=False)


def test_raw_pixel_features() -> None:
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    labels = torch.tensor([0, -1])  # unlabelled samples are fine here; lowshot_* rejects them
    feats, labs = raw_pixel_features(TensorDataset(images, labels))
    np.testing.assert_array_equal(feats, images.reshape(2, -1).numpy())
    np.testing.assert_array_equal(labs, [0, -1])


def test_format_table() -> None:
    results = {
        "MSN (target encoder)": {1: (63.21, 1.06), 2: (70.0, 0.5), 5: (75.04, 0.25)},
        "raw pixels": {1: (5.0, 0.3), 5: (9.14, 0.19)},
    }
    table = format_table(results, title="Low-shot")
    lines = table.splitlines()
    assert lines[0] == "Low-shot"
    header = next(line for line in lines if line.startswith("| features"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["features", "k=1", "k=2", "k=5"]
    msn_row = next(line for line in lines if "MSN (target encoder)" in line)
    assert [c.strip() for c in msn_row.strip("|").split("|")][1:] == [
        "63.2 ± 1.1",
        "70.0 ± 0.5",
        "75.0 ± 0.2",
    ]
    raw_row = next(line for line in lines if "raw pixels" in line)
    assert [c.strip() for c in raw_row.strip("|").split("|")][1:] == ["5.0 ± 0.3", "-", "9.1 ± 0.2"]
    # Aligned: every table line has the same length.
    table_lines = [line for line in lines if line.startswith("|")]
    assert len({len(line) for line in table_lines}) == 1
    assert format_table(results).splitlines()[0].startswith("| features")


def test_format_table_string_columns_in_given_order() -> None:
    results = {
        "MSN": {"k=1": (50.0, 1.0), "k=5": (60.0, 0.5), "10%": (70.0, 0.25), "1percent": (65.0, 0.0)},
        "raw pixels": {"k=1": (5.0, 0.3), "1percent": (6.0, 0.0)},
    }
    lines = format_table(results).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["features", "k=1", "k=5", "10%", "1percent"]
    raw = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert raw == ["raw pixels", "5.0 ± 0.3", "-", "-", "6.0 ± 0.0"]
    # String "k=N" columns in increasing order render exactly like the int-keyed table.
    ints = {"a": {1: (1.0, 0.1), 2: (2.0, 0.2), 5: (5.0, 0.5)}}
    strs = {"a": {"k=1": (1.0, 0.1), "k=2": (2.0, 0.2), "k=5": (5.0, 0.5)}}
    assert format_table(ints, title="T") == format_table(strs, title="T")


# ----------------------------------------------------------------------------------------------
# Percent subsets, the shared sampler, subset files, lambda lists
# ----------------------------------------------------------------------------------------------


def test_percent_counts_rounding_and_minimum() -> None:
    sizes = np.array([10, 6, 15, 8, 250, 1300])
    np.testing.assert_array_equal(percent_counts(sizes, 10), [1, 1, 2, 1, 25, 130])  # 0.6 -> 1, 1.5 -> 2
    np.testing.assert_array_equal(percent_counts(sizes, 1), [1, 1, 1, 1, 3, 13])  # 2.5 -> 3 (half up)
    np.testing.assert_array_equal(percent_counts(sizes, 50), [5, 3, 8, 4, 125, 650])  # 7.5 -> 8
    np.testing.assert_array_equal(percent_counts(sizes, 100), sizes)


def test_percent_sampler_exact_counts_and_deterministic() -> None:
    y = _labels()  # class sizes 0:10, 3:6, 7:15, 9:8
    for p, expected in [(10, [1, 1, 2, 1]), (50, [5, 3, 8, 4]), (100, [10, 6, 15, 8]), (0.5, [1, 1, 1, 1])]:
        idx = sample_percent_per_class(y, p, seed=1)
        assert idx.dtype == np.int64 and len(np.unique(idx)) == len(idx)
        classes, counts = np.unique(y[idx], return_counts=True)
        np.testing.assert_array_equal(classes, [0, 3, 7, 9])
        np.testing.assert_array_equal(counts, expected)
        np.testing.assert_array_equal(idx, sample_percent_per_class(y, p, seed=1))
    assert not np.array_equal(sample_percent_per_class(y, 50, 0), sample_percent_per_class(y, 50, 1))


def test_percent_and_k_shot_subsets_are_nested() -> None:
    y = _labels()
    for seed in (0, 1, 2):
        one = set(sample_k_per_class(y, 1, seed).tolist())
        two = set(sample_k_per_class(y, 2, seed).tolist())
        pct10 = set(sample_percent_per_class(y, 10, seed).tolist())  # >= 1 per class
        pct40 = set(sample_percent_per_class(y, 40, seed).tolist())  # >= 2 per class: 4, 2, 6, 3
        five = set(sample_k_per_class(y, 5, seed).tolist())
        pct80 = set(sample_percent_per_class(y, 80, seed).tolist())  # >= 5 per class: 8, 5, 12, 6
        assert one <= pct10 <= pct40 and two <= pct40 and one < two
        assert five <= pct80 and pct40 <= pct80


def test_shared_sampler_per_class_counts() -> None:
    y = _labels()
    idx = sample_per_class(y, [0, 2, 3, 1], seed=0)
    _, counts = np.unique(y[idx], return_counts=True)
    assert dict(zip(*np.unique(y[idx], return_counts=True), strict=True)) == {3: 2, 7: 3, 9: 1}
    assert counts.sum() == 6
    # The k-shot sampler is the same code path with a uniform count.
    np.testing.assert_array_equal(sample_per_class(y, 2, seed=4), sample_k_per_class(y, 2, 4))
    with pytest.raises(ValueError, match="class 3 has only 6"):
        sample_per_class(y, [1, 7, 1, 1], seed=0)


def test_percent_errors() -> None:
    y = _labels()
    for bad in (0, -1, 100.5, float("nan"), True, "10"):
        with pytest.raises(ValueError, match=r"in \(0, 100\]"):
            sample_percent_per_class(y, bad, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"lowshot.percents.*150"):
        lowshot_splits(y, shots=(1,), percents=(150,))


def test_lowshot_splits_columns_and_order() -> None:
    y = _labels()
    splits = lowshot_splits(y, shots=(1, 2), percents=(10, 50), seeds=(0, 1, 2))
    assert list(splits) == ["k=1", "k=2", "10%", "50%"]
    assert all(len(v) == 3 for v in splits.values())
    np.testing.assert_array_equal(splits["k=2"][1], sample_k_per_class(y, 2, 1))
    np.testing.assert_array_equal(splits["50%"][2], sample_percent_per_class(y, 50, 2))
    with pytest.raises(ValueError, match="twice"):
        lowshot_splits(y, shots=(1,), percents=(10, 10.0))
    with pytest.raises(ValueError, match=r"class 3 has only 6"):
        lowshot_splits(y, shots=(7,))


def test_read_subset_file_and_match(tmp_path) -> None:
    f = tmp_path / "1percent.txt"
    f.write_text("n01_3.JPEG\n\n  n02_1.JPEG  \nn01_3.JPEG\n\n")
    assert read_subset_file(f) == ["n01_3.JPEG", "n02_1.JPEG", "n01_3.JPEG"]
    paths = [f"/data/train/{c}/{c}_{i}.JPEG" for c in ("n01", "n02") for i in range(4)]
    np.testing.assert_array_equal(match_subset(read_subset_file(f), paths), [3, 5])
    with pytest.raises(ValueError, match=r"lowshot.subset_files.*nope.txt"):
        read_subset_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no image names"):
        read_subset_file(tmp_path / "empty.txt")
    missing = [f"x_{i}.JPEG" for i in range(7)]
    with pytest.raises(
        ValueError, match=r"7 of 8 image name\(s\) are not in the dataset.*x_4.JPEG'\]"
    ) as err:
        match_subset(["n01_0.JPEG", *missing], paths)
    assert "x_5.JPEG" not in str(err.value)
    with pytest.raises(ValueError, match="several dataset files"):
        match_subset(["a.png"], ["/r/x/a.png", "/r/y/a.png"])


def test_lowshot_eval_splits_lambda_list() -> None:
    train_x, train_y = blobs(n_classes=3, per_class=8, dim=6, seed=0, spread=2.5)
    test_x, test_y = blobs(n_classes=3, per_class=30, dim=6, seed=1, spread=2.5)
    splits = lowshot_splits(train_y, shots=(1, 3), percents=(50,), seeds=(0, 1))
    splits["file"] = [np.array([0, 8, 16, 1])]
    res = lowshot_eval_splits(train_x, train_y, test_x, test_y, splits, lambdas=(0.0025, 10.0))
    assert list(res) == [0.0025, 10.0]
    for lam in (0.0025, 10.0):
        assert list(res[lam]) == ["k=1", "k=3", "50%", "file"]
        assert res[lam]["file"][1] == 0.0  # a single split
        ref = lowshot_eval(train_x, train_y, test_x, test_y, shots=(1, 3), seeds=(0, 1), lambd=lam)
        assert res[lam]["k=1"] == pytest.approx(ref[1]) and res[lam]["k=3"] == pytest.approx(ref[3])
    with pytest.raises(ValueError, match="lambd"):
        lowshot_eval_splits(train_x, train_y, test_x, test_y, splits, lambdas=(0.1, -1.0))
