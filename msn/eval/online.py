"""Lightning callbacks for MSN pre-training.

:class:`OnlineEvalCallback` watches a run while it trains: every few epochs it measures the
frozen target encoder on the labelled holdout (weighted kNN and low-shot logistic regression)
and how many prototypes the target network actually uses, and warns loudly when the prototype
usage collapses, so a bad run is stopped after minutes instead of at the end.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset

from msn.checks import int_problems, is_int, is_number, own_arguments, raise_problems
from msn.eval.features import extract_features
from msn.eval.knn import knn_accuracy
from msn.eval.lowshot import lowshot_eval
from msn.eval.rankme import effective_rank
from msn.eval.splits import subsample

__all__ = [
    "CollapseRule",
    "OnlineEvalCallback",
    "OnlineEvalResult",
    "PrototypeCollapseWarning",
    "RankCollapseWarning",
]

#: Seed of the permutation that picks the ``max_train`` / ``max_test`` subsets. Fixed, so every
#: evaluation of a run (and of a resumed run) sees the same images and the curves are comparable.
SUBSAMPLE_SEED = 0
#: Name of the JSON-lines record written next to the logs, one line per evaluation.
JSONL_NAME = "online_eval.jsonl"
#: Batches after which BatchNorm running statistics (momentum 0.1) keep < 1 % of their initial
#: value (0.9 ** 50 = 0.005); before that a collapse warning carries a caveat.
_SETTLED_BN_BATCHES = 50


class PrototypeCollapseWarning(UserWarning):
    """The target network assigns the images it looks at to only a few prototypes."""


class RankCollapseWarning(UserWarning):
    """The target features of the evaluated images span only a few directions (low RankMe)."""


class CollapseRule:
    """When the prototypes (:meth:`check`) or the feature rank (:meth:`check_rank`) count as
    collapsed, and the one message and warning that say so.

    A reading (the caller's measurement: targets of training batches, assignments of test images,
    RankMe of test features) is low when below ``fraction`` of the most it can be (``min(K,
    images)`` prototypes, ``min(D, images)`` dimensions); ``patience`` low readings in a row are a
    collapse, reported once, and again only after a reading that is not low. ``fraction`` 0 never
    reports. One instance follows one kind of reading.
    """

    def __init__(self, fraction: float, patience: int = 1) -> None:
        self.fraction, self.patience = float(fraction), int(patience)
        self.low_streak = 0
        self._reported = False

    @staticmethod
    def problems(fraction: Any, patience: Any = 1, fraction_key: str = "fraction") -> list[str]:
        """What is wrong with these arguments, the fraction named ``fraction_key`` (a config key)."""
        problems = []
        if not (is_number(fraction) and 0 <= fraction <= 1):
            problems.append(f"{fraction_key}={fraction} must be a number in [0, 1]")
        if not (is_int(patience) and patience >= 1):
            problems.append(f"patience={patience} must be an integer >= 1")
        return problems

    def completes(self, value: float, reachable: float) -> bool:
        """One reading, ``value`` of at most ``reachable``: whether it completes a collapse that is
        to be reported now (low, ``patience`` in a row, not reported since the last recovery)."""
        if value >= self.fraction * reachable:
            self.low_streak, self._reported = 0, False
            return False
        self.low_streak += 1
        if self.low_streak < self.patience or self._reported:
            return False
        self._reported = True
        return True

    def check(
        self, used: float, num_prototypes: int, images: int, when: str, observed: str, note: str = ""
    ) -> str | None:
        """One reading, ``used`` of ``num_prototypes`` prototypes over ``images`` images: the message if it
        completes a collapse (``when``: e.g. "at step 5"; ``observed``: what was measured), else None."""
        reachable = min(num_prototypes, images)  # at most one prototype per image
        if not self.completes(used, reachable):
            return None
        return (
            f"PROTOTYPE COLLAPSE {when}: {observed} only {used:g} of K={num_prototypes} prototypes "
            f"(< {self.fraction:g} x {reachable}). The representation is collapsing; try a lower learning "
            "rate (model.optim.ref_lr), a larger batch (data.batch_size), Sinkhorn on "
            f"(model.loss.sinkhorn_iterations=3) or a larger ME-MAX weight (model.loss.me_max_weight).{note}"
        )

    def check_rank(
        self, rank: float, dim: int, images: int, when: str, what: str = "test images"
    ) -> str | None:
        """One RankMe reading of the features (``dim`` dimensions) of ``images`` ``what``: the
        message if it completes a (dimensional) collapse, else None."""
        reachable = min(dim, images)
        if not math.isfinite(rank) or not self.completes(rank, reachable):  # NaN: not measured
            return None
        return (
            f"FEATURE RANK COLLAPSE {when}: the effective rank (RankMe) of the target features of {images} "
            f"{what} is {rank:.2f} of at most {reachable} (< {self.fraction:g} x {reachable}): the "
            "features span only a few directions. Try a lower learning rate (model.optim.ref_lr), Sinkhorn "
            "on (model.loss.sinkhorn_iterations=3) or a larger ME-MAX weight (model.loss.me_max_weight)."
        )

    @staticmethod
    def warn(message: str, category: type[Warning] = PrototypeCollapseWarning) -> None:
        rank_zero_warn(message, category=category)


@dataclass
class OnlineEvalResult:
    """Outcome of one online evaluation.

    Attributes:
        knn: weighted kNN top-1 accuracy (percent).
        lowshot: ``{k: (mean, std)}`` low-shot accuracy (percent) for every k that could be evaluated.
        counts: for every prototype, how many evaluated test images have it as their most likely one.
        num_train: labelled training (support) images evaluated.
        num_test: test images evaluated.
        skipped: why some low-shot k could not be evaluated (warned about, not fatal).
        rankme: effective rank (:func:`msn.eval.rankme.effective_rank`) of the test features.
        feature_dim: dimensions of those features.
    """

    knn: float
    lowshot: dict[int, tuple[float, float]]
    counts: list[int]
    num_train: int
    num_test: int
    skipped: list[str] = field(default_factory=list)
    rankme: float = float("nan")
    feature_dim: int = 0

    @property
    def num_prototypes(self) -> int:
        """K, the number of prototypes."""
        return len(self.counts)

    @property
    def num_used(self) -> int:
        """Distinct prototypes that are the argmax of at least one test image."""
        return int(sum(c > 0 for c in self.counts))


def _int_list_problems(name: str, values: Any, minimum: int | None) -> list[str]:
    """Hydra hands lists over as ListConfig: any non-empty sequence of integers will do."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        return [f"{name} must be a non-empty list of integers, got {values!r}"]
    if all(is_int(v) and (minimum is None or v >= minimum) for v in values):
        return []
    bound = f" >= {minimum}" if minimum is not None else ""
    return [f"{name} must contain integers{bound}, got {list(values)!r}"]


def _batchnorm_batches_seen(module: torch.nn.Module) -> int | None:
    """Fewest batches counted by any BatchNorm layer of ``module`` (None: no BatchNorm with a count)."""
    seen = [
        int(m.num_batches_tracked)
        for m in module.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.num_batches_tracked is not None
    ]
    return min(seen) if seen else None


@contextmanager
def _frozen_eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then give each back exactly the mode it had.

    Restoring per submodule (rather than a blanket ``.train()``) keeps whatever modes the module
    chose for itself; during fit Lightning expects all of it, target network included, in train
    mode, and an evaluation leaving BatchNorm in eval mode would silently change the training.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class OnlineEvalCallback(L.Callback):
    """Periodic kNN / low-shot accuracy and prototype usage of the target network during pre-training.

    At the end of every ``every_n_epochs``-th training epoch (counted from 1; also after the
    first epoch with ``on_first_epoch``), on global rank 0 only, the callback

    1. extracts frozen :meth:`~msn.module.MSNModule.features` of the labelled holdout from
       ``trainer.datamodule.eval_datasets()`` (subsampled to ``max_train`` / ``max_test`` images
       with a fixed-seed permutation, so large data sets stay cheap to evaluate);
    2. logs ``online/knn`` (weighted kNN, DINO protocol) and ``online/lowshot_{k}shot`` (mean over
       ``seeds`` of the official low-shot protocol) through ``pl_module.log``;
    3. takes the argmax of :meth:`~msn.module.MSNModule.prototype_probs` of every evaluated test
       image and logs ``online/num_prototypes_used`` (distinct argmaxes) and, on TensorBoard and
       Weights & Biases loggers, the histogram ``online/prototype_usage`` over the K prototypes;
    4. appends a JSON line (epoch, step, knn, lowshot, num_used, counts, ...) to
       ``online_eval.jsonl`` in ``dirpath`` (default: ``trainer.log_dir``), independent of any logger;
    5. warns of a collapse (:class:`CollapseRule`): fewer than ``collapse_fraction * min(K, test
       images)`` prototypes used, once until the usage recovers; and, the same way, of an effective
       rank (RankMe, logged as ``online/rankme``) of the test features below ``rankme_fraction *
       min(D, test images)``.

    The evaluation runs in eval mode (running BatchNorm statistics), under the trainer's
    precision context, and inside ``torch.random.fork_rng``: afterwards every submodule has its
    previous mode back and the training run's torch RNG is where it was, so adding the callback
    does not change the training itself. Without labels (or without a datamodule that has
    ``eval_datasets``) it warns once at fit start; with a datamodule that has ``eval_images`` (an
    :class:`~msn.data.MSNDataModule`) it then logs what needs no labels, the prototype usage and
    RankMe of up to ``max_test`` training images, and otherwise does nothing.

    Args:
        every_n_epochs: evaluate after epochs ``n, 2n, 3n, ...`` (1-based).
        knn_k: neighbours of the kNN classifier (capped at the number of training images).
        knn_temperature: temperature of the kNN vote weights.
        shots: labelled images per class of the low-shot evaluation.
        seeds: low-shot splits (the logged value is the mean over them).
        lambd: L2 penalty of the low-shot logistic regression (official 0.0025).
        max_train: evaluate at most this many labelled training images (None: all).
        max_test: evaluate at most this many test images (None: all).
        batch_size: images per forward pass of the feature extraction.
        collapse_fraction: warn when the used prototypes fall below this fraction of
            ``min(K, evaluated test images)``; 0 never warns.
        on_first_epoch: also evaluate after the first epoch (an early sanity check).
        dirpath: folder of ``online_eval.jsonl``; None uses ``trainer.log_dir`` (the first
            logger's folder, else ``default_root_dir``).
        rankme_fraction: warn (:class:`RankCollapseWarning`) when the effective rank (RankMe) of
            the test features falls below this fraction of ``min(feature dim, test images)``;
            0 never warns.
    """

    def __init__(
        self,
        every_n_epochs: int = 10,
        knn_k: int = 20,
        knn_temperature: float = 0.07,
        shots: Sequence[int] = (1, 5),
        seeds: Sequence[int] = (0,),
        lambd: float = 0.0025,
        max_train: int | None = None,
        max_test: int | None = None,
        batch_size: int = 256,
        collapse_fraction: float = 0.1,
        on_first_epoch: bool = False,
        dirpath: str | Path | None = None,
        rankme_fraction: float = 0.02,
    ) -> None:
        super().__init__()
        raise_problems(OnlineEvalCallback.problems(**own_arguments(locals())))
        self.shots = tuple(int(k) for k in shots)
        self.seeds = tuple(int(seed) for seed in seeds)
        self.every_n_epochs = int(every_n_epochs)
        self.knn_k = int(knn_k)
        self.knn_temperature = float(knn_temperature)
        self.lambd = float(lambd)
        self.max_train = None if max_train is None else int(max_train)
        self.max_test = None if max_test is None else int(max_test)
        self.batch_size = int(batch_size)
        self.collapse_fraction = float(collapse_fraction)
        self.collapse = CollapseRule(self.collapse_fraction)
        self.rank_collapse = CollapseRule(float(rankme_fraction))
        self.on_first_epoch = on_first_epoch
        self.dirpath = None if dirpath is None else Path(dirpath)
        # (train, test) after subsampling; train None for unlabelled data; None until fit start.
        self._datasets: tuple[Dataset | None, Dataset] | None = None
        self._warned: set[str] = set()

    @staticmethod
    def problems(**kwargs: Any) -> list[str]:
        """Every problem of these arguments (defaults for the missing ones), named as its config keys."""
        given = inspect.signature(OnlineEvalCallback).bind_partial(**kwargs)
        given.apply_defaults()
        a = given.arguments
        problems = int_problems("every_n_epochs", a["every_n_epochs"], 1)
        problems += int_problems("knn_k", a["knn_k"], 1)
        for name in ("knn_temperature", "lambd"):
            if not (is_number(a[name]) and 0 < a[name] < float("inf")):
                problems.append(f"{name} must be a finite number > 0, got {a[name]!r}")
        problems += _int_list_problems("shots", a["shots"], 1) + _int_list_problems("seeds", a["seeds"], None)
        for name in ("max_train", "max_test"):
            if a[name] is not None and not (is_int(a[name]) and a[name] >= 1):
                problems.append(f"{name} must be null (all images) or an integer >= 1, got {a[name]!r}")
        problems += int_problems("batch_size", a["batch_size"], 1)
        problems += CollapseRule.problems(a["collapse_fraction"], fraction_key="collapse_fraction")
        problems += CollapseRule.problems(a["rankme_fraction"], fraction_key="rankme_fraction")
        if not isinstance(a["on_first_epoch"], bool):
            problems.append(f"on_first_epoch must be true or false, got {a['on_first_epoch']!r}")
        return problems

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Find the labelled holdout once (rank 0), so a run without labels warns at start, not later."""
        if not trainer.is_global_zero or self._datasets is not None:
            return
        eval_datasets = getattr(trainer.datamodule, "eval_datasets", None)
        if eval_datasets is None:
            self._warn_once(
                "no_datamodule",
                "OnlineEvalCallback needs a datamodule with eval_datasets() (e.g. MSNDataModule) "
                "passed to trainer.fit(datamodule=...); online evaluation is disabled for this run.",
            )
            return
        try:
            train_ds, test_ds = eval_datasets()
        except ValueError as err:  # unlabeled data is a normal use of MSN, not a failure
            images = getattr(trainer.datamodule, "eval_images", None)
            if images is None:
                self._warn_once(
                    "no_labels",
                    f"OnlineEvalCallback: no labelled evaluation data ({err}); "
                    "online evaluation is disabled for this run.",
                )
                return
            # What needs no labels still runs: prototype usage and RankMe on training images.
            unlabelled = subsample(images()[0], self.max_test, SUBSAMPLE_SEED)
            self._datasets = (None, unlabelled)
            self._warn_once(
                "no_labels",
                f"OnlineEvalCallback: no labelled evaluation data ({err}); logging only the prototype usage "
                f"and the effective rank (RankMe) of {len(unlabelled)} training images, no kNN or low-shot.",  # type: ignore[arg-type]
            )
            return
        self._datasets = (
            subsample(train_ds, self.max_train, SUBSAMPLE_SEED),
            subsample(test_ds, self.max_test, SUBSAMPLE_SEED),
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate, log, record and check for collapse when this epoch is due."""
        if self._datasets is None or not trainer.is_global_zero or not self.is_due(trainer.current_epoch):
            return
        result = self.evaluate(pl_module, *self._datasets, precision=trainer.precision_plugin)
        epoch, step = trainer.current_epoch, trainer.global_step
        for message in result.skipped:
            self._warn_once(message, f"OnlineEvalCallback: {message}")
        self._log(trainer, pl_module, result)
        self._write_jsonl(trainer, result, epoch, step)
        self._check_collapse(result, epoch, _batchnorm_batches_seen(pl_module))

    # ------------------------------------------------------------------ evaluation
    def is_due(self, epoch: int) -> bool:
        """Whether to evaluate at the end of the 0-based ``epoch``."""
        return (epoch + 1) % self.every_n_epochs == 0 or (self.on_first_epoch and epoch == 0)

    def evaluate(
        self, pl_module: Any, train_ds: Dataset | None, test_ds: Dataset, precision: Any | None = None
    ) -> OnlineEvalResult:
        """kNN, low-shot accuracy, prototype usage and RankMe of ``pl_module`` on the given datasets
        (``train_ds`` None: unlabelled ``test_ds``, no kNN (NaN) and no low-shot).

        ``pl_module`` needs ``features``, ``prototype_probs``, ``prototypes`` and ``device``
        (an :class:`~msn.module.MSNModule`). ``precision`` is the trainer's precision plugin, so
        the forward passes use the training's dtype/autocast; None runs them as they are. Leaves
        the module modes and the torch RNG state as they were; logs nothing.
        """
        device = pl_module.device
        # fork_rng would fork *every* visible GPU by default (and warn); only ours is used.
        rng_devices = [device] if device.type == "cuda" else []
        forward = precision.forward_context() if precision is not None else nullcontext()
        convert = precision.convert_input if precision is not None else (lambda x: x)

        def run(fn: Callable[[Tensor], Tensor], dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
            # The DataLoader draws its base seed from the global RNG even without shuffling:
            # fork_rng keeps that draw out of the training run's random stream.
            return extract_features(
                lambda x: fn(convert(x)), dataset, batch_size=self.batch_size, device=device, progress=False
            )

        with torch.random.fork_rng(devices=rng_devices), _frozen_eval_mode(pl_module), forward:
            train_x, train_y = run(pl_module.features, train_ds) if train_ds is not None else (None, None)
            test_x, test_y = run(pl_module.features, test_ds)
            # argmax as a (B, 1) "feature": extract_features then batches and collects it for us.
            assigned, _ = run(lambda x: pl_module.prototype_probs(x).argmax(dim=1, keepdim=True), test_ds)

        skipped: list[str] = []
        knn, lowshot = float("nan"), {}  # type: float, dict[int, tuple[float, float]]
        if train_x is not None:
            # A subsampled support set can be smaller than knn_k; fewer neighbours beat no number.
            knn_k = min(self.knn_k, len(train_y))
            knn = knn_accuracy(train_x, train_y, test_x, test_y, knn_k, self.knn_temperature)
        for k in self.shots if train_x is not None else ():
            try:
                lowshot.update(lowshot_eval(train_x, train_y, test_x, test_y, (k,), self.seeds, self.lambd))
            except ValueError as err:  # some class has fewer than k images in the (sub)set
                skipped.append(f"low-shot k={k} skipped: {err} (raise max_train or lower shots)")
        num_prototypes = int(pl_module.prototypes.shape[0])
        counts = np.bincount(assigned[:, 0].astype(np.int64), minlength=num_prototypes)
        return OnlineEvalResult(
            knn=knn,
            lowshot=lowshot,
            counts=[int(c) for c in counts],
            num_train=0 if train_y is None else len(train_y),
            num_test=len(test_y),
            skipped=skipped,
            rankme=effective_rank(test_x),
            feature_dim=int(test_x.shape[1]),
        )

    # ------------------------------------------------------------------ reporting
    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, result: OnlineEvalResult) -> None:
        metrics = {"online/num_prototypes_used": float(result.num_used), "online/rankme": result.rankme}
        if result.num_train:
            metrics["online/knn"] = result.knn
        metrics.update({f"online/lowshot_{k}shot": mean for k, (mean, _) in result.lowshot.items()})
        # rank_zero_only: only rank 0 evaluates, so nothing may wait for the other ranks.
        # logger=False without loggers avoids Lightning's "no logger configured" warning.
        pl_module.log_dict(metrics, rank_zero_only=True, logger=bool(trainer.loggers))
        # Lightning logs epoch-end metrics at the step of the last batch (global_step - 1): the
        # histogram goes to the same step so it lines up with the scalars of this evaluation.
        step = max(trainer.global_step - 1, 0)
        for logger in trainer.loggers:
            self._log_histogram(logger, result.counts, step)

    @staticmethod
    def _log_histogram(logger: Any, counts: Sequence[int], step: int) -> None:
        """Prototype-usage histogram for loggers that have histograms (others: the count is enough)."""
        counts_arr = np.asarray(counts, dtype=np.int64)
        # One bin per prototype, centred on its index.
        edges = np.arange(len(counts_arr) + 1, dtype=np.float64) - 0.5
        if isinstance(logger, TensorBoardLogger):
            indices = np.repeat(np.arange(len(counts_arr), dtype=np.float64), counts_arr)
            if indices.size:  # TensorBoard rejects an empty histogram
                logger.experiment.add_histogram("online/prototype_usage", indices, step, bins=edges)
        elif isinstance(logger, WandbLogger):
            import wandb  # only when a wandb logger is in use: importing it is slow

            hist = wandb.Histogram(np_histogram=(counts_arr.tolist(), edges.tolist()))
            logger.log_metrics({"online/prototype_usage": hist}, step=step)

    def _jsonl_path(self, trainer: L.Trainer) -> Path:
        return (self.dirpath or Path(trainer.log_dir or trainer.default_root_dir)) / JSONL_NAME

    def _write_jsonl(self, trainer: L.Trainer, result: OnlineEvalResult, epoch: int, step: int) -> None:
        record = {
            "epoch": epoch,
            "step": step,
            "knn": result.knn if result.num_train else None,
            "lowshot": {str(k): {"mean": m, "std": s} for k, (m, s) in result.lowshot.items()},
            "num_used": result.num_used,
            "num_prototypes": result.num_prototypes,
            "num_train": result.num_train,
            "num_test": result.num_test,
            "rankme": result.rankme,
            "counts": result.counts,
        }
        path = self._jsonl_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Append: one line per evaluation, and a resumed run continues the same record.
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _check_collapse(self, result: OnlineEvalResult, epoch: int, bn_batches: int | None = None) -> None:
        """Warn when the test images' assignments have collapsed (:class:`CollapseRule`).

        ``bn_batches``: fewest batches any BatchNorm layer has seen; eval-mode assignments rest on
        its running statistics, which still hold much of their initial value early in training.
        """
        note = ""
        if bn_batches is not None and bn_batches < _SETTLED_BN_BATCHES:
            note = (
                f" Caveat: the BatchNorm running statistics have seen only {bn_batches} batches "
                "so far; eval-mode assignments this early can look collapsed when training is fine."
            )
        what = "test images" if result.num_train else "training images"  # unlabelled data: training images
        observed = f"the target network assigns the {result.num_test} evaluated {what} to"
        message = self.collapse.check(
            result.num_used, result.num_prototypes, result.num_test, f"after epoch {epoch}", observed, note
        )
        if message:
            self.collapse.warn(message)
        rank_message = self.rank_collapse.check_rank(
            result.rankme, result.feature_dim, result.num_test, f"after epoch {epoch}", what
        )
        if rank_message:
            self.rank_collapse.warn(rank_message, RankCollapseWarning)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)
