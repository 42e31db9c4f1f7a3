"""data=hf: Hugging Face datasets on disk (save_to_disk folders, parquet / arrow files) for
pre-training and the low-shot evaluation: the bundled digits read back pixel for pixel, train.py
runs, disjoint shards on two gloo ranks, exact resume after SIGKILL, bad rows and clear errors."""

from __future__ import annotations

import io
import pickle
import random
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

datasets = pytest.importorskip("datasets")

from msn.cli.common import CONFIG_DIR  # noqa: E402
from msn.data import MSNDataModule, build_dataset, has_labels  # noqa: E402
from msn.data.decode import BadImageError, EncodedImage, read_bad_image_log  # noqa: E402
from msn.data.hf import HFImageDataset, build_hf, find_data_files, split_of_file  # noqa: E402
from tests.helpers import FAST, composed  # noqa: E402
from tests.training.test_resume import TINY, _cmd, _losses, _run, _start, _wait_for_step  # noqa: E402

SMALL = {"rand_size": 16, "focal_size": 8, "focal_views": 1}
DIGIT_CLASSES = [str(i) for i in range(10)]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """datasets' cache (where parquet files are converted) in the test's temp folder, not ~/.cache:
    for this process and for the train.py runs it starts."""
    cache = tmp_path_factory.getbasetemp() / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


def _png(img: Image.Image | np.ndarray) -> bytes:
    buffer = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buffer, "PNG")
    return buffer.getvalue()


def _features(num_classes: int = 10) -> datasets.Features:
    names = [str(i) for i in range(num_classes)]
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})


def _digits_split(split: str, limit: int | None = None) -> datasets.Dataset:
    """A split of the bundled digits as a Hugging Face dataset: PNG bytes and a ClassLabel."""
    ref = build_dataset("digits", split, in_chans=1)
    n = len(ref) if limit is None else limit
    rows = {"image": [{"bytes": _png(ref.data[i]), "path": None} for i in range(n)], "label": ref.targets[:n]}
    return datasets.Dataset.from_dict(rows, features=_features())


@pytest.fixture(scope="module")
def digits_hf(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The bundled digits as a save_to_disk DatasetDict and as a folder of Hub-named parquet shards."""
    base = tmp_path_factory.mktemp("digits_hf")
    splits = datasets.DatasetDict({split: _digits_split(split) for split in ("train", "test")})
    splits.save_to_disk(str(base / "saved"))
    (base / "parquet").mkdir()
    for split, ds in splits.items():
        ds.to_parquet(str(base / "parquet" / f"{split}-00000-of-00001.parquet"))
    return SimpleNamespace(saved=base / "saved", parquet=base / "parquet")


def _pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "L"
    return np.asarray(img)


# --------------------------------------------------------------------------------------------------------
# 1. The bundled digits read back through data=hf
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["saved", "parquet"])
def test_digits_through_hf_are_the_bundled_digits(digits_hf, layout, monkeypatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"data=hf opened a network connection {args}")

    # Local files only: opening (and converting the parquet files) never reaches for the network.
    monkeypatch.setattr(socket.socket, "connect", no_network)
    root = str(getattr(digits_hf, layout))
    for split in ("train", "test"):
        ds = build_dataset("hf", split, root=root, in_chans=1)
        ref = build_dataset("digits", split, in_chans=1)
        assert isinstance(ds, HFImageDataset) and len(ds) == len(ref)
        assert ds.classes == ref.classes == DIGIT_CLASSES and has_labels(ds)
        assert np.array_equal(ds.targets, ref.targets)
        for i in range(len(ds)):
            img, label = ds[i]
            assert label == ref.targets[i] and np.array_equal(_pixels(img), ref.data[i]), (split, i)
    # "all" is both splits (sorted names: test, then train).
    assert len(build_dataset("hf", "all", root=root, in_chans=1)) == 1797
    # Pickled into DataLoader workers: the same rows (memory-mapped files, not copies).
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(_pixels(clone[7][0]), _pixels(ds[7][0]))
    if layout == "saved":
        mapped = [f["filename"] for f in ds.hf.cache_files]
        assert mapped == [str(digits_hf.saved / "test" / "data-00000-of-00001.arrow")]


def test_split_of_a_file_follows_the_hub_names_then_folders_then_prefixes() -> None:
    cases = {
        "train-00000-of-00002.parquet": "train",
        "data/validation-00001-of-00003.parquet": "validation",
        "default/unlabeled-00000-of-00001.parquet": "unlabeled",  # a shard name wins over folders
        "train/shard_0.parquet": "train",
        "data/test/part.arrow": "test",
        "default/train/0000.parquet": "train",  # the Hub's parquet conversion
        "test.parquet": "test",
        "test-0.arrow": "test",
        "train_part1.parquet": "train",
        "0000.parquet": "train",
        "data-00000-of-00001.arrow": "train",  # save_to_disk's shard name names no split
        "holdout/data-00000-of-00001.arrow": "holdout",
    }
    assert {path: split_of_file(path) for path in cases} == cases


def test_folder_layouts_single_datasets_and_split_names(tmp_path: Path) -> None:
    rows = _digits_split("train", limit=12)
    # One sub-folder per split, several parquet shards each; hidden files and map caches ignored.
    root = tmp_path / "folders"
    for split, chunks in (("train", [(0, 5), (5, 9)]), ("holdout", [(9, 12)])):
        (root / split).mkdir(parents=True)
        for k, (a, b) in enumerate(chunks):
            rows.select(range(a, b)).to_parquet(str(root / split / f"part{k}.parquet"))
    (root / "train" / ".hidden.parquet").write_bytes(b"junk")
    (root / "train" / "cache-1234.arrow").write_bytes(b"junk")
    (root / "README.md").write_text("# digits")
    assert {s: [Path(p).name for p in f] for s, f in find_data_files(str(root)).items()} == {
        "holdout": ["part0.parquet"],
        "train": ["part0.parquet", "part1.parquet"],
    }
    train = build_hf("train", root, None, 1)
    assert len(train) == 9 and train.targets.tolist() == list(rows["label"][:9])
    assert np.array_equal(_pixels(train[6][0]), build_dataset("digits", in_chans=1).data[6])
    assert len(build_hf("holdout", root, None, 1)) == 3 and len(build_hf("all", root, None, 1)) == 12

    # Arrow files (as save_to_disk writes them) are memory-mapped where they lie: no conversion.
    arrow = tmp_path / "arrow"
    rows.save_to_disk(str(arrow / "saved"))
    (arrow / "saved" / "state.json").rename(arrow / "state.json.bak")  # now only a file layout
    ds = build_hf("train", arrow, None, 1)  # innermost folder "saved": the only split, so also "train"
    assert len(ds) == 12 and ds.split == "train"
    assert [f["filename"] for f in ds.hf.cache_files] == [str(arrow / "saved" / "data-00000-of-00001.arrow")]
    # The arrow IPC *file* format (Feather v2) is read too.
    feather = tmp_path / "feather"
    feather.mkdir()
    table = rows.data.table
    with pa.ipc.new_file(str(feather / "test.arrow"), table.schema) as writer:
        writer.write_table(table)
    assert build_hf("test", feather, None, 1).targets.tolist() == list(rows["label"])

    # A single saved Dataset: its split name (else "train"), "all" and, as its only split, "train".
    single = tmp_path / "single"
    rows.save_to_disk(str(single))
    assert [len(build_hf(s, single, None, 1)) for s in ("train", "all")] == [12, 12]
    with pytest.raises(FileNotFoundError, match=r"saved Dataset .* no split 'test'; its splits: train, all"):
        build_hf("test", single, None, 1)


def test_label_rules_classlabel_integers_strings_and_unlabeled(tmp_path: Path) -> None:
    img = [{"bytes": _png(np.full((4, 4), 9 * i, dtype=np.uint8)), "path": None} for i in range(6)]
    image = datasets.Image()

    def save(name: str, splits: dict[str, dict]) -> Path:
        dd = datasets.DatasetDict(
            {s: datasets.Dataset.from_dict(c).cast_column("image", image) for s, c in splits.items()}
        )
        dd.save_to_disk(str(tmp_path / name))
        return tmp_path / name

    # Integers that are not 0..K-1, and a class that only one split has: one numbering for both splits.
    ints = save(
        "ints",
        {"train": {"image": img[:4], "label": [7, 3, 9, 7]}, "test": {"image": img[4:], "label": [9, -1]}},
    )
    train, test = (build_hf(s, ints, None, 1) for s in ("train", "test"))
    assert train.classes == test.classes == ["3", "7", "9"]
    assert train.targets.tolist() == [1, 0, 2, 1] and test.targets.tolist() == [2, -1]
    assert train[0][1] == 1 and not has_labels(test)  # -1: a row without label
    # Strings (nulls are no label), numbered by their sorted values.
    text = save("text", {"train": {"image": img[:3], "label": ["dog", None, "cat"]}})
    ds = build_hf("train", text, None, 1)
    assert ds.classes == ["cat", "dog"] and ds.targets.tolist() == [1, -1, 0]
    # No label column, or label_key None: unlabeled.
    assert build_hf("train", text, None, 1, label_key="breed").classes == []
    unlabeled = build_hf("train", ints, None, 1, label_key=None)
    assert unlabeled.targets.tolist() == [-1] * 4 and not has_labels(unlabeled)
    # Another image column name; file paths (relative to the root) instead of bytes.
    (tmp_path / "paths" / "img").mkdir(parents=True)
    for i in range(2):
        (tmp_path / "paths" / "img" / f"{i}.png").write_bytes(img[i]["bytes"])
    rel = datasets.Dataset.from_dict({"picture": ["img/0.png", "img/1.png"], "label": [0, 1]})
    rel.to_parquet(str(tmp_path / "paths" / "train.parquet"))
    ds = build_hf("train", tmp_path / "paths", None, 1, image_key="picture")
    assert [int(_pixels(ds[i][0])[0, 0]) for i in range(2)] == [0, 9]
    floats = save("floats", {"train": {"image": img[:2], "label": [0.5, 1.5]}})
    with pytest.raises(ValueError, match=r"label column 'label' .* holds double"):
        build_hf("train", floats, None, 1)


# --------------------------------------------------------------------------------------------------------
# 2. train.py on the hf digits: trains like the bundled digits and prints the low-shot table
# --------------------------------------------------------------------------------------------------------
def _override(key: str, value: object) -> str:
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if value is None:
        return f"{key}=null"
    if isinstance(value, list):
        return f"{key}=[{','.join(str(v) for v in value)}]"
    return f"{key}={value}"


def digits_recipe(*given: str) -> list[str]:
    """The data settings of configs/data/digits.yaml as overrides of data=hf (but those that name
    the data set or that ``given`` sets), plus the load size that batches the 8 px images (what
    ``data=hf`` needs with ``augment_on=device``; 8 px images are then left exactly as they are)."""
    node = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "data" / "digits.yaml"), resolve=False)
    settings, stack = {}, [("data", node)]
    while stack:
        key, value = stack.pop(0)
        if isinstance(value, dict):
            stack += [(f"{key}.{k}", v) for k, v in value.items()]
        elif not (isinstance(value, str) and "${" in value):  # interpolations: the same in data=hf
            settings[key] = value
    assert settings["data.augment_on"] == "device" and settings["data.load_size"] is None
    settings["data.load_size"] = 8
    taken = {o.split("=", 1)[0] for o in given}
    taken |= {f"data.{k}" for k in ("_target_", "name", "root", "download", "batch_size")}
    return [_override(k, v) for k, v in settings.items() if k not in taken]


@pytest.mark.slow
def test_train_on_hf_digits_matches_the_bundled_digits_and_prints_the_lowshot_table(
    digits_hf, tmp_path, capsys
) -> None:
    from msn.cli.train import train, validate_config

    def run(name: str, *overrides: str) -> Path:
        out = tmp_path / name
        cfg = composed("train", *FAST, *overrides, f"output_dir={out}")
        validate_config(cfg)
        train(cfg)
        return out

    hf = run("hf", "data=hf", f"data.root={digits_hf.saved}", *digits_recipe())
    printed = capsys.readouterr().out
    bundled = run("bundled", "lowshot.enabled=false")
    # The same images in the same order with the same views: the very same losses.
    assert _losses(hf) == _losses(bundled) and len(_losses(hf)) == 2
    assert "Low-shot accuracy (%), hf" in printed and "450 test images" in printed
    for row in ("MSN target encoder", "random init", "raw pixels"):
        assert f"| {row}" in printed
    table = OmegaConf.to_container(OmegaConf.load(hf / "lowshot.json"))
    assert 0 <= table["raw pixels"]["1"]["mean"] <= 100


# --------------------------------------------------------------------------------------------------------
# 3. Two gloo ranks: disjoint shards of one epoch
# --------------------------------------------------------------------------------------------------------
def _rank(rank: int, init_file: str, root: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # Both ranks open the parquet folder at once (its first conversion: the cache's file lock).
        dm = MSNDataModule(
            name="hf", root=root, in_chans=1, batch_size=4, transform=dict(SMALL), eval_img_size=16, seed=3
        )
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        indices = [i for i, _ in loader.sampler]
        views, labels = next(iter(loader))
        record = {
            "indices": indices,
            "labels": labels.tolist(),
            "targets": dm.train_dataset.targets[indices[:4]].tolist(),
            "views": [tuple(v.shape) for v in views],
            "len": len(dm.train_dataset),
        }
        gathered: list = [None, None]
        torch.distributed.all_gather_object(gathered, record)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_read_disjoint_shards_of_the_epoch(tmp_path, monkeypatch) -> None:
    root = tmp_path / "parquet"
    root.mkdir()
    _digits_split("train", limit=64).to_parquet(str(root / "train-00000-of-00001.parquet"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "fresh_cache")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    ctx = torch.multiprocessing.get_context("spawn" if torch.cuda.is_initialized() else "fork")
    out = tmp_path / "ranks.pt"
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "init"), str(root), str(out))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    ranks = torch.load(out, weights_only=False)
    assert [r["len"] for r in ranks] == [64, 64]
    first, second = (set(r["indices"]) for r in ranks)
    assert len(ranks[0]["indices"]) == len(ranks[1]["indices"]) == 32
    assert first.isdisjoint(second) and first | second == set(range(64))
    for r in ranks:  # each rank's loader reads its own rows
        assert r["labels"] == r["targets"] and r["views"] == [(4, 1, 16, 16)] * 2 + [(4, 1, 8, 8)]


# --------------------------------------------------------------------------------------------------------
# 4. SIGKILL mid-epoch, then resume: the uninterrupted losses
# --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_then_resume_on_hf_logs_the_uninterrupted_losses(digits_hf, tmp_path) -> None:
    # experiment=digits named: train.py leaves the digits recipe (model, trainer) out for data=hf.
    recipe = digits_recipe(*TINY, "data.num_workers")
    hf = ["experiment=digits", "data=hf", f"data.root={digits_hf.saved}", *recipe]
    reference = tmp_path / "reference"
    proc = _run(_cmd(reference, *hf, "data.num_workers=0"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _losses(reference)
    assert sorted(expected) == list(range(14))

    # Killed at a random step, reading in a DataLoader worker (the dataset pickled into it).
    kill_after = random.Random().randint(2, 11)
    run = tmp_path / "killed"
    proc = _start(run, *hf, "data.num_workers=1")
    _wait_for_step(proc, run, kill_after)
    proc.kill()  # SIGKILL
    proc.communicate()
    before = _losses(run)
    assert all(before[step] == expected[step] for step in before)
    ckpt_dir = run / "checkpoints"
    saved = max(
        torch.load(path, map_location="cpu", weights_only=True)["global_step"]
        for path in [ckpt_dir / "last.ckpt", *ckpt_dir.glob("step*.ckpt")]
        if path.is_file()
    )
    assert saved > 0  # a genuine resume, not a fresh start
    proc = _run(_cmd(run, *hf, "data.num_workers=1", "ckpt_path=last"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ended before the epoch ended" not in proc.stderr
    assert _losses(run) == expected, f"killed after step {kill_after}, resumed at {saved}"


# --------------------------------------------------------------------------------------------------------
# 5. Rows that do not decode
# --------------------------------------------------------------------------------------------------------
@pytest.fixture()
def bad_rows(tmp_path: Path) -> Path:
    """8 grey 6x6 rows of values 0, 10, ..., 70 (label = row) of which rows 2 (not an image) and
    5 (a truncated PNG) do not decode."""
    images = [_png(np.full((6, 6), 10 * i, dtype=np.uint8)) for i in range(8)]
    images[2] = b"not an image at all"
    images[5] = images[5][: len(images[5]) // 2]
    rows = {"image": [{"bytes": b, "path": None} for b in images], "label": list(range(8))}
    datasets.Dataset.from_dict(rows, features=_features(8)).save_to_disk(str(tmp_path / "bad"))
    return tmp_path / "bad"


def test_bad_rows_are_skipped_listed_or_raise(bad_rows: Path, tmp_path: Path) -> None:
    log_file = tmp_path / "bad_images.txt"
    ds = build_dataset("hf", "train", root=str(bad_rows), in_chans=1, bad_image_log=log_file)
    items = [ds[i] for i in range(len(ds))]
    # A bad row's place is taken by the next readable one: its image with its label.
    assert [int(_pixels(img)[0, 0]) for img, _ in items] == [0, 10, 30, 30, 40, 60, 60, 70]
    assert [label for _, label in items] == [0, 1, 3, 3, 4, 6, 6, 7]
    listed = read_bad_image_log(log_file)
    assert sorted(listed) == [f"{bad_rows}[train][2]", f"{bad_rows}[train][5]"]
    assert "cannot identify" in listed[f"{bad_rows}[train][2]"]
    ds[2]  # met again (another epoch): not listed twice
    assert len(log_file.read_text().splitlines()) == 2

    strict = build_dataset("hf", "train", root=str(bad_rows), in_chans=1, on_bad_image="raise")
    assert strict[1][1] == 1
    with pytest.raises(BadImageError, match=re.escape(f"{bad_rows}[train][5]") + ".*on_bad_image=skip"):
        strict[5]

    # decode_on=device: the stored bytes, named by their row (decoded later, by decode_batch).
    raw = build_dataset("hf", "train", root=str(bad_rows), in_chans=1, decode_on="device")
    data, label = raw[4]
    assert isinstance(data, EncodedImage) and data.name == f"{bad_rows}[train][4]" and label == 4
    assert bytes(data) == _png(np.full((6, 6), 40, dtype=np.uint8))


def test_a_split_where_no_row_decodes_fails_at_build(tmp_path: Path) -> None:
    rows = {"image": [{"bytes": b"junk", "path": None}] * 3, "label": [0, 1, 2]}
    datasets.Dataset.from_dict(rows, features=_features(3)).save_to_disk(str(tmp_path / "junk"))
    expected = r"no readable image among the 3 rows of column 'image' of split 'train'"
    expected += r": all .* data\.image_key"
    with pytest.raises(BadImageError, match=expected):
        build_hf("train", tmp_path / "junk", None, 1)


# --------------------------------------------------------------------------------------------------------
# 6. Errors
# --------------------------------------------------------------------------------------------------------
def test_errors_name_what_was_looked_for(digits_hf, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"is not an existing folder"):
        build_dataset("hf", root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"looked for a save_to_disk folder .*\*\.parquet / \*\.arrow"
    ):
        build_dataset("hf", root=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"needs data\.root"):
        build_dataset("hf", root=None)
    for root, kind in ((digits_hf.saved, "saved DatasetDict"), (digits_hf.parquet, "folder of parquet")):
        with pytest.raises(
            FileNotFoundError, match=rf"{kind}.* no split 'validation'; its splits: test, train, all"
        ):
            build_dataset("hf", "validation", root=str(root))
    with pytest.raises(
        ValueError, match=r"no image column 'img' \(data\.image_key\); its columns: image, label"
    ):
        build_dataset("hf", root=str(digits_hf.saved), image_key="img")
    with pytest.raises(ValueError, match=r"column 'label' .* holds int64, not images"):
        build_dataset("hf", root=str(digits_hf.saved), image_key="label")
    # A missing evaluation split: "no evaluation data", which train.py reports and skips.
    dm = MSNDataModule(
        name="hf", root=str(digits_hf.saved), in_chans=1, transform=dict(SMALL), eval_test_split="validation"
    )
    with pytest.raises(ValueError, match=r"no evaluation data for data\.eval_test_split='validation'"):
        dm.eval_datasets()
