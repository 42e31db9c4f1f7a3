import json
import math

import lightning as L
import numpy as np
import pytest
import torch

from msn.eval.linear_probe import LinearProbe, run_linear_probe


class Recorder(L.Callback):
    """Keeps what a test needs to look at after ``run_linear_probe``: lr per step, the optimizer,
    the scheduler and the trained module."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self, trainer, pl_module) -> None:
        self.optimizer = trainer.optimizers[0]
        self.scheduler = trainer.lr_scheduler_configs[0].scheduler
        self.interval = trainer.lr_scheduler_configs[0].interval
        self.module = pl_module


def blobs(n_train: int = 240, n_test: int = 90, dim: int = 16, seed: int = 0):
    """Three well-separated Gaussian blobs (linearly separable), with an offset so that the
    LayerNorm / L2 steps have something to undo."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim)) * 6.0
    y = rng.integers(0, 3, size=n_train + n_test)
    x = (centres[y] + rng.normal(size=(len(y), dim)) + 3.0).astype(np.float32)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def probe(data, **kw):
    rec = Recorder()
    kw = {"epochs": 3, "batch_size": 32, "lr": 1.0, "accelerator": "cpu", "progress": False, **kw}
    return run_linear_probe(*data, callbacks=[rec], **kw), rec


@pytest.fixture(scope="module")
def trained():
    data = blobs()
    result, rec = probe(data)
    return data, result, rec


def test_separable_problem_is_solved_and_accuracy_is_recomputable(trained):
    (train_x, train_y, test_x, test_y), result, rec = trained
    assert result["accuracy"] == pytest.approx(100.0)
    assert result["train_accuracy"] == pytest.approx(100.0)
    model = rec.module.cpu().eval()
    with torch.no_grad():
        test_pred = model(torch.from_numpy(test_x)).argmax(1).numpy()
        train_pred = model(torch.from_numpy(train_x)).argmax(1).numpy()
    assert result["accuracy"] == pytest.approx(100.0 * np.mean(test_pred == test_y))
    assert result["train_accuracy"] == pytest.approx(100.0 * np.mean(train_pred == train_y))
    # the LayerNorm's affine parameters are trained too
    assert not torch.allclose(model.norm.weight, torch.ones(16))
    assert result["num_classes"] == 3 and result["train"] == 240 and result["test"] == 90


def test_accuracy_counts_mistakes():
    # labels unrelated to the features: the probe cannot generalise, and the reported accuracy
    # must still match the module's own predictions
    train_x, train_y, test_x, _ = blobs(seed=1)
    test_y = np.random.default_rng(5).integers(0, 3, size=len(test_x))
    result, rec = probe((train_x, train_y, test_x, test_y), epochs=1)
    with torch.no_grad():
        pred = rec.module.cpu()(torch.from_numpy(test_x)).argmax(1).numpy()
    assert result["accuracy"] == pytest.approx(100.0 * np.mean(pred == test_y))
    assert result["accuracy"] < 90.0


def test_forward_is_layernorm_l2_linear():
    torch.manual_seed(0)
    model = LinearProbe(8, 5, lr=0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    x = torch.randn(7, 8, dtype=torch.float64) * 3 + 1
    w, b = model.norm.weight.double(), model.norm.bias.double()
    mu, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    h = (x - mu) / torch.sqrt(var + model.norm.eps) * w + b
    h = h / h.norm(dim=1, keepdim=True)
    expected = h @ model.fc.weight.double().T + model.fc.bias.double()
    assert model.norm.elementwise_affine
    torch.testing.assert_close(model(x.float()).double(), expected, atol=1e-5, rtol=1e-5)
    # official init: N(0, 0.01) weights, zero bias
    fresh = LinearProbe(256, 10, lr=0.1)
    assert fresh.fc.bias.abs().max() == 0
    assert fresh.fc.weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_optimizer_and_cosine_schedule(trained):
    _, result, rec = trained
    opt = rec.optimizer
    assert type(opt) is torch.optim.SGD
    group = opt.param_groups[0]
    assert group["nesterov"] is True and group["momentum"] == 0.9 and group["weight_decay"] == 0.0
    assert rec.interval == "step"
    steps = 3 * math.ceil(240 / 32)
    assert len(rec.lrs) == steps and rec.scheduler.T_max == steps
    expected = [0.5 * result["lr"] * (1 + math.cos(math.pi * t / steps)) for t in range(steps)]
    np.testing.assert_allclose(rec.lrs, expected, rtol=1e-6, atol=1e-9)
    assert rec.lrs[0] == pytest.approx(1.0)
    assert rec.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)


def test_lr_linear_scaling():
    data = blobs(n_train=64, n_test=16)
    result, rec = probe(data, lr=None, epochs=1, batch_size=64)
    assert result["lr"] == pytest.approx(6.4 * 64 / 16384)
    assert rec.lrs[0] == pytest.approx(result["lr"])
    result, _ = probe(data, lr=None, epochs=1, batch_size=64, base_lr=1.0, base_batch=32)
    assert result["lr"] == pytest.approx(2.0)


def test_deterministic():
    data = blobs(n_train=120, n_test=60, seed=3)
    kw = {"epochs": 2, "lr": 0.05, "seed": 7}
    (a, rec_a), (b, rec_b) = probe(data, **kw), probe(data, **kw)
    assert a == b
    state_a, state_b = rec_a.module.state_dict(), rec_b.module.state_dict()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    _, rec_c = probe(data, **{**kw, "seed": 8})
    assert not torch.equal(rec_c.module.fc.weight, rec_a.module.fc.weight)


def test_output_files(tmp_path):
    result, _ = probe(blobs(n_train=64, n_test=16), epochs=1, output_dir=tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "linear.json").read_text())
    assert saved == result
    assert {"accuracy", "train_accuracy", "epochs", "lr", "batch_size"} <= set(saved)
    header = (tmp_path / "out" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss_epoch", "train/acc_epoch", "val/acc", "val/loss", "schedule/lr"} <= set(header)


def test_bad_input():
    x, y = np.zeros((4, 3), np.float32), np.arange(4) % 2
    with pytest.raises(ValueError, match="dataset has no labels"):
        run_linear_probe(x, -np.ones(4, dtype=int), x, y)
    with pytest.raises(ValueError, match="dataset has no labels"):
        run_linear_probe(x, y, x, -np.ones(4, dtype=int))
    with pytest.raises(ValueError, match=r"train_y must have shape \(4,\)"):
        run_linear_probe(x, y[:3], x, y)
    with pytest.raises(ValueError, match="feature dims differ"):
        run_linear_probe(x, y, np.zeros((4, 5)), y)
    with pytest.raises(ValueError, match="2-D"):
        run_linear_probe(x[0], y, x, y)
    with pytest.raises(ValueError, match="integer"):
        run_linear_probe(x, y.astype(float), x, y)
    with pytest.raises(ValueError, match="epochs=0"):
        run_linear_probe(x, y, x, y, epochs=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        run_linear_probe(x, y, x, y, batch_size=0)
    with pytest.raises(ValueError, match="lr=0"):
        run_linear_probe(x, y, x, y, lr=0.0)
    with pytest.raises(ValueError, match="lr=-"):
        run_linear_probe(x, y, x, y, base_lr=-1.0)
