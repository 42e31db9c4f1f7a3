"""finetune.py mode=finetune: the MAE recipe from timm's parts, label subsets, checkpoints, export."""

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from msn.checks import ConfigError
from msn.cli.common import CONFIG_DIR
from msn.cli.evaluate import evaluate
from msn.eval.finetune import FineTuneModule, _posterize, classify, label_subset, train_transform
from msn.eval.lowshot import sample_k_per_class
from msn.eval.splits import sample_percent_per_class
from msn.io import read_checkpoint
from tests.artefacts import ENCODER, official_dict, timm_vit
from tests.helpers import composed

X = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))


def _cfg(tmp_path, *overrides):
    return composed(
        "finetune",
        f"output_dir={tmp_path}",
        "device=cpu",
        "mode=finetune",
        "finetune.progress=false",
        *overrides,
    )


def test_classifier_is_timm_forward_on_the_normalised_class_token():
    model = FineTuneModule(encoder=ENCODER, num_classes=5, head_init_std=0.5).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), model.vit(X))
        expected = model.vit.head(model.vit.forward_features(X)[:, 0])
        torch.testing.assert_close(classify(model.vit, X), expected)
    assert model.hparams.encoder == ENCODER and model.vit.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)


def test_layer_decay_groups_and_warmup_cosine_schedule():
    lr, min_lr, decay = 1e-3, 1e-6, 0.65
    model = FineTuneModule(encoder=ENCODER, num_classes=3, lr=lr, min_lr=min_lr, layer_decay=decay)
    model._trainer = SimpleNamespace(estimated_stepping_batches=100, max_epochs=10)  # 10 steps per epoch
    conf = model.configure_optimizers()
    optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]

    def depth_of(name: str) -> int:
        # BEiT/MAE layer ids: embeddings 0, block i -> i + 1, classifier depth + 1; timm's
        # group_matcher puts the final norm with the last block (MAE: with the classifier).
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return 2 if name.startswith("norm.") else 3

    names = {id(p): n for n, p in model.vit.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            assert group["lr_scale"] == pytest.approx(decay ** (3 - depth_of(name))), name
            no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name

    def expected(step: int) -> float:  # warmup 5 epochs = 50 steps, then cosine over the other 50
        if step < 50:
            return min_lr + (lr - min_lr) * step / 50
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (step - 50) / 50))

    for step in (0, 10, 49, 50, 75, 99):
        scheduler.step_update(step)
        head = next(g for g in optimizer.param_groups if g["lr_scale"] == 1.0)
        assert head["lr"] == pytest.approx(expected(step), rel=1e-6), step


def test_label_subsets_are_the_lowshot_splits():
    labels = np.repeat(np.arange(10), 40)
    ten, name = label_subset(labels, 10, None, seed=3)
    assert name == "10%" and np.array_equal(ten, sample_percent_per_class(labels, 10, 3)) and len(ten) == 40
    two, name = label_subset(labels, None, 2, seed=3)
    assert name == "k=2" and np.array_equal(two, sample_k_per_class(labels, 2, 3))
    assert set(two) <= set(ten)  # nested, as the low-shot splits
    assert len(label_subset(labels, None, None, 0)[0]) == 400
    with pytest.raises(ValueError, match="exclusive"):
        label_subset(labels, 10, 2, 0)


def test_randaugment_posterize_to_zero_bits_is_black_not_an_error():
    cfg = OmegaConf.load(CONFIG_DIR / "eval" / "finetune.yaml")
    tf = train_transform(16, [0.5], [0.5], cfg)
    ops = [op for step in tf.transforms for op in getattr(step, "ops", ())]
    assert {op.name for op in ops if op.aug_fn is _posterize} == {"PosterizeIncreasing"}
    img = Image.fromarray(np.full((8, 8), 200, dtype=np.uint8), mode="L")
    assert np.asarray(_posterize(img, 0)).max() == 0
    assert np.array_equal(np.asarray(_posterize(img, 4)), np.full((8, 8), 192))


def test_finetune_run_from_official_checkpoint_then_export(tmp_path):
    """mode=finetune on 10 % of digits from an official .pth.tar: per-epoch accuracy, best and last
    checkpoints; the fine-tuned checkpoint is a first-class input of msn.io.export / msn.io."""
    torch.save(official_dict(timm_vit(seed=40)), tmp_path / "msn.pth.tar")
    overrides = [
        f"ckpt={tmp_path / 'msn.pth.tar'}",
        "finetune.epochs=2",
        "finetune.batch_size=16",
        "finetune.label_percent=10",
        "finetune.hflip=0",
        "finetune.lr=1e-3",
    ]
    out = evaluate(_cfg(tmp_path / "run", *overrides))
    result = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert result["labels"] == "10%" and result["train"] == 136 and result["test"] == 450
    assert len(result["val_accuracy"]) == 2 and result["best_accuracy"] == max(result["val_accuracy"])
    assert f"{result['best_accuracy']:.1f} % best" in out["report"]
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "best.ckpt").is_file() and (ckpts / "last.ckpt").is_file()
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        logged = list(csv.DictReader(f))
    assert [float(r["val/acc"]) for r in logged if r.get("val/acc")] == pytest.approx(result["val_accuracy"])

    ckpt = read_checkpoint(ckpts / "last.ckpt")
    assert ckpt.format == "finetuned" and ckpt.id2label == {i: str(i) for i in range(10)}
    model = FineTuneModule.load_from_checkpoint(ckpts / "last.ckpt").eval()
    with torch.no_grad():
        logits = torch.nn.functional.linear(model.vit.forward_features(X)[:, 0], **ckpt.classifier)
        torch.testing.assert_close(logits, model(X))
    # the same checkpoint serves the frozen-feature modes too
    knn = evaluate(_cfg(tmp_path / "knn", f"ckpt={ckpts / 'best.ckpt'}", "mode=knn", "cache_dir=null"))
    assert "kNN accuracy" in knn["report"]
    cfg = _cfg(tmp_path / "lowshot", f"ckpt={ckpts / 'best.ckpt'}", "mode=lowshot", "cache_dir=null")
    cfg.lowshot.update(shots=[1], random_init=False, raw_pixels=False)
    evaluate(cfg)
    # its encoder has seen labels, so its row is not called an MSN one
    assert list(json.loads((tmp_path / "lowshot" / "lowshot.json").read_text())) == ["fine-tuned encoder"]


def test_bad_finetune_settings_stop_before_compute(tmp_path):
    torch.save(official_dict(timm_vit(seed=41)), tmp_path / "msn.pth.tar")
    ckpt = f"ckpt={tmp_path / 'msn.pth.tar'}"
    with pytest.raises(ConfigError, match="finetune.batch_size=15 must be even with mixup") as err:
        evaluate(
            _cfg(
                tmp_path, ckpt, "finetune.batch_size=15", "finetune.label_percent=1", "finetune.label_shots=1"
            )
        )
    assert "label_percent and finetune.label_shots are exclusive" in str(err.value)
    with pytest.raises(ConfigError, match=r"crop_scale=\[0.5, 0.2\] must be"):
        evaluate(_cfg(tmp_path, ckpt, "finetune.crop_scale=[0.5,0.2]"))
    with pytest.raises(ValueError, match="batch_size=64 is larger than the 10 labelled training images"):
        evaluate(_cfg(tmp_path, ckpt, "finetune.label_shots=1"))
    assert not (tmp_path / "checkpoints").exists()
