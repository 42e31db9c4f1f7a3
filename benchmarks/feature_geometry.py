"""Where a checkpoint's low-shot accuracy comes from: its frozen features next to the raw pixels.

    python benchmarks/feature_geometry.py CKPT                       # Fashion-MNIST
    python benchmarks/feature_geometry.py CKPT --data digits --shots 5

For the target-encoder features of ``CKPT`` (the checkpoint's own feature kind, as ``finetune.py``
uses) and for the raw pixels of the same evaluation images, it prints:

- the effective rank of the training features (``exp`` of the entropy of the normalised PCA
  spectrum, after the official row centring and L2 normalisation) and the share of the variance
  in the top 10 principal components: how many directions the features actually use;
- weighted kNN accuracy (k=20, temperature 0.07, ``mode=knn``) and the low-shot logistic
  regression fitted on *all* training labels: how separable the classes are with every label;
- k-shot accuracy (3 splits) overall and per class, the lowest classes first: which classes the
  few-shot classifier confuses.

Pre-training that only compresses the pixels into fewer directions raises k-shot accuracy while
leaving the all-label figures where the pixels are; features that separate the classes better
than pixels do raise both. This is a diagnostic benchmark, not a test.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from sklearn.exceptions import ConvergenceWarning

from msn.cli.evaluate import eval_datamodule
from msn.eval.features import extract_features, raw_pixel_features
from msn.eval.knn import knn_accuracy
from msn.eval.lowshot import DEFAULT_SEEDS, fit_logistic, lowshot_splits, preprocess, shot_label
from msn.eval.reports import MSN_ROW, RAW_PIXELS_ROW
from msn.io import msn_module, read_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TOP = 10  # principal components whose variance share is reported


def spectrum(x: np.ndarray) -> tuple[float, float]:
    """``(effective rank, share of variance in the top TOP components)`` of the rows of ``x``."""
    x = x - x.mean(axis=0)
    var = np.linalg.svd(x, compute_uv=False) ** 2
    p = var / var.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum())), float(p[:TOP].sum())


def per_class_kshot(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    splits: Sequence[np.ndarray],
) -> tuple[float, np.ndarray]:
    """Accuracy (%) and per-class accuracies (%) of the k-shot ``splits`` (train indices, e.g.
    from :func:`msn.eval.lowshot.lowshot_splits`), each the mean over the splits."""
    classes = np.unique(test_y)
    overall, per_class = [], []
    for idx in splits:
        x_tr, x_te = preprocess(train_x[idx], test_x)
        pred = fit_logistic(x_tr, train_y[idx]).predict(x_te)
        overall.append(100.0 * np.mean(pred == test_y))
        per_class.append([100.0 * np.mean(pred[test_y == c] == c) for c in classes])
    return float(np.mean(overall)), np.mean(per_class, axis=0)


def report(
    name: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    splits: Sequence[np.ndarray],
) -> tuple[list[str], np.ndarray]:
    """One table row of figures, and the per-class k-shot accuracies."""
    t0 = time.perf_counter()
    rows_tr, rows_te = preprocess(train_x, test_x)  # the official row centring + L2
    rank, top = spectrum(rows_tr[:10000])  # the first 10,000 rows keep the SVD cheap on large sets
    knn = knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.07)
    with warnings.catch_warnings():
        # With every label and the tiny low-shot penalty L-BFGS ends at its 1,000-iteration cap,
        # short of the 1e-10 tolerance set for the small k-shot problems; say so once, below.
        warnings.simplefilter("ignore", ConvergenceWarning)
        all_labels = 100.0 * np.mean(fit_logistic(rows_tr, train_y).predict(rows_te) == test_y)
    kshot, per_class = per_class_kshot(train_x, train_y, test_x, test_y, splits)
    print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    cells = [
        name,
        str(train_x.shape[1]),
        f"{rank:.1f}",
        f"{100 * top:.0f} %",
        f"{knn:.1f}",
        f"{all_labels:.1f}",
    ]
    return [*cells, f"{kshot:.1f}"], per_class


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "ckpt", help="any checkpoint finetune.py reads (train.py's last.ckpt, official, HF, timm)"
    )
    ap.add_argument("--data", default="fashion_mnist", help="a configs/data group (default fashion_mnist)")
    ap.add_argument("--shots", type=int, default=10, help="k labelled images per class (default 10)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("finetune", overrides=[f"data={args.data}", f"ckpt={args.ckpt}", "output_dir=."])
    ckpt = read_checkpoint(args.ckpt)
    datamodule = eval_datamodule(cfg.data, ckpt)  # as finetune.py: the checkpoint's resolution
    train_ds, test_ds = datamodule.eval_datasets()
    raw = (*raw_pixel_features(train_ds), *raw_pixel_features(test_ds))
    train_y, test_y = raw[1], raw[3]  # the labels, the same for both kinds of features
    # Drawn once for both feature sets; a k larger than the smallest class fails here, before the
    # encoder runs.
    splits = lowshot_splits(train_y, [args.shots], (), DEFAULT_SEEDS)[shot_label(args.shots)]
    model = msn_module(ckpt, "cpu")
    feats = {
        MSN_ROW: (
            *extract_features(model.features, train_ds, desc="features (train)"),
            *extract_features(model.features, test_ds, desc="features (test)"),
        ),
        RAW_PIXELS_ROW: raw,
    }
    rows, per_class = [], {}
    for name, (tr_x, tr_y, te_x, te_y) in feats.items():
        row, per_class[name] = report(name, tr_x, tr_y, te_x, te_y, splits)
        rows.append(row)

    k = args.shots
    print(
        f"\n{args.data}: {len(train_y)} train / {len(test_y)} test images; "
        f"k-shot: mean of {len(DEFAULT_SEEDS)} splits; all-label logistic: at most 1,000 L-BFGS iterations\n"
    )
    head = [
        "features",
        "dim",
        "effective rank",
        f"top-{TOP} variance",
        "kNN, all labels",
        "logistic, all labels",
        f"k={k}",
    ]
    print("| " + " | ".join(head) + " |")
    print("|:--|" + "--:|" * (len(head) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")

    classes = getattr(test_ds, "classes", None) or [str(c) for c in np.unique(test_y)]
    order = np.argsort(per_class[MSN_ROW])
    print(f"\nk={k} accuracy per class (%), lowest first\n")
    print("| class | " + " | ".join(per_class) + " |")
    print("|:--|" + "--:|" * len(per_class))
    for c in order:
        print(f"| {classes[c]} | " + " | ".join(f"{acc[c]:.0f}" for acc in per_class.values()) + " |")


if __name__ == "__main__":
    main()
