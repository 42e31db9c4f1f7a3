"""msn.io.export: our checkpoints as transformers, timm and official artefacts, checked by those
libraries."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from timm.models.vision_transformer import VisionTransformer

from msn.checks import ConfigError
from msn.cli.common import CONFIG_DIR
from msn.cli.export import export
from msn.eval.finetune import classify
from msn.io import init_msn_module, read_checkpoint
from msn.module import MSNModule
from tests.artefacts import (
    finetuned_checkpoint,
    hidden_states,
    official_dict,
    timm_vit,
)

ROOT = Path(__file__).resolve().parents[2]
X = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
TOL = {"atol": 1e-5, "rtol": 0}


def _export(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return export(compose("export", overrides=list(overrides)))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    return finetuned_checkpoint(tmp_path_factory.mktemp("ft") / "best.ckpt", seed=21, num_classes=3)


def test_hf_export_loads_in_transformers_without_warnings_and_matches(pretrained, tmp_path):
    transformers = pytest.importorskip("transformers")
    path, model = pretrained
    out = _export(f"ckpt={path}", "format=hf", f"out={tmp_path / 'hf'}")
    assert sorted(Path(f).name for f in out["files"]) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    hf, info = transformers.ViTMSNModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.layer_norm_eps == 1e-6 and hf.config.num_channels == 1
    with torch.no_grad():
        expected = hidden_states(model.target_encoder, X)  # the target encoder, not the anchor
        torch.testing.assert_close(hf.eval()(pixel_values=X).last_hidden_state, expected, **TOL)
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 16, "width": 16} and processor["image_mean"] == [0.5]


def test_hf_round_trip_and_anchor_encoder(pretrained, tmp_path):
    path, model = pretrained
    _export(f"ckpt={path}", "format=hf", f"out={tmp_path / 'anchor'}", "encoder=encoder")
    ckpt = read_checkpoint(tmp_path / "anchor")
    fresh = MSNModule(**{**dict(model.hparams), "num_prototypes": 8})
    init_msn_module(fresh, ckpt)
    torch.testing.assert_close(hidden_states(fresh.target_encoder, X), hidden_states(model.encoder, X), **TOL)


def test_finetuned_classifier_exports_to_hf_with_same_logits(finetuned, tmp_path):
    transformers = pytest.importorskip("transformers")
    path, model = finetuned
    _export(f"ckpt={path}", "format=hf", f"out={tmp_path / 'cls'}")
    hf, info = transformers.ViTMSNForImageClassification.from_pretrained(
        tmp_path / "cls", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.config.id2label == {0: "class_0", 1: "class_1", 2: "class_2"}
    assert hf.config.architectures == ["ViTMSNForImageClassification"]
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(pixel_values=X).logits, model(X), **TOL)


def test_timm_export_loads_with_timm_create_model(pretrained, finetuned, tmp_path):
    timm = pytest.importorskip("timm")
    path, model = pretrained
    _export(f"ckpt={path}", "format=timm", f"out={tmp_path / 'timm'}")
    vit = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(X), hidden_states(model.target_encoder, X), **TOL)
    ft_path, ft_model = finetuned
    _export(f"ckpt={ft_path}", "format=timm", f"out={tmp_path / 'timm_cls'}")
    clf = timm.create_model(f"local-dir:{tmp_path / 'timm_cls'}", pretrained=True).eval()
    assert clf.pretrained_cfg["label_names"] == ["class_0", "class_1", "class_2"]
    with torch.no_grad():
        torch.testing.assert_close(clf(X), ft_model(X), **TOL)
        torch.testing.assert_close(classify(clf, X), clf(X), **TOL)


def test_official_export_reads_like_logistic_eval_and_round_trips(pretrained, tmp_path):
    path, model = pretrained
    out = _export(f"ckpt={path}", "format=official", f"out={tmp_path / 'msn.pth.tar'}")
    state = torch.load(out["files"][0], map_location="cpu", weights_only=True)
    assert {"encoder", "target_encoder", "prototypes", "epoch", "lr", "temperature"} <= set(state)
    assert state["epoch"] == 3 and "opt" not in state

    # logistic_eval.py: strip "module.", load into a DeiT-style ViT (timm names) with strict=False.
    target = {k.replace("module.", ""): v for k, v in state["target_encoder"].items()}
    deit = VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, embed_dim=96, depth=2, num_heads=3, num_classes=0
    )
    missing, unexpected = deit.load_state_dict(target, strict=False)
    assert missing == [] and set(unexpected) == {f"fc.{k}" for k in model.target_head.state_dict()}
    with torch.no_grad():
        torch.testing.assert_close(
            deit.eval().forward_features(X), hidden_states(model.target_encoder, X), **TOL
        )

    # ...and as a full official checkpoint it restores every part of the pre-training module.
    fresh = MSNModule(**dict(model.hparams))
    init_msn_module(fresh, out["files"][0])
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_any_format_to_any_format(tmp_path):
    """An official released checkpoint -> HF folder -> official again keeps the encoder."""
    source = timm_vit(seed=22)
    torch.save(official_dict(source), tmp_path / "released.pth.tar")
    _export(f"ckpt={tmp_path / 'released.pth.tar'}", "format=hf", f"out={tmp_path / 'hf'}")
    out = _export(f"ckpt={tmp_path / 'hf'}", "format=official", f"out={tmp_path / 'again'}")
    assert Path(out["files"][0]).name == "hf.pth.tar"
    back = torch.load(out["files"][0], weights_only=True)
    assert set(back) == {"target_encoder"}  # HF holds no head, anchor or prototypes
    for key, value in source.state_dict().items():
        torch.testing.assert_close(back["target_encoder"][f"module.{key}"], value)


def test_bad_requests_fail_before_any_work(pretrained, tmp_path):
    path, _ = pretrained
    with pytest.raises(ConfigError, match="format='onnx' is unknown; allowed: hf, timm, official") as err:
        _export(f"ckpt={path}", "format=onnx", f"out={tmp_path}", "encoder=student")
    assert "encoder='student' is unknown" in str(err.value)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        _export(f"ckpt={tmp_path / 'nope.ckpt'}", f"out={tmp_path / 'x'}")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_command_line_entry(pretrained, tmp_path):
    path, _ = pretrained
    cmd = [sys.executable, "-m", "msn.cli.export", f"ckpt={path}", "format=hf", f"out={tmp_path / 'cli'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model.safetensors" in proc.stdout and (tmp_path / "cli" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]  # no outputs/ or .hydra/ left behind
    bad = subprocess.run(
        [*cmd[:3], "ckpt=/no/such.ckpt", "out=x"], cwd=tmp_path, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "no such checkpoint file" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("fmt", ["hf", "timm", "official"])
def test_exported_files_get_the_users_umask(pretrained, tmp_path, fmt):
    import os
    import stat

    path, _ = pretrained
    old = os.umask(0o027)
    try:
        _export(f"ckpt={path}", f"format={fmt}", f"out={tmp_path / fmt}")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / fmt).rglob("*") if p.is_file()] or [tmp_path / fmt]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o640 for p in files), [
        (p.name, oct(p.stat().st_mode)) for p in files
    ]
