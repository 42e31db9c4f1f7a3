"""Tests for msn.data: multi-view transform, datasets and the data module."""

from __future__ import annotations

import gzip
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from msn.data import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MSNDataModule,
    MultiViewTransform,
    build_dataset,
    eval_transform,
    has_labels,
    num_classes,
)
from msn.data.datasets import DEFAULT_FASHION_MNIST_DIR, read_idx
from msn.data.decode import BadImageError, bad_image_summary, read_bad_image_log
from msn.data.transforms import PILGaussianBlur, blur_kernel_size
from tests.helpers import UNREADABLE, bad_image_folder

# Small views keep the whole file fast on 2 CPU cores.
SMALL = {"rand_size": 16, "focal_size": 8, "rand_views": 2, "focal_views": 3}
NO_AUG = {
    "rand_scale": (1.0, 1.0),
    "focal_scale": (1.0, 1.0),
    "color_jitter": 0.0,
    "color_jitter_p": 0.0,
    "grayscale_p": 0.0,
    "blur_p": 0.0,
    "hflip_p": 0.0,
}


def _rgb_image(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mode="RGB")


def _save_images(folder: Path, n: int, size: int = 12, ext: str = ".png", mode: str = "RGB") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(folder / f"img{i}{ext}")


# --------------------------------------------------------------------------------------------------------
# MultiViewTransform / eval_transform
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_chans,input_mode", [(3, "RGB"), (3, "L"), (3, "P"), (1, "L"), (1, "RGB")])
def test_multiview_shapes_and_channels(in_chans: int, input_mode: str) -> None:
    tf = MultiViewTransform(**SMALL, in_chans=in_chans)
    img = _rgb_image(20).convert(input_mode)
    views = tf(img)
    assert tf.num_views == 1 + 2 + 3 == len(views)
    # Target view first, then rand_views anchors at rand_size, then focal views at focal_size.
    for v in views[:3]:
        assert v.shape == (in_chans, 16, 16) and v.dtype == torch.float32
    for v in views[3:]:
        assert v.shape == (in_chans, 8, 8)


def test_official_defaults() -> None:
    tf = MultiViewTransform()
    assert tf.num_views == 12
    assert (tf.rand_size, tf.focal_size, tf.rand_scale, tf.focal_scale) == (224, 96, (0.3, 1.0), (0.05, 0.3))
    assert tf.mean == IMAGENET_MEAN and tf.std == IMAGENET_STD
    gray = MultiViewTransform(in_chans=1)
    assert gray.mean == (0.5,) and gray.std == (0.5,)
    assert tf.interpolation == "bilinear"
    # Device blur: cut at 3 sigma of the largest sigma, never longer than the view allows.
    assert [blur_kernel_size(2.0, s) for s in (224, 96, 8)] == [13, 13, 7]
    assert blur_kernel_size(0.1, 224) == 3


def test_views_random_but_reproducible() -> None:
    tf = MultiViewTransform(**SMALL)
    img = _rgb_image(32)
    torch.manual_seed(0)
    a = tf(img)
    torch.manual_seed(0)
    b = tf(img)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    # The two anchor views and the target use independent randomness.
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
    assert not torch.equal(a[3], a[4])


def test_blur_is_pils_gaussian_blur_with_a_uniform_radius() -> None:
    from PIL import ImageFilter

    img = _rgb_image(96, seed=1)
    torch.manual_seed(3)
    radius = 0.1 + float(torch.rand(1)) * (2.0 - 0.1)
    torch.manual_seed(3)
    out = PILGaussianBlur((0.1, 2.0))(img)
    assert np.array_equal(np.asarray(out), np.asarray(img.filter(ImageFilter.GaussianBlur(radius=radius))))
    # A point spreads by its radius whatever the view size (no kernel cut at 10 % of 96 px).
    dot = Image.new("L", (96, 96), 0)
    dot.putpixel((48, 48), 255)
    spread = np.asarray(dot.filter(ImageFilter.GaussianBlur(radius=2.0)))
    assert spread[48, 48 + 5] > 0


def test_crop_interpolation_bilinear_by_default_bicubic_as_option() -> None:
    from torchvision.transforms import InterpolationMode, RandomResizedCrop

    for name, mode in (("bilinear", InterpolationMode.BILINEAR), ("bicubic", InterpolationMode.BICUBIC)):
        tf = (
            MultiViewTransform(**SMALL, interpolation=name)
            if name != "bilinear"
            else MultiViewTransform(**SMALL)
        )
        for view_tf in (tf.rand_transform, tf.focal_transform):
            crop = view_tf.transforms[0]
            assert isinstance(crop, RandomResizedCrop) and crop.interpolation == mode
    with pytest.raises(ValueError, match="interpolation must be one of bilinear, bicubic"):
        MultiViewTransform(**SMALL, interpolation="nearest")


def test_disabled_augmentations_equal_eval_transform() -> None:
    img = _rgb_image(24, seed=3)
    for in_chans in (1, 3):
        tf = MultiViewTransform(**SMALL, **NO_AUG, in_chans=in_chans)
        views = tf(img)
        ref_rand = eval_transform(16, in_chans=in_chans, crop_pct=1.0)(img)
        ref_focal = eval_transform(8, in_chans=in_chans, crop_pct=1.0)(img)
        for v in views[:3]:
            torch.testing.assert_close(v, ref_rand, atol=1e-5, rtol=0)
        for v in views[3:]:
            torch.testing.assert_close(v, ref_focal, atol=1e-5, rtol=0)


def test_eval_transform_center_crop_and_normalisation() -> None:
    img = _rgb_image(64)
    x = eval_transform(28, crop_pct=0.875)(img)  # resize to 32, crop 28
    assert x.shape == (3, 28, 28)
    g = eval_transform(10, in_chans=1, mean=[0.0], std=[1.0], crop_pct=1.0)(Image.new("L", (10, 10), 255))
    assert g.shape == (1, 10, 10) and torch.allclose(g, torch.ones_like(g))


def test_transform_is_picklable_and_accepts_listconfig() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"rand_scale": [0.5, 1.0], "mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]})
    tf = MultiViewTransform(**SMALL, rand_scale=cfg.rand_scale, mean=cfg.mean, std=cfg.std)
    assert tf.rand_scale == (0.5, 1.0) and tf.mean == (0.1, 0.2, 0.3)
    # DataLoader workers started with "spawn" need picklable transforms.
    assert len(pickle.loads(pickle.dumps(tf))(_rgb_image(16))) == tf.num_views


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"rand_size": 0}, "rand_size"),
        ({"focal_size": -1}, "focal_size"),
        ({"rand_views": 0}, "rand_views"),
        ({"focal_views": -1}, "focal_views"),
        ({"rand_scale": (0.0, 1.0)}, "rand_scale"),
        ({"focal_scale": (0.5, 0.2)}, "focal_scale"),
        ({"focal_scale": (0.1, 1.5)}, "focal_scale"),
        ({"rand_scale": (0.5,)}, "rand_scale"),
        ({"color_jitter": -0.1}, "color_jitter"),
        ({"color_jitter_p": 1.5}, "color_jitter_p"),
        ({"grayscale_p": -0.1}, "grayscale_p"),
        ({"blur_p": 2}, "blur_p"),
        ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"),
        ({"hflip_p": -1}, "hflip_p"),
        ({"in_chans": 2}, "in_chans"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"in_chans": 1, "std": (0.2, 0.2, 0.2)}, "std"),
        ({"std": (1.0, 0.0, 1.0)}, "std"),
    ],
)
def test_transform_validation(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{key} "):
        MultiViewTransform(**kwargs)
    ((problem,),) = [MultiViewTransform.problems(**kwargs)]  # what the constructor says, one message
    assert problem.startswith(f"{key} ")


def test_transform_problems_are_all_reported_at_once() -> None:
    assert MultiViewTransform.problems() == [] and MultiViewTransform.problems(**SMALL, in_chans=1) == []
    assert MultiViewTransform.problems(rand_views=0, hflip_p=2, in_chans=1, mean=(0.5, 0.5)) == [
        "rand_views must be an integer >= 1, got 0",
        "hflip_p must be a probability in [0, 1], got 2",
        "mean must have one entry per channel (in_chans=1), got 2 entries: (0.5, 0.5)",
    ]
    with pytest.raises(ValueError, match="^rand_size must be an integer >= 1, got 0; focal_views must"):
        MultiViewTransform(rand_size=0, focal_views=-1)
    with pytest.raises(TypeError):
        MultiViewTransform.problems(bogus=1)


def test_eval_transform_validation() -> None:
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(32, crop_pct=0.0)
    with pytest.raises(ValueError, match="img_size"):
        eval_transform(0)


# --------------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------------
def test_digits_splits_stratified_and_pixels() -> None:
    train = build_dataset("digits", "train", in_chans=1)
    test = build_dataset("digits", "test", in_chans=1)
    full = build_dataset("digits", "all", in_chans=1)
    assert (len(train), len(test), len(full)) == (1347, 450, 1797)
    assert num_classes(train) == num_classes("digits") == 10 and has_labels(train) and has_labels(test)
    # Every class appears in both splits in (almost exactly) its overall proportion.
    counts_all = np.bincount(full.targets, minlength=10)
    counts_test = np.bincount(test.targets, minlength=10)
    assert (np.bincount(train.targets, minlength=10) > 0).all() and (counts_test > 0).all()
    assert np.abs(counts_test - counts_all * 0.25).max() <= 1

    # train and test partition the dataset: as multisets of (image, label) rows they add up to "all".
    def rows(ds: object) -> Counter:
        return Counter(img.tobytes() + bytes([lbl]) for img, lbl in zip(ds.data, ds.targets, strict=True))

    assert rows(train) + rows(test) == rows(full)
    digits = load_digits()

    img, label = full[5]
    assert (
        isinstance(img, Image.Image) and img.mode == "L" and img.size == (8, 8) and label == digits.target[5]
    )
    expected = np.round(digits.images[5] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(img), expected)
    rgb, _ = build_dataset("digits", "all", in_chans=3)[5]
    assert rgb.mode == "RGB" and (np.asarray(rgb)[..., 1] == expected).all()


def test_digits_with_transform_and_bad_split() -> None:
    ds = build_dataset("digits", "test", transform=MultiViewTransform(**SMALL, in_chans=1), in_chans=1)
    views, label = ds[0]
    assert len(views) == 6 and views[0].shape == (1, 16, 16) and isinstance(label, int)
    with pytest.raises(ValueError, match="allowed"):
        build_dataset("digits", "val")


def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(ValueError, match="imagefolder") as e:
        build_dataset("mnist")
    assert all(n in str(e.value) for n in DATASETS)


# --------------------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------------------
def _gz(path: Path, payload: bytes) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(payload)
    return path


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(DEFAULT_FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_fashion_mnist_real_files() -> None:
    train = build_dataset("fashion_mnist", "train", in_chans=1)
    test = build_dataset("fashion_mnist", "test", in_chans=1)
    assert (len(train), len(test)) == (60000, 10000)
    assert set(np.unique(train.targets)) == set(range(10)) == set(np.unique(test.targets))
    assert num_classes(test) == 10 and test.classes[0] == "T-shirt/top"
    # First test image/label straight from the gzip: 16-byte image header, 8-byte label header.
    with gzip.open(os.path.join(DEFAULT_FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")) as f:
        first = np.frombuffer(f.read(16 + 784)[16:], dtype=np.uint8).reshape(28, 28)
    with gzip.open(os.path.join(DEFAULT_FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")) as f:
        first_label = f.read(9)[8]
    img, label = test[0]
    assert img.mode == "L" and img.size == (28, 28) and label == first_label
    np.testing.assert_array_equal(np.asarray(img), first)
    assert build_dataset("fashion_mnist", "test", in_chans=3)[0][0].mode == "RGB"


def test_fashion_mnist_from_root_and_corrupt_files(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = (0x803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (2, 3, 4))
    _gz(tmp_path / "t10k-images-idx3-ubyte.gz", header + images.tobytes())
    _gz(
        tmp_path / "t10k-labels-idx1-ubyte.gz",
        (0x801).to_bytes(4, "big") + (2).to_bytes(4, "big") + b"\x03\x07",
    )
    ds = build_dataset("fashion_mnist", "test", root=str(tmp_path), in_chans=1)
    assert len(ds) == 2 and ds[1][1] == 7
    np.testing.assert_array_equal(np.asarray(ds[1][0]), images[1])

    bad = tmp_path / "bad"
    bad.mkdir()
    # Wrong magic number (labels magic in an images file).
    _gz(bad / "a.gz", (0x801).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x00")
    with pytest.raises(ValueError, match="magic number"):
        read_idx(bad / "a.gz", 0x803)
    # Truncated payload.
    _gz(bad / "b.gz", header + images.tobytes()[:-5])
    with pytest.raises(ValueError, match="corrupt IDX"):
        read_idx(bad / "b.gz", 0x803)
    # Not gzip at all.
    (bad / "c.gz").write_bytes(b"not a gzip file")
    with pytest.raises(ValueError, match="gzip"):
        read_idx(bad / "c.gz", 0x803)
    # Corrupt file under the dataset's expected name goes through build_dataset too.
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="t10k-images"):
        build_dataset("fashion_mnist", "test", root=str(bad))


def test_fashion_mnist_missing_everywhere(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as e:
        build_dataset("fashion_mnist", "train", root=str(tmp_path), download=False)
    assert "data.download=true" in str(e.value)


# --------------------------------------------------------------------------------------------------------
# torchvision datasets
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_torchvision_missing_gives_clear_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.download=true") as e:
        build_dataset(name, "train", root=str(tmp_path), download=False)
    assert "data.root" in str(e.value) and str(tmp_path) in str(e.value)


# --------------------------------------------------------------------------------------------------------
# imagefolder
# --------------------------------------------------------------------------------------------------------
def test_imagefolder_labelled_with_splits(tmp_path: Path) -> None:
    _save_images(tmp_path / "train" / "cat", 3, ext=".PNG")  # upper-case extension still counts
    _save_images(
        tmp_path / "train" / "dog" / "nested", 2, ext=".jpg"
    )  # class folders are searched recursively
    (tmp_path / "train" / "empty_class").mkdir()  # no images: not a class
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    _save_images(tmp_path / "val" / "cat", 1, ext=".bmp")
    _save_images(tmp_path / "val" / "dog", 1, ext=".gif", mode="L")

    train = build_dataset("imagefolder", "train", root=str(tmp_path))
    assert (
        len(train) == 5 and train.classes == ["cat", "dog"] and has_labels(train) and num_classes(train) == 2
    )
    assert sorted(train.targets) == [0, 0, 0, 1, 1]
    img, label = train[4]
    assert img.mode == "RGB" and label == 1
    test = build_dataset("imagefolder", "test", root=str(tmp_path), in_chans=1)  # falls back to val/
    assert [lbl for _, lbl in test] == [0, 1] and all(img.mode == "L" for img, _ in test)
    # Deterministic order.
    assert build_dataset("imagefolder", "train", root=str(tmp_path)).samples == train.samples


def test_imagefolder_unlabeled(tmp_path: Path) -> None:
    _save_images(tmp_path, 2, ext=".jpeg")  # images directly in root
    _save_images(tmp_path / "more" / "deeper", 2, ext=".webp")
    (tmp_path / ".hidden").mkdir()
    _save_images(tmp_path / ".hidden", 1)
    tf = MultiViewTransform(**SMALL)
    ds = build_dataset("imagefolder", "train", root=str(tmp_path), transform=tf)
    assert len(ds) == 4 and not has_labels(ds) and ds.classes == []
    paths = [p for p, _ in ds.samples]
    assert paths == sorted(paths)
    views, label = ds[0]
    assert label == -1 and len(views) == tf.num_views and views[0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="no class labels"):
        num_classes(ds)

    # A single sub-folder of images is nesting, not a labelling.
    single = tmp_path / "single"
    _save_images(single / "images", 2)
    assert not has_labels(build_dataset("imagefolder", "all", root=str(single)))


def test_imagefolder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"data\.root") as e:
        build_dataset("imagefolder", root=str(missing))
    assert str(missing) in str(e.value)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        build_dataset("imagefolder", root=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"data\.root"):
        build_dataset("imagefolder", root=None)
    with pytest.raises(FileNotFoundError, match="'test' or 'val'"):
        build_dataset("imagefolder", "test", root=str(tmp_path / "empty"))


# --------------------------------------------------------------------------------------------------------
# MSNDataModule
# --------------------------------------------------------------------------------------------------------
def test_datamodule_batches_on_digits() -> None:
    dm = MSNDataModule(name="digits", in_chans=1, batch_size=8, transform=dict(SMALL), eval_img_size=8)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 1347 // 8 and dm.num_views == 6
    assert not loader.persistent_workers and loader.num_workers == 0
    assert loader.pin_memory == torch.cuda.is_available()
    views, labels = next(iter(loader))
    assert isinstance(views, list) and len(views) == 6
    assert [tuple(v.shape) for v in views] == [(8, 1, 16, 16)] * 3 + [(8, 1, 8, 8)] * 3
    assert labels.shape == (8,) and labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() <= 9


def test_datamodule_shuffle_follows_seed() -> None:
    def order(seed: int) -> list[list[int]]:
        dm = MSNDataModule(name="digits", in_chans=1, batch_size=8, transform=dict(SMALL), seed=seed)
        loader = dm.train_dataloader()  # calls setup() itself
        first = next(iter(loader.batch_sampler))
        loader.sampler.set_epoch(1)  # what Lightning does before every epoch
        return [[i for i, _ in first], [i for i, _ in next(iter(loader.batch_sampler))]]

    first_epoch, second_epoch = order(0)
    assert order(0) == [first_epoch, second_epoch]  # same seed, same order
    assert first_epoch != second_epoch  # a new permutation every epoch
    assert order(1)[0] != first_epoch


def test_datamodule_transform_config_and_eval_datasets() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"rand_size": 16, "focal_size": 8, "focal_views": 2, "rand_scale": [0.5, 1.0]})
    dm = MSNDataModule(
        name="digits",
        in_chans=3,
        batch_size=4,
        transform=cfg,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        eval_img_size=8,
        eval_crop_pct=1.0,
        num_workers=-1,
    )
    assert dm.transform.mean == (0.5, 0.5, 0.5) and dm.transform.rand_scale == (0.5, 1.0)
    assert dm.num_workers == min(os.cpu_count() or 1, 8)
    train, test = dm.eval_datasets()
    assert (len(train), len(test)) == (1347, 450)
    x, y = test[0]
    assert x.shape == (3, 8, 8) and isinstance(y, int)


def test_datamodule_unlabeled_eval_raises(tmp_path: Path) -> None:
    _save_images(tmp_path, 4)
    dm = MSNDataModule(
        name="imagefolder", root=str(tmp_path), batch_size=2, transform=dict(SMALL), eval_test_split="train"
    )
    dm.setup()
    assert len(dm.train_dataloader()) == 2
    with pytest.raises(ValueError, match="evaluation needs labels"):
        dm.eval_datasets()
    # Labelled folders but no test/ or val/ folder: also "no evaluation data", as a ValueError.
    _save_images(tmp_path / "lab" / "a", 2)
    _save_images(tmp_path / "lab" / "b", 2)
    dm = MSNDataModule(name="imagefolder", root=str(tmp_path / "lab"), batch_size=2, transform=dict(SMALL))
    with pytest.raises(ValueError, match=r"data\.eval_test_split"):
        dm.eval_datasets()


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"name": "mnist"}, "data.name"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"num_workers": -2}, "data.num_workers"),
        ({"in_chans": 4}, "data.in_chans"),
        ({"mean": [0.5]}, "data.mean"),
        ({"eval_crop_pct": 1.5}, "data.eval_crop_pct"),
        ({"eval_img_size": 0}, "data.eval_img_size"),
        ({"train_split": "val"}, "data.train_split"),
        ({"eval_test_split": "validation"}, "data.eval_test_split"),
        ({"transform": {"rand_views": 0}}, "data.transform.rand_views"),
        ({"transform": {"focal_views": 1, "bogus": 1}}, "data.transform"),
        ({"transform": {"in_chans": 1}}, "data.transform.in_chans"),
        ({"transform": MultiViewTransform(in_chans=1)}, "data.transform.in_chans"),
    ],
)
def test_datamodule_validation(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        MSNDataModule(**kwargs)
    # The constructor reports its problems function's findings, which name keys relative to data.
    assert all(p.startswith(key.removeprefix("data.")) for p in MSNDataModule.problems(**kwargs))


def test_datamodule_problems_are_the_data_node_rules() -> None:
    assert MSNDataModule.problems() == []
    assert MSNDataModule.problems(
        name="mnist3d", num_workers=-2, on_bad_image="ignore", transform={"rand_views": 0}
    ) == [
        "name='mnist3d' is unknown; allowed: digits, fashion_mnist, cifar10, cifar100, stl10, imagefolder, "
        "hf, litdata",
        "num_workers=-2 must be an integer >= 0, or -1 for one per CPU core (max 8)",
        "on_bad_image='ignore' is unknown; allowed: skip, raise",
        "transform.rand_views must be an integer >= 1, got 0",
    ]
    # The transform takes the module's channels: a bad in_chans is reported once, for data.
    assert MSNDataModule.problems(in_chans=2, transform={"rand_views": 0}) == [
        "in_chans must be one of (1, 3), got 2"
    ]
    assert MSNDataModule.problems(name="imagefolder", augment_on="device") == [
        "augment_on=device with data.name=imagefolder needs data.load_size (e.g. 256): the images are "
        "resized to one square size before batching"
    ]


def test_datamodule_batch_larger_than_dataset(tmp_path: Path) -> None:
    _save_images(tmp_path, 3)
    dm = MSNDataModule(name="imagefolder", root=str(tmp_path), batch_size=4, transform=dict(SMALL))
    with pytest.raises(ValueError, match=r"data\.batch_size"):
        dm.setup("fit")
    ok = MSNDataModule(
        name="imagefolder", root=str(tmp_path), batch_size=4, transform=dict(SMALL), drop_last=False
    )
    ok.setup("fit")
    assert len(ok.train_dataloader()) == 1


# --------------------------------------------------------------------------------------------------------
# imagefolder with bad files
# --------------------------------------------------------------------------------------------------------
# Files that cannot be decoded: skipped (or an error); each maps to a word of the recorded reason.


def test_bad_images_are_skipped_counted_and_listed(tmp_path: Path) -> None:
    root = bad_image_folder(tmp_path / "images")
    log_file = tmp_path / "run" / "bad_images.txt"
    log_file.parent.mkdir()
    ds = build_dataset("imagefolder", "train", root=str(root), bad_image_log=log_file)
    names = [os.path.basename(p) for p, _ in ds.samples]
    assert len(ds) == 14
    loaded = {}
    for i, name in enumerate(names):
        img, label = ds[i]
        assert img.mode == "RGB" and img.size in ((12, 12), (64, 64)) and label == -1
        loaded[name] = np.asarray(img)
    # Every unreadable file was replaced by the next readable one in the list (batches keep their size).
    for name in UNREADABLE:
        nxt = next(n for n in names[names.index(name) :] + names if n not in UNREADABLE)  # wraps around
        assert np.array_equal(loaded[name], loaded[nxt])
    # Other modes are converted faithfully: 16-bit scaled (not clipped to white), CMYK, palette, grayscale.
    assert np.all(loaded["mode_16bit.png"] == round(40000 / 257))
    assert loaded["mode_cmyk.jpg"][..., 0].mean() > 200 and loaded["mode_cmyk.jpg"][..., 1:].mean() < 60
    assert np.all(loaded["mode_gray.png"] == 77)
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    assert np.array_equal(
        loaded["mode_palette.png"], colours[np.asarray(Image.open(root / "mode_palette.png"))]
    )
    listed = read_bad_image_log(log_file)
    assert {os.path.basename(p) for p in listed} == set(UNREADABLE)
    for path, reason in listed.items():
        assert UNREADABLE[os.path.basename(path)] in reason and "\t" not in reason
    ds[names.index("empty.jpg")]  # a second encounter is neither decoded nor listed again
    assert len(log_file.read_text().splitlines()) == 4
    assert bad_image_summary(log_file) == f"skipped 4 unreadable image file(s) (list: {log_file})"
    assert bad_image_summary(tmp_path / "none.txt") is None


def test_bad_images_are_listed_and_warned_about_once_per_run(tmp_path: Path, caplog) -> None:
    import copy
    import logging

    root = bad_image_folder(tmp_path / "images")
    log_file = tmp_path / "bad_images.txt"
    ds = build_dataset("imagefolder", "train", root=str(root), bad_image_log=log_file)
    with caplog.at_level(logging.WARNING, logger="msn.data.decode"):
        # Each epoch's DataLoader workers start from a fresh copy of the dataset.
        for _epoch in range(3):
            worker = copy.deepcopy(ds)
            for i in range(len(worker)):
                worker[i]
    assert len(log_file.read_text().splitlines()) == len(UNREADABLE)
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable")]
    assert len(warned) == len(UNREADABLE)


def test_bad_images_raise_on_request(tmp_path: Path) -> None:
    root = bad_image_folder(tmp_path)
    ds = build_dataset("imagefolder", "train", root=str(root), on_bad_image="raise")
    names = [os.path.basename(p) for p, _ in ds.samples]
    with pytest.raises(BadImageError, match=r"truncated\.jpg.*data\.on_bad_image=skip"):
        ds[names.index("truncated.jpg")]
    assert ds[names.index("good0.png")][0].mode == "RGB"
    with pytest.raises(ValueError, match=r"^data\.on_bad_image='ignore' is unknown; allowed: skip, raise$"):
        MSNDataModule(name="imagefolder", root=str(root), on_bad_image="ignore")


def test_bad_images_through_worker_processes(tmp_path: Path) -> None:
    root = bad_image_folder(tmp_path / "images")
    log_file = tmp_path / "bad_images.txt"
    dm = MSNDataModule(
        name="imagefolder",
        root=str(root),
        batch_size=7,
        num_workers=2,
        transform=dict(SMALL),
        bad_image_log=str(log_file),
    )
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and all(views[0].shape == (7, 3, 16, 16) for views, _ in batches)
    assert bad_image_summary(log_file) == f"skipped 4 unreadable image file(s) (list: {log_file})"


def test_folder_without_readable_images_fails_at_build(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(
        BadImageError, match=r"no readable image among the 2 image files found: all checked"
    ) as e:
        build_dataset("imagefolder", "train", root=str(tmp_path))
    assert "empty file (0 bytes)" in str(e.value) and "Check data.root" in str(e.value)
    dm = MSNDataModule(name="imagefolder", root=str(tmp_path), batch_size=1, transform=dict(SMALL))
    with pytest.raises(BadImageError, match="no readable image"):
        dm.setup("fit")
