"""Encoded images: decoding a batch on the device (``data.decode_on=device``) against PIL, the
host fallback for other formats, and bad images skipped or raised."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msn.data import MSNDataModule
from msn.data.decode import BadImageError, BadImageLog, EncodedImage, decode_batch, read_bad_image_log
from msn.data.folders import build_imagefolder
from tests.helpers import bad_image_folder, device_views_data, fit_steps, record_views, tiny_module


def _encoded(img: Image.Image, fmt: str, name: str, **save: object) -> EncodedImage:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return EncodedImage(buf.getvalue(), name)


def _pil_pixels(data: bytes, mode: str) -> torch.Tensor:
    arr = np.array(Image.open(io.BytesIO(data)).convert(mode))
    return torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1)).permute(2, 0, 1)


@pytest.fixture
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)) for _ in range(4)]


def test_a_batch_of_jpegs_decodes_to_the_pixels_pil_decodes(images):
    batch = [_encoded(img, "JPEG", f"{i}.jpg", quality=90) for i, img in enumerate(images)]
    out = decode_batch(batch, in_chans=3, size=None, device="cpu")
    assert out.dtype == torch.uint8 and out.shape == (4, 3, 24, 20)
    for got, data in zip(out, batch):
        assert torch.equal(got, _pil_pixels(data, "RGB"))


def test_other_formats_and_modes_fall_back_to_pil_on_the_host(images):
    batch = [
        _encoded(images[0], "PNG", "a.png"),
        _encoded(images[1].convert("CMYK"), "JPEG", "cmyk.jpg"),
        _encoded(images[2].convert("L"), "JPEG", "gray.jpg"),
        _encoded(images[3], "WEBP", "b.webp", lossless=True),
    ]
    out = decode_batch(batch, in_chans=1, size=None, device="cpu")
    assert out.shape == (4, 1, 24, 20)
    assert torch.equal(out[0], _pil_pixels(batch[0], "L"))  # PNG: PIL
    assert torch.equal(out[3], _pil_pixels(batch[3], "L"))  # WebP: PIL
    # JPEGs decoded straight to gray by libjpeg: the same luma rule as PIL's, up to rounding.
    for i in (1, 2):
        assert (out[i].int() - _pil_pixels(batch[i], "L").int()).abs().max() <= 1


def test_each_image_is_resized_and_centre_cut_to_the_load_size(images):
    wide = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8), (32, 1)))  # 32 x 64, a ramp
    batch = [_encoded(wide.convert("RGB"), "PNG", "wide.png"), _encoded(images[0], "JPEG", "x.jpg")]
    out = decode_batch(batch, in_chans=3, size=16, device="cpu")
    assert out.shape == (2, 3, 16, 16)
    # Short side 32 -> 16 halves the ramp; the centre cut keeps columns 8..23 of the 32 left.
    row = out[0, 0, 8].float()
    assert torch.all(row[1:] > row[:-1]) and 30 < row.mean() < 34


def test_an_image_neither_decoder_reads_is_replaced_and_logged(images, tmp_path):
    good = [_encoded(img, "JPEG", f"{i}.jpg") for i, img in enumerate(images[:3])]
    broken = EncodedImage(bytes(good[1])[: len(good[1]) // 2], "cut.jpg")
    garbage = EncodedImage(b"not an image", "notes.png")
    batch = [garbage, good[0], broken, good[2]]
    log = BadImageLog(tmp_path / "bad.txt")
    out = decode_batch(batch, in_chans=3, size=None, device="cpu", bad_image_log=log)
    assert out.shape[0] == 4  # the batch keeps its size
    first = _pil_pixels(good[0], "RGB")
    assert torch.equal(out[0], first)  # nothing readable before it: the first readable one
    assert torch.equal(out[2], first)  # the readable one before it
    assert set(read_bad_image_log(tmp_path / "bad.txt")) == {"notes.png", "cut.jpg"}
    with pytest.raises(BadImageError, match="cut.jpg.*on_bad_image=raise"):
        decode_batch([good[0], broken], in_chans=3, size=None, device="cpu", on_bad_image="raise")
    with pytest.raises(BadImageError, match="none of the 2 images"):
        decode_batch([garbage, broken], in_chans=3, size=None, device="cpu")


def test_images_of_different_sizes_need_a_load_size(images):
    small = images[0].resize((8, 8))
    with pytest.raises(ValueError, match="data.load_size"):
        decode_batch([_encoded(images[1], "PNG", "a"), _encoded(small, "PNG", "b")], 3, None, "cpu")


def test_with_decode_on_device_a_folder_yields_its_files_bytes(tmp_path):
    root = bad_image_folder(tmp_path / "imgs")
    ds = build_imagefolder("all", root, None, 3, decode_on="device", bad_image_log=tmp_path / "bad.txt")
    items = [ds[i] for i in range(len(ds))]
    for (data, label), (path, _) in zip(items, ds.samples):
        assert isinstance(data, EncodedImage) and label == -1
        if Path(path).name != "empty.jpg":  # an empty file is found without decoding: skipped
            assert data.name == path and bytes(data) == Path(path).read_bytes()
    assert "empty.jpg" in "".join(read_bad_image_log(tmp_path / "bad.txt"))
    copy = pickle.loads(pickle.dumps(items[0][0]))  # as the DataLoader workers send it
    assert copy == items[0][0] and copy.name == items[0][0].name


def _jpeg_folder(root: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            h, w = rng.integers(14, 30, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    (root / "a" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    return root


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=pytest.mark.cuda)])
def test_training_decodes_each_batch_on_the_device_and_skips_a_broken_jpeg(tmp_path, accelerator):
    root = _jpeg_folder(tmp_path / "jpegs")
    model = tiny_module(seed=0)
    dm = device_views_data("imagefolder", root, tmp_path, "device", batch_size=4)
    seen = record_views(dm)
    trainer = fit_steps(model, dm, 3, accelerator).trainer
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    device = "cuda" if accelerator == "gpu" else "cpu"  # decoded (nvJPEG on a GPU) and viewed there
    assert seen[0] == [((4, 1, 16, 16), device), ((4, 1, 16, 16), device), ((4, 1, 8, 8), device)]
    assert list(read_bad_image_log(tmp_path / "bad_device.txt")) == [str(root / "a" / "zz_broken.jpg")]


def test_decode_on_device_needs_views_made_on_the_device_and_encoded_files():
    with pytest.raises(ValueError, match="decode_on=device needs augment_on=device"):
        MSNDataModule(name="imagefolder", root="x", decode_on="device", load_size=16)
    with pytest.raises(ValueError, match="decode_on=device needs encoded image files"):
        MSNDataModule(name="digits", decode_on="device", augment_on="device")
    with pytest.raises(ValueError, match="decode_on must be one of"):
        MSNDataModule(name="digits", decode_on="gpu")


@pytest.mark.cuda  # nvJPEG
def test_nvjpeg_on_cuda_decodes_what_the_host_decodes(images):
    batch = [_encoded(img, "JPEG", f"{i}.jpg", quality=90) for i, img in enumerate(images)]
    batch.append(_encoded(images[0], "PNG", "host.png"))  # decoded on the host, then moved
    out = decode_batch(batch, in_chans=3, size=16, device="cuda")
    assert out.device.type == "cuda" and out.shape == (5, 3, 16, 16)
    host = decode_batch(batch, in_chans=3, size=16, device="cpu")
    # nvJPEG's IDCT and upsampling may round differently from libjpeg-turbo's.
    assert (out.cpu().int() - host.int()).abs().float().mean() < 2.0
