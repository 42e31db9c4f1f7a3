"""OnlineEvalCallback: online kNN / low-shot / prototype usage during a real (tiny) Lightning fit."""

import csv
import json
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from msn.data import MSNDataModule
from msn.eval.features import extract_features
from msn.eval.online import (
    JSONL_NAME,
    SUBSAMPLE_SEED,
    CollapseRule,
    OnlineEvalCallback,
    OnlineEvalResult,
    PrototypeCollapseWarning,
    RankCollapseWarning,
)
from msn.eval.rankme import effective_rank
from msn.eval.splits import subsample
from msn.module import MSNModule
from tests.helpers import tiny_module

K = 8


def _module() -> MSNModule:
    return tiny_module(num_prototypes=K, mask_ratio=0.15, mask_seed=None, optim={"warmup_epochs": 1})


def _datamodule(cls: type[MSNDataModule] = MSNDataModule) -> MSNDataModule:
    return cls(
        name="digits",
        in_chans=1,
        mean=[0.5],
        std=[0.5],
        batch_size=32,
        transform=dict(rand_size=16, focal_size=8, focal_views=1),
        eval_img_size=16,
        eval_crop_pct=1.0,
    )


class ModeProbe(L.Callback):
    """Runs right after the callbacks listed before it: records whether everything is in train mode."""

    def __init__(self) -> None:
        self.all_training: list[bool] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.all_training.append(all(m.training for m in pl_module.modules()))


def _fit(tmp_path, callbacks, model=None, datamodule=None, epochs=2, batches=2, logger=True):
    torch.manual_seed(0)
    model = model or _module()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        limit_train_batches=batches,
        logger=CSVLogger(tmp_path, name="csv", version="") if logger else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, datamodule=datamodule or _datamodule())
    return model, trainer


def test_fit_logs_online_metrics_and_leaves_training_untouched(tmp_path):
    cb = OnlineEvalCallback(every_n_epochs=1, max_train=200, max_test=100, batch_size=128)
    probe = ModeProbe()
    model, trainer = _fit(tmp_path / "with", [cb, probe])
    after_with = torch.rand(4)

    # metrics.csv: one row per evaluation, accuracies in percent
    with open(tmp_path / "with" / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("online/knn")]
    assert len(rows) == 2
    for row in rows:
        for name in ("online/knn", "online/lowshot_1shot", "online/lowshot_5shot"):
            assert 0.0 <= float(row[name]) <= 100.0
        assert 1 <= float(row["online/num_prototypes_used"]) <= K
        assert 1 <= float(row["online/rankme"]) <= 96  # the features' dimension

    # the JSON-lines record (into trainer.log_dir, here the CSV logger's folder)
    lines = (tmp_path / "with" / "csv" / JSONL_NAME).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [0, 1]
    assert [r["step"] for r in records] == [2, 4]
    assert [r["rankme"] for r in records] == pytest.approx([float(row["online/rankme"]) for row in rows])
    for r in records:
        assert len(r["counts"]) == K and sum(r["counts"]) == r["num_test"] == 100
        assert r["num_train"] == 200
        assert r["num_used"] == sum(c > 0 for c in r["counts"])
        assert set(r["lowshot"]) == {"1", "5"}

    # every submodule (target network included) was back in train mode right after each
    # evaluation, and still is after the fit
    assert probe.all_training == [True, True]
    assert model.training and model.target_encoder.training and model.target_head.training

    # the same fit without the callback: same weights and the same RNG stream afterwards
    plain, _ = _fit(tmp_path / "without", [], logger=False)
    assert torch.equal(after_with, torch.rand(4))
    for (name, p), q in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(p, q), name


def test_evaluate_keeps_rng_and_module_modes():
    torch.manual_seed(0)
    model = _module()
    model.target_head.eval()  # a mixed state must come back exactly, not as a blanket train()
    train_ds, test_ds = _datamodule().eval_datasets()
    train_ds, test_ds = subsample(train_ds, 100, SUBSAMPLE_SEED), subsample(test_ds, 30, SUBSAMPLE_SEED)
    cb = OnlineEvalCallback(shots=(1,), max_train=100, max_test=30)
    state = torch.get_rng_state()
    result = cb.evaluate(model, train_ds, test_ds)
    assert torch.equal(state, torch.get_rng_state())
    assert model.training and model.target_encoder.training and not model.target_head.training
    assert 0.0 <= result.knn <= 100.0 and set(result.lowshot) == {1}
    assert sum(result.counts) == result.num_test == 30 and result.num_train == 100
    # deterministic: the same numbers on a second call
    again = cb.evaluate(model, train_ds, test_ds)
    assert (again.knn, again.lowshot, again.counts) == (result.knn, result.lowshot, result.counts)


def test_rankme_is_the_effective_rank_of_the_test_features():
    model = _module()
    train_ds, test_ds = _datamodule().eval_datasets()
    train_ds, test_ds = subsample(train_ds, 60, SUBSAMPLE_SEED), subsample(test_ds, 40, SUBSAMPLE_SEED)
    result = OnlineEvalCallback(shots=(1,)).evaluate(model, train_ds, test_ds)
    model.eval()
    feats, _ = extract_features(model.features, test_ds, progress=False)
    assert result.rankme == pytest.approx(effective_rank(feats), rel=1e-6)
    assert result.feature_dim == 96


def test_rank_collapse_warns_once_until_it_recovers(tmp_path):
    model = _module()
    # Every image the same features: RankMe 1, below 0.1 x min(96, 40).
    model.features = lambda x: torch.ones(x.shape[0], 96)
    cb = OnlineEvalCallback(
        every_n_epochs=1,
        shots=(1,),
        max_train=50,
        max_test=40,
        collapse_fraction=0,
        rankme_fraction=0.1,
        dirpath=tmp_path,
    )
    with pytest.warns(
        RankCollapseWarning,
        match=r"FEATURE RANK COLLAPSE after epoch 0: .* 40 test images is 1.00 of at most 40",
    ):
        _fit(tmp_path, [cb], model=model, epochs=1, batches=1, logger=False)
    assert json.loads((tmp_path / JSONL_NAME).read_text())["rankme"] == pytest.approx(1.0, rel=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankCollapseWarning)
        OnlineEvalCallback(rankme_fraction=0, shots=(1,))._check_collapse(
            OnlineEvalResult(0.0, {}, [1] * K, 50, 40, rankme=1.0, feature_dim=96), epoch=0
        )  # 0 never warns
    rule = CollapseRule(0.1)
    assert rule.check_rank(1.0, 96, 40, "now") and not rule.check_rank(1.0, 96, 40, "again")
    assert not rule.check_rank(20.0, 96, 40, "healthy") and rule.check_rank(1.0, 96, 40, "later")
    assert rule.check_rank(float("nan"), 96, 40, "not measured") is None


def test_subsample_is_fixed_sorted_and_bounded():
    data = list(range(50))
    a, b = subsample(data, 10, SUBSAMPLE_SEED), subsample(data, 10, SUBSAMPLE_SEED)
    assert a.indices == b.indices == sorted(a.indices) and len(a) == 10
    assert subsample(data, 50, SUBSAMPLE_SEED) is data and subsample(data, None, SUBSAMPLE_SEED) is data
    assert subsample(data, 10, SUBSAMPLE_SEED + 1).indices != a.indices  # the seed picks the subset


def test_collapse_warning(tmp_path):
    model = _module()
    with torch.no_grad():
        # Identical prototypes get identical gradients and stay identical: every image picks
        # prototype 0 (the first of equal maxima), the textbook collapse.
        model.prototypes.copy_(model.prototypes[:1].expand_as(model.prototypes))
    cb = OnlineEvalCallback(
        every_n_epochs=1, shots=(1,), max_train=50, max_test=40, collapse_fraction=0.5, dirpath=tmp_path
    )
    with pytest.warns(PrototypeCollapseWarning, match=r"PROTOTYPE COLLAPSE after epoch 0.* only 1 of K=8"):
        _fit(tmp_path, [cb], model=model, epochs=1, batches=1, logger=False)
    record = json.loads((tmp_path / JSONL_NAME).read_text())
    assert record["num_used"] == 1 and record["counts"][0] == 40


def test_collapse_rule_reports_a_collapse_once_until_it_recovers():
    rule = CollapseRule(0.5, patience=2)  # low: fewer than 0.5 x min(K=8, 6 images) = 3 used
    messages = [rule.check(used, 8, 6, f"at {i}", "saw") for i, used in enumerate([2, 2, 1, 2, 3, 1, 1])]
    assert [i for i, m in enumerate(messages) if m] == [1, 6]  # second low reading in a row; again after 4
    assert messages[1].startswith("PROTOTYPE COLLAPSE at 1: saw only 2 of K=8 prototypes (< 0.5 x 6).")
    assert CollapseRule(0.0).check(0, 8, 6, "now", "saw") is None  # 0 never reports
    assert CollapseRule.problems(1.5, 0, fraction_key="min_fraction") == [
        "min_fraction=1.5 must be a number in [0, 1]",
        "patience=0 must be an integer >= 1",
    ]


def test_repeated_collapsed_evaluations_warn_once():
    cb = OnlineEvalCallback(collapse_fraction=0.5)
    collapsed = OnlineEvalResult(knn=0.0, lowshot={}, counts=[40] + [0] * 7, num_train=50, num_test=40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(3):
            cb._check_collapse(collapsed, epoch)
    ours = [str(w.message) for w in caught if w.category is PrototypeCollapseWarning]
    assert len(ours) == 1 and ours[0].startswith(
        "PROTOTYPE COLLAPSE after epoch 0: the target network assigns the 40 evaluated test images to only 1 "
        "of K=8 prototypes (< 0.5 x 8)."
    )


class UnlabeledDigits(MSNDataModule):
    def eval_datasets(self):
        raise ValueError("evaluation needs labels")


def test_unlabeled_data_warns_once_and_logs_what_needs_no_labels(tmp_path):
    cb = OnlineEvalCallback(every_n_epochs=1, max_test=50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = _fit(tmp_path, [cb], datamodule=_datamodule(UnlabeledDigits))
    ours = [w for w in caught if "OnlineEvalCallback" in str(w.message)]
    assert len(ours) == 1 and "no labelled evaluation data" in str(ours[0].message)
    assert "only the prototype usage and the effective rank (RankMe) of 50 training images" in str(
        ours[0].message
    )
    records = [json.loads(line) for line in (tmp_path / "csv" / JSONL_NAME).read_text().splitlines()]
    assert len(records) == 2 and all(
        r["knn"] is None and r["lowshot"] == {} and r["num_train"] == 0 for r in records
    )
    assert all(r["num_test"] == sum(r["counts"]) == 50 and r["rankme"] >= 1 for r in records)
    with open(tmp_path / "csv" / "metrics.csv") as f:
        header = f.readline()
    assert "online/knn" not in header and "online/rankme" in header and "online/num_prototypes_used" in header
    # The images are the training split with the evaluation view: the same RankMe from outside.
    images, labelled = _datamodule(UnlabeledDigits).eval_images()
    assert not labelled
    model.eval()
    feats, _ = extract_features(model.features, subsample(images, 50, SUBSAMPLE_SEED), progress=False)
    assert records[-1]["rankme"] == pytest.approx(effective_rank(feats), rel=1e-5)


def test_without_eval_images_unlabeled_data_disables_the_callback(tmp_path):
    class Bare(L.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.inner = _datamodule()

        def train_dataloader(self):
            self.inner.setup("fit")
            return self.inner.train_dataloader()

        def eval_datasets(self):
            raise ValueError("evaluation needs labels")

    cb = OnlineEvalCallback(every_n_epochs=1)
    with pytest.warns(UserWarning, match="online evaluation is disabled for this run"):
        _fit(tmp_path, [cb], datamodule=Bare())
    assert not (tmp_path / "csv" / JSONL_NAME).exists()


def test_histograms_go_to_tensorboard_and_wandb(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    counts = [3, 0, 5, 1]
    tb = TensorBoardLogger(tmp_path, name="tb", version="")
    OnlineEvalCallback._log_histogram(tb, counts, step=7)
    tb.experiment.flush()
    acc = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0})
    acc.Reload()
    (event,) = acc.Histograms("online/prototype_usage")
    assert event.step == 7 and event.histogram_value.num == 9

    wandb = pytest.importorskip("wandb")
    logged = []
    wb = WandbLogger(offline=True, save_dir=str(tmp_path))  # no run starts until .experiment is used
    monkeypatch.setattr(wb, "log_metrics", lambda metrics, step: logged.append((metrics, step)))
    OnlineEvalCallback._log_histogram(wb, counts, step=7)
    ((metrics, step),) = logged
    hist = metrics["online/prototype_usage"]
    assert step == 7 and isinstance(hist, wandb.Histogram)
    assert list(hist.histogram) == counts and len(hist.bins) == len(counts) + 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"every_n_epochs": 0},
        {"every_n_epochs": 1.5},
        {"every_n_epochs": True},
        {"knn_k": 0},
        {"knn_temperature": 0.0},
        {"shots": ()},
        {"shots": (0, 1)},
        {"shots": "1"},
        {"seeds": []},
        {"lambd": -1.0},
        {"max_train": 0},
        {"max_test": -5},
        {"batch_size": 0},
        {"collapse_fraction": 1.5},
        {"collapse_fraction": -0.1},
        {"on_first_epoch": "yes"},
    ],
)
def test_bad_arguments_raise(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        OnlineEvalCallback(**kwargs)
    ((problem,),) = [OnlineEvalCallback.problems(**kwargs)]  # the constructor's rules, one message each
    assert problem.startswith(name)


def test_schedule_and_list_config_arguments():
    from omegaconf import OmegaConf

    cb = OnlineEvalCallback(every_n_epochs=3, shots=OmegaConf.create([1, 2]), seeds=OmegaConf.create([0]))
    assert cb.shots == (1, 2) and cb.seeds == (0,)
    assert [e for e in range(9) if cb.is_due(e)] == [2, 5, 8]
    first = OnlineEvalCallback(every_n_epochs=3, on_first_epoch=True)
    assert [e for e in range(6) if first.is_due(e)] == [0, 2, 5]
    assert np.isclose(OnlineEvalCallback().knn_temperature, 0.07)
