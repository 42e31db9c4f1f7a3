"""msn.cli.extract: features of every image in a folder, unreadable files listed, bad input stopped early."""

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from msn.backbone import extract
from msn.checks import ConfigError
from msn.cli.common import CONFIG_DIR
from msn.cli.extract import output_paths, run_extract
from msn.data.folders import list_images
from msn.data.transforms import eval_transform


def _run(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return run_extract(compose("extract", overrides=["device=cpu", "batch_size=3", *overrides]))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, pretrained):
    root = tmp_path_factory.mktemp("extract")
    ckpt, model = pretrained
    images = root / "images"
    rng = np.random.default_rng(0)
    for rel in ("a/1.png", "a/2.jpg", "b/deep/3.PNG", "4.bmp", "b/5.png", "b/6.png", "7.png"):
        path = images / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "RGB" if rel.endswith("jpg") else "L"  # converted to the encoder's one channel
        shape = (20, 24, 3) if mode == "RGB" else (16, 16)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path)
    (images / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.txt").write_text("not an image")
    (images / ".hidden").mkdir()
    Image.new("L", (16, 16)).save(images / ".hidden" / "skip.png")
    return root, ckpt, model, images


def test_features_paths_and_unreadable_list(setup, tmp_path):
    root, ckpt, model, images = setup
    out = tmp_path / "feats" / "digits"  # .npy is added
    result = _run(f"ckpt={ckpt}", f"input={images}", f"out={out}", "crop_pct=1.0")
    npy, csv_path, bad_path = output_paths(out)
    feats = np.load(npy)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    with open(bad_path) as f:
        bad = {r["path"]: r["error"] for r in csv.DictReader(f)}
    assert result["images"] == 7 and result["unreadable"] == 2
    assert feats.shape == (7, 96) and feats.dtype == np.float32
    assert [r["index"] for r in rows] == [str(i) for i in range(7)]
    assert set(bad) == {str(images / "b" / "broken.png"), str(images / "empty.jpg")}
    # Row i is the target encoder's official feature of file i, computed here one image at a time.
    tf = eval_transform(16, 1, [0.5], [0.5], 1.0)
    for row, vec in zip(rows, feats):
        with Image.open(row["path"]) as img:
            x = tf(img).unsqueeze(0)
        with torch.no_grad():
            expected = extract(model.target_encoder, x, "cls_prenorm")[0].numpy()
        np.testing.assert_allclose(vec, expected, atol=1e-5)
    assert [r["path"] for r in rows] == [str(p) for p in list_images(images) if str(p) not in bad]


def test_feature_kind_and_other_size(setup, tmp_path):
    _, ckpt, _, images = setup
    _run(f"ckpt={ckpt}", f"input={images}", f"out={tmp_path / 'f.npy'}", "features=avgpool", "img_size=32")
    assert np.load(tmp_path / "f.npy").shape == (7, 96)


def test_bad_input_stops_before_compute(setup, tmp_path):
    _, ckpt, _, images = setup
    with pytest.raises(ConfigError, match="input='/no/such/folder' is not an existing folder") as err:
        _run(f"ckpt={ckpt}", "input=/no/such/folder", f"out={tmp_path / 'x'}", "features=pooled")
    assert "features='pooled' is unknown" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files under"):
        _run(f"ckpt={ckpt}", f"input={tmp_path / 'empty'}", f"out={tmp_path / 'x'}")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        _run(f"ckpt={tmp_path / 'none.ckpt'}", f"input={images}", f"out={tmp_path / 'x'}")
    # Image files of which none decodes: an error naming them, and no (0, 0) array.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (broken / "b.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 2 image files under .* decodes") as err:
        _run(f"ckpt={ckpt}", f"input={broken}", f"out={tmp_path / 'x'}")
    assert str(broken / "a.png") in str(err.value) and str(broken / "b.jpg") in str(err.value)
    assert not list(tmp_path.glob("x*"))


@pytest.mark.slow
def test_command_line_entry(setup, tmp_path):
    _, ckpt, _, images = setup
    cmd = [sys.executable, "-m", "msn.cli.extract", f"ckpt={ckpt}", f"input={images}", "out=f.npy"]
    cmd.append("device=cpu")
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 unreadable image file(s) skipped" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.csv", "f.npy", "f.unreadable.csv"]
