"""The ``imagefolder`` file list and its cache (msn.data.folders.imagefolder_listing)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image
from torchvision.datasets.folder import find_classes, make_dataset

from msn.data import build_dataset
from msn.data import folders as F
from msn.data.folders import imagefolder_listing, list_images
from tests.helpers import composed

Listing = tuple[list[tuple[str, int]], list[str]]
HOUR_NS = 3600 * 10**9


def _old_listing(directory: str) -> Listing:
    """The listing before the cache (find_classes + make_dataset, else list_images), kept as the reference."""
    has_loose = any(e.is_file() and F._is_image_file(e.path) for e in os.scandir(directory))
    samples: list[tuple[str, int]] = []
    classes: list[str] = []
    if not has_loose:
        try:
            _, class_to_idx = find_classes(directory)
        except FileNotFoundError:
            class_to_idx = {}
        class_to_idx = {c: i for c, i in class_to_idx.items() if not c.startswith(".")}
        labelled = (
            make_dataset(directory, class_to_idx, is_valid_file=F._is_image_file, allow_empty=True)
            if class_to_idx
            else []
        )
        used = sorted({label for _, label in labelled})
        if len(used) >= 2:
            remap = {old: new for new, old in enumerate(used)}
            idx_to_class = {i: c for c, i in class_to_idx.items()}
            classes = [idx_to_class[old] for old in used]
            samples = [(path, remap[label]) for path, label in labelled]
    if not classes:
        samples = [(path, -1) for path in list_images(directory)]
    return samples, classes


def _files(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    return root


def _age(root: Path, ns: int = HOUR_NS) -> None:
    """Every folder's mtime ``ns`` in the past: clear of the racy window, and any later change moves it."""
    past = time.time_ns() - ns
    for dirpath, _, _ in os.walk(root, followlinks=True):
        os.utime(dirpath, ns=(past, past))


def _labelled(root: Path) -> Path:
    # cat < cat-x < cat/nested in path order, but class-major in torchvision's: the order must survive.
    return _files(
        root,
        "cat/b.JPG",
        "cat/a.png",
        "cat/nested/c.jpeg",
        "cat/.hidden/in_class.jpg",  # a hidden folder inside a class: walked (torchvision does)
        "cat/._a.png",  # hidden file: never an image
        "cat/notes.txt",
        "cat-x/d.webp",
        "dog/e.gif",
        ".trash/f.jpg",  # hidden class folder: not a class
        "empty/readme.txt",  # no images: not a class
    )


def _flat(root: Path) -> Path:
    return _files(root, "z.jpg", "a.png", "sub/b.jpg", "sub/deeper/c.bmp", ".hidden/x.jpg", "sub/.h/y.jpg")


def _single(root: Path) -> Path:
    # One image-holding sub-folder is nesting: unlabeled, and then hidden folders are skipped everywhere.
    return _files(root, "images/a.jpg", "images/.h/b.jpg", "other/readme.txt")


def _linked(root: Path) -> Path:
    _files(root / "elsewhere", "x.jpg", "y.jpg")
    _files(root / "tree", "a/1.jpg")
    (root / "tree" / "b").symlink_to(root / "elsewhere", target_is_directory=True)
    (root / "tree" / "dangling.jpg").symlink_to(root / "missing.jpg")  # not a file: not loose
    return root / "tree"


TREES: dict[str, Callable[[Path], Path]] = {
    "labelled": _labelled,
    "flat": _flat,
    "single": _single,
    "linked": _linked,
}


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The directories walked by imagefolder_listing (one entry per walk of a tree)."""
    calls: list[str] = []
    real_walk = F._walk

    def counting(directory: str):  # noqa: ANN202
        calls.append(directory)
        return real_walk(directory)

    monkeypatch.setattr(F, "_walk", counting)
    return calls


@pytest.mark.parametrize("tree", sorted(TREES))
def test_listing_keeps_the_rules_and_the_cache_returns_it(
    tree: str, tmp_path: Path, walks: list[str]
) -> None:
    directory = str(TREES[tree](tmp_path / "data"))
    _age(tmp_path / "data")
    old = _old_listing(directory)
    assert old[0], "the tree has images"
    assert imagefolder_listing(directory) == old
    cache = tmp_path / "cache"
    assert imagefolder_listing(directory, cache) == old  # listed, then written
    assert imagefolder_listing(directory, cache) == old  # read back
    assert len(walks) == 2 and len(os.listdir(cache)) == 1  # one file per tree, no temporary left
    if tree == "labelled":
        assert old[1] == ["cat", "cat-x", "dog"]
        assert [os.path.relpath(p, directory) for p, _ in old[0]][:4] == [
            "cat/a.png",
            "cat/b.JPG",
            "cat/.hidden/in_class.jpg",
            "cat/nested/c.jpeg",
        ]


def test_second_listing_reads_the_cache_and_walks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = _labelled(tmp_path / "data")
    _age(root)
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="msn.data.folders")
    fresh = imagefolder_listing(root, cache)
    assert "listed 6 images in " in caplog.text and f"(cached in {cache}" in caplog.text

    def no_walk(*args: object, **kwargs: object) -> None:
        raise AssertionError("walked the tree again")

    monkeypatch.setattr(os, "scandir", no_walk)
    monkeypatch.setattr(os, "walk", no_walk)
    caplog.clear()
    assert imagefolder_listing(root, cache) == fresh
    assert f"file list of {root} from cache (6 images)" in caplog.text
    # Another spelling of the same tree (relative, through a link) finds the same file, paths as spelled.
    (tmp_path / "link").symlink_to(root, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for spelling in ("data", "link/"):
        samples, classes = imagefolder_listing(spelling, cache)
        expected = [(os.path.join(spelling, os.path.relpath(p, root)), label) for p, label in fresh[0]]
        assert (samples, classes) == (expected, fresh[1])


def _png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), mode="RGB").save(path)


def test_build_imagefolder_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fails without the cache: the second build would walk the tree (scandir/walk raise).
    for i, name in enumerate(("train/a/1.png", "train/a/2.png", "train/b/3.png")):
        _png(tmp_path / name, i)
    _age(tmp_path)
    cache = tmp_path / ".cache"
    first = build_dataset("imagefolder", "train", root=str(tmp_path), list_cache=cache)
    assert len(os.listdir(cache)) == 1

    def no_walk(*args: object, **kwargs: object) -> None:
        raise AssertionError("walked the tree again")

    monkeypatch.setattr(os, "scandir", no_walk)
    monkeypatch.setattr(os, "walk", no_walk)
    again = build_dataset("imagefolder", "train", root=str(tmp_path), list_cache=cache)
    assert again.samples == first.samples and again.classes == first.classes == ["a", "b"]


CHANGES: dict[str, Callable[[Path], None]] = {
    "add a file": lambda r: (r / "dog" / "new.jpg").touch(),
    "remove a file": lambda r: (r / "cat" / "b.JPG").unlink(),
    "rename a file": lambda r: (r / "cat" / "a.png").rename(r / "cat" / "a2.png"),
    "new class folder": lambda r: _files(r, "bird/g.jpg") and None,
    "file in a nested folder": lambda r: (r / "cat" / "nested" / "n.jpg").touch(),
    "new nested folder": lambda r: _files(r, "dog/sub/deep/h.png") and None,
    "loose image makes it unlabeled": lambda r: (r / "loose.jpg").touch(),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_in_the_tree_lists_it_again(change: str, tmp_path: Path, walks: list[str]) -> None:
    root = _labelled(tmp_path / "data")
    _age(root)
    cache = tmp_path / "cache"
    before = imagefolder_listing(root, cache)
    assert imagefolder_listing(root, cache) == before and len(walks) == 1  # cached
    CHANGES[change](root)
    after = imagefolder_listing(root, cache)
    assert len(walks) == 2 and after == _old_listing(str(root)) != before
    # The change is recent (racy), so that list was not cached; once the tree is older, it is.
    _age(root)
    assert imagefolder_listing(root, cache) == after and len(walks) == 3
    assert imagefolder_listing(root, cache) == after and len(walks) == 3


def test_a_tree_changed_just_before_listing_is_not_cached(
    tmp_path: Path, walks: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    # Within the timestamp granularity a folder can change again without its mtime moving.
    root = _flat(tmp_path / "data")
    _age(root)
    now = time.time_ns()
    os.utime(root / "sub", ns=(now, now))
    caplog.set_level(logging.INFO, logger="msn.data.folders")
    cache = tmp_path / "cache"
    imagefolder_listing(root, cache)
    assert "not cached: folders changed less than 2 s ago" in caplog.text and not cache.exists()


@pytest.mark.parametrize(
    "content",
    [b"", b'{"format": 1, "direc', b"\xff\xfe\x00garbage", b"[1, 2]", b"null", "bad fields"],
    ids=["empty", "truncated", "binary", "list", "null", "bad-fields"],
)
def test_a_corrupt_cache_file_is_listed_again_and_rewritten(
    content: bytes | str, tmp_path: Path, walks: list[str]
) -> None:
    root = _labelled(tmp_path / "data")
    _age(root)
    cache = tmp_path / "cache"
    fresh = imagefolder_listing(root, cache)
    (file,) = cache.iterdir()
    if content == "bad fields":  # well-formed JSON, wrong contents: label out of range, index negative
        data = json.loads(file.read_text())
        data["runs"][0][1] = 7
        data["runs"][1][0] = -1
        content = json.dumps(data).encode()
    file.write_bytes(content)
    assert imagefolder_listing(root, cache) == fresh and len(walks) == 2
    assert imagefolder_listing(root, cache) == fresh and len(walks) == 2  # rewritten whole


def test_an_unwritable_cache_folder_warns_once_and_lists(
    tmp_path: Path, walks: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    root = _flat(tmp_path / "data")
    _age(root)
    cache = tmp_path / "not-a-folder"
    cache.write_text("a file where the cache folder should be")  # fails even as root, unlike chmod
    caplog.set_level(logging.INFO, logger="msn.data.folders")
    for _ in range(2):
        assert imagefolder_listing(root, cache) == _old_listing(str(root))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot write the file list cache" in warnings[0].getMessage()
    assert len(walks) == 2 and cache.read_text().startswith("a file")


def test_a_file_list_for_another_directory_is_not_used(tmp_path: Path, walks: list[str]) -> None:
    a, b = _flat(tmp_path / "a"), _labelled(tmp_path / "b")
    _age(tmp_path)
    cache = tmp_path / "cache"
    imagefolder_listing(a, cache)
    (file,) = cache.iterdir()
    # b's file holding a's list (as a hash collision or a copied cache folder would): not trusted.
    file.rename(F._cache_file(str(cache), os.path.realpath(b)))
    assert imagefolder_listing(b, cache) == _old_listing(str(b)) and len(walks) == 2


def test_no_list_cache_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(F, "_write_cache", lambda *a: pytest.fail("wrote a cache file"))
    root = _labelled(tmp_path / "data")
    _age(root)
    before = sorted(p for p in tmp_path.rglob("*"))
    assert imagefolder_listing(root, None) == imagefolder_listing(root) == _old_listing(str(root))
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_odd_file_names_survive_the_cache(tmp_path: Path, walks: list[str]) -> None:
    root = _files(tmp_path / "data", "é ü/ø.jpg", "plain/a.jpg")
    odd = os.fsencode(root / "plain") + b"/\xff\xfe.jpg"  # not UTF-8: a surrogate-escaped str
    os.close(os.open(odd, os.O_CREAT | os.O_WRONLY))
    _age(root)
    fresh = imagefolder_listing(root, tmp_path / "cache")
    assert imagefolder_listing(root, tmp_path / "cache") == fresh == _old_listing(str(root))
    assert len(walks) == 1 and os.fsdecode(odd) in [p for p, _ in fresh[0]]


def test_config_default_resolves_and_null_turns_it_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, walks: list[str]
) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    default = composed("train", "data=imagefolder", "data.root=/x").data.list_cache
    assert default == "~/.cache/msn-lightning/file-lists"
    monkeypatch.delenv("HOME", raising=False)  # '~' resolves without $HOME (it is expanded later)
    assert composed("train", "data=imagefolder", "data.root=/x").data.list_cache == default
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert (
        composed("train", "experiment=msn_vits16").data.list_cache
        == f"{tmp_path}/xdg/msn-lightning/file-lists"
    )

    for i, name in enumerate(("a/1.png", "b/2.png")):
        _png(tmp_path / "data" / name, i)
    _age(tmp_path / "data")
    overrides = (
        "data=imagefolder",
        f"data.root={tmp_path / 'data'}",
        "data.num_workers=0",
        "data.batch_size=1",
        f"output_dir={tmp_path / 'out'}",
    )
    off = instantiate(composed("train", *overrides, "data.list_cache=null").data)
    assert off.list_cache is None
    off.setup("fit")
    assert not (tmp_path / "xdg").exists() and len(off.train_dataset) == 2
    on = instantiate(composed("train", *overrides).data)
    on.setup("fit")
    assert len(os.listdir(tmp_path / "xdg" / "msn-lightning" / "file-lists")) == 1 and len(walks) == 2


class _Strategy:
    """A two-rank broadcast: rank 0 sends what it has, the other rank gets what rank 0 sent."""

    def __init__(self, sent: list) -> None:
        self.sent = sent

    def broadcast(self, obj: object, src: int = 0) -> object:
        if obj is not None:
            self.sent.append(obj)
        return self.sent[0]


def test_rank_zero_lists_an_image_folder_and_the_other_ranks_receive_its_list(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from PIL import Image

    from msn.data import MSNDataModule

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / c / f"{i}.png")
    built: list = []
    rank0 = MSNDataModule(name="imagefolder", root=str(root), batch_size=2, list_cache=None)
    rank0.trainer = SimpleNamespace(world_size=2, global_rank=0, strategy=_Strategy(built))  # type: ignore[assignment]
    rank0.setup("fit")
    assert built == [rank0.train_dataset]
    other = MSNDataModule(name="imagefolder", root=str(root), batch_size=2, list_cache=None)
    monkeypatch.setattr("msn.data.datamodule.rank_zero_only.rank", 1)
    other.setup("fit")  # before the trainer exists (train.py's early check): nothing is listed
    assert other.train_dataset is None
    monkeypatch.setattr("msn.data.folders.os.scandir", _no_walk)
    other.trainer = SimpleNamespace(world_size=2, global_rank=1, strategy=_Strategy(built))  # type: ignore[assignment]
    other.setup("fit")
    assert other.train_dataset is rank0.train_dataset  # rank 0's list, not one of its own


def _no_walk(*args: object) -> None:
    raise AssertionError("a rank other than 0 walked the tree")
