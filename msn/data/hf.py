"""Hugging Face ``datasets`` data on disk (``data=hf``): a ``save_to_disk`` folder or a folder of
parquet / arrow files, read memory-mapped and offline, with the images left encoded so that
:class:`~msn.data.decode.EncodedImages` decodes them (bad ones skipped or raised) or hands the
bytes to the device (``decode_on=device``).

Layouts of ``root`` (checked in this order):

* a ``save_to_disk`` folder of a ``DatasetDict`` (``dataset_dict.json``): its splits;
* a ``save_to_disk`` folder of one ``Dataset`` (``state.json``): one split, named by the split the
  dataset was made from (``Dataset.split``) or else ``train``;
* a folder of ``*.parquet`` or ``*.arrow`` files, searched recursively (hidden entries and the
  ``cache-*.arrow`` files of ``Dataset.map`` are skipped). A file's split is (:func:`split_of_file`):

  1. the ``<split>`` of a Hub shard name ``<split>-NNNNN-of-NNNNN.<ext>``
     (``train-00000-of-00002.parquet``, also inside ``data/``, as ``push_to_hub`` writes them);
  2. else the innermost sub-folder, ``data`` excepted (``train/0.parquet``,
     ``default/train/0000.parquet`` as the Hub's parquet conversion lays them out);
  3. else the file-name prefix up to the first ``-``, ``_`` or ``.`` (``test.parquet``,
     ``test-0.arrow``, ``train_part1.parquet``);
  4. ``train`` when that prefix is a number or ``data`` (``0000.parquet``,
     ``data-00000-of-00001.arrow``).

  Parquet files are converted once into datasets' cache (``HF_DATASETS_CACHE``, by default
  ``~/.cache/huggingface/datasets``; redone when a file changes) and memory-mapped from there;
  arrow files are memory-mapped where they are.

Split names, in every layout: the dataset's own; ``all``, every split concatenated (unless one is
called ``all``); and ``train`` for the only split of a dataset that has a single split.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from msn.data.decode import EncodedImages

try:  # optional dependencies: only data=hf needs them (msn.data.datasets imports this lazily)
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
except ImportError as err:
    raise ImportError("data=hf needs the Hugging Face `datasets` library: pip install datasets") from err

__all__ = ["DATA_EXTENSIONS", "HFImageDataset", "build_hf", "find_data_files", "split_of_file"]

# The files of a folder layout.
DATA_EXTENSIONS: tuple[str, ...] = (".parquet", ".arrow")
# A Hub shard name without its extension: <split>-00000-of-00002.
_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")
# save_to_disk names every shard data-NNNNN-of-NNNNN: "data" names no split.
_NO_SPLIT = "data"
_ALL, _TRAIN = "all", "train"


# ----------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------
def split_of_file(relpath: str) -> str:
    """The split of a data file at ``relpath`` (relative to the root, ``/`` or ``os.sep``
    separated) by the rules of the module docstring."""
    parts = re.split(r"[\\/]", relpath)
    stem = parts[-1].rsplit(".", 1)[0]
    shard = _SHARD.match(stem)
    if shard and shard["split"] != _NO_SPLIT:
        return shard["split"]
    folders = [p for p in parts[:-1] if p and p != _NO_SPLIT]
    if folders:
        return folders[-1]
    prefix = re.split(r"[-_.]", stem, maxsplit=1)[0]
    return _TRAIN if not prefix or prefix.isdigit() or prefix == _NO_SPLIT else prefix


def find_data_files(root: str) -> dict[str, list[str]]:
    """``{split: sorted paths}`` of the parquet and arrow files below ``root`` (recursive, links
    followed; hidden entries and ``cache-*.arrow`` files skipped)."""
    found: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            skip = name.startswith((".", "cache-")) or not name.lower().endswith(DATA_EXTENSIONS)
            if not skip:
                path = os.path.join(dirpath, name)
                found.setdefault(split_of_file(os.path.relpath(path, root)), []).append(path)
    return {split: sorted(paths) for split, paths in sorted(found.items())}


class _Layout:
    """The splits under a root: their names, and loading one (``datasets.Dataset``, memory-mapped)
    or only one of its columns."""

    def __init__(self, root: str, kind: str, names: Sequence[str]) -> None:
        self.root, self.kind, self.names = root, kind, list(names)
        self._loaded: dict[str, datasets.Dataset] = {}

    def resolve(self, split: str) -> list[str]:
        """The splits that make up ``split`` (several for ``all``).

        Raises:
            FileNotFoundError: the dataset has no such split; the message lists those it has.
        """
        if split in self.names:
            return [split]
        if split == _ALL:
            return self.names
        if split == _TRAIN and len(self.names) == 1:
            return self.names
        offered = [*self.names, *([] if _ALL in self.names else [_ALL])]
        if len(self.names) == 1 and _TRAIN not in self.names:
            offered.append(_TRAIN)
        raise FileNotFoundError(
            f"the {self.kind} at data.root={self.root!r} has no split {split!r}; its splits: "
            f"{', '.join(offered)} (set data.train_split / data.eval_train_split / data.eval_test_split)"
        )

    def load(self, split: str) -> datasets.Dataset:
        if split not in self._loaded:
            self._loaded[split] = self._load(split)
        return self._loaded[split]

    def _load(self, split: str) -> datasets.Dataset:
        raise NotImplementedError

    def column(self, split: str, key: str) -> pa.ChunkedArray | None:
        """Column ``key`` of ``split`` (None where the split has no such column)."""
        ds = self.load(split)
        return _arrow_column(ds, key) if key in ds.column_names else None


class _SavedLayout(_Layout):
    """A ``save_to_disk`` folder: one ``Dataset`` or a ``DatasetDict``."""

    def __init__(self, root: str) -> None:
        saved = datasets.load_from_disk(root, keep_in_memory=False)
        if isinstance(saved, datasets.Dataset):
            kind, splits = "saved Dataset", {str(saved.split) if saved.split else _TRAIN: saved}
        else:
            kind, splits = "saved DatasetDict", dict(saved)
        super().__init__(root, kind, sorted(splits))
        self._loaded.update(splits)


class _FilesLayout(_Layout):
    """A folder of parquet / arrow files grouped into splits by :func:`split_of_file`."""

    def __init__(self, root: str, files: dict[str, list[str]], cache_dir: str | None) -> None:
        super().__init__(root, "folder of parquet/arrow files", sorted(files))
        self.files, self.cache_dir = files, cache_dir

    def _formats(self, split: str) -> tuple[list[str], list[str]]:
        paths = self.files[split]
        parquet = [p for p in paths if p.lower().endswith(".parquet")]
        arrow = [p for p in paths if not p.lower().endswith(".parquet")]
        if parquet and arrow:  # most likely two copies of the same data: refuse to guess
            raise ValueError(
                f"split {split!r} under data.root={self.root!r} has both parquet and arrow files "
                f"(e.g. {parquet[0]!r} and {arrow[0]!r}); keep one format"
            )
        return parquet, arrow

    def _load(self, split: str) -> datasets.Dataset:
        parquet, arrow = self._formats(split)
        if parquet:
            # Converted once into the cache (a FileLock keeps concurrent ranks from racing).
            return datasets.Dataset.from_parquet(parquet, cache_dir=self.cache_dir)
        try:  # the IPC stream format (what datasets writes): memory-mapped in place
            parts = [datasets.Dataset.from_file(path) for path in arrow]
        except pa.ArrowInvalid:  # the IPC file format (Feather v2): converted into the cache
            return datasets.load_dataset("arrow", data_files=arrow, split="train", cache_dir=self.cache_dir)
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    def column(self, split: str, key: str) -> pa.ChunkedArray | None:
        parquet, _ = self._formats(split)
        if not parquet or split in self._loaded:
            return super().column(split, key)
        # Labels of a split not loaded otherwise: read from the parquet files, not converted.
        if any(key not in pq.read_schema(path).names for path in parquet):
            return None
        return pq.read_table(parquet, columns=[key]).column(key)


def _open(root: str, cache_dir: str | None) -> _Layout:
    """The layout of ``root``.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or holds none of the layouts.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root {root!r} is not an existing folder (dataset hf)")
    if any(os.path.isfile(os.path.join(root, f)) for f in ("dataset_dict.json", "state.json")):
        return _SavedLayout(root)
    files = find_data_files(root)
    if not files:
        raise FileNotFoundError(
            f"no Hugging Face dataset at data.root={root!r}: looked for a save_to_disk folder "
            "(dataset_dict.json or state.json) and for *.parquet / *.arrow files below it"
        )
    return _FilesLayout(root, files, cache_dir)


def _arrow_column(ds: datasets.Dataset, key: str) -> pa.ChunkedArray:
    """Column ``key`` of ``ds`` as arrow (zero-copy unless ``ds`` has an indices mapping)."""
    table = ds.select_columns([key]).with_format("arrow")[:]
    return table.column(key)


# ----------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------
def _labels(layout: _Layout, label_key: str | None, ds: datasets.Dataset) -> tuple[np.ndarray, list[str]]:
    """``(targets (N,) int64, classes)`` of ``ds`` (one or more splits of ``layout``).

    A ``ClassLabel`` column gives its names and values; integers or strings are numbered by
    their sorted distinct values over *all* splits (so that the splits of a dataset share one
    numbering: integers 0..K-1 stay as they are, others are renumbered 0..K-1); null, negative
    integers and a missing column mean no label (-1).
    """
    if label_key is None or label_key not in ds.column_names:
        return np.full(len(ds), -1, dtype=np.int64), []
    feature = ds.features[label_key]
    column = _arrow_column(ds, label_key)
    if isinstance(feature, datasets.ClassLabel):
        return column.fill_null(-1).to_numpy().astype(np.int64), list(feature.names)
    kind = column.type
    numeric = pa.types.is_integer(kind)
    if not (numeric or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(
            f"label column {label_key!r} (data.label_key) holds {kind}; expected a ClassLabel, "
            "integers or strings (data.label_key=null: unlabeled)"
        )
    distinct: set = set()
    for split in layout.names:
        other = layout.column(split, label_key)
        if other is not None:  # a cast that fails (strings here, integers there) is a ValueError
            values = pc.unique(other.cast(kind)).drop_null().to_pylist()
            distinct.update(v for v in values if not (numeric and v < 0))
    names = sorted(distinct)
    index = pc.index_in(column, value_set=pa.array(names, type=kind))  # null where not a class
    return index.fill_null(-1).to_numpy().astype(np.int64), [str(v) for v in names]


# ----------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------
def _check_image_column(ds: datasets.Dataset, image_key: str, where: str) -> None:
    if image_key not in ds.column_names:
        raise ValueError(
            f"{where} has no image column {image_key!r} (data.image_key); its columns: "
            f"{', '.join(ds.column_names)}"
        )
    kind = ds.data.schema.field(image_key).type
    fields = {kind.field(i).name for i in range(kind.num_fields)} if pa.types.is_struct(kind) else set()
    flat = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_string, pa.types.is_large_string)
    encoded = bool(fields & {"bytes", "path"}) or any(test(kind) for test in flat)
    if not encoded:
        raise ValueError(
            f"column {image_key!r} (data.image_key) of {where} holds {kind}, not images: expected an "
            "Image feature, encoded image bytes or image file paths"
        )


class HFImageDataset(EncodedImages, Dataset):
    """The images of one split of a Hugging Face dataset, left encoded by the library.

    Items are ``(transform(image), label)``: ``image`` a PIL image in the run's mode ("L" or
    "RGB"), or with ``decode_on="device"`` the :class:`~msn.data.decode.EncodedImage` bytes;
    ``label`` an ``int`` (``-1``: none). Rows are read from the memory-mapped arrow table (an
    ``Image`` column as ``{"bytes", "path"}``, a binary column as bytes, a string column as file
    paths, relative ones looked up under ``root`` first); a row that does not decode is skipped
    or raises as :class:`~msn.data.decode.EncodedImages` says, named ``root[split][index]``.

    Attributes:
        classes: class names (empty when unlabeled).
        targets: ``(N,)`` int64 labels, ``-1`` where a row has none.
        hf: the ``datasets.Dataset`` of the image column (arrow format).
    """

    def __init__(
        self,
        ds: datasets.Dataset,
        root: str,
        split: str,
        targets: np.ndarray,
        classes: Sequence[str],
        image_key: str = "image",
        transform: Callable | None = None,
        in_chans: int = 3,
        on_bad_image: str = "skip",
        bad_image_log: str | os.PathLike | None = None,
        decode_on: str = "workers",
    ) -> None:
        self._init_encoded(transform, in_chans, on_bad_image, bad_image_log, decode_on)
        if len(targets) != len(ds):
            raise ValueError(f"{len(ds)} rows but {len(targets)} labels")
        # Only the image column, as arrow: the library neither decodes it nor formats other columns.
        self.hf = ds.select_columns([image_key]).with_format("arrow")
        self.root, self.split, self.image_key = root, split, image_key
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.hf)

    def __getitem__(self, index: int) -> tuple[object, int]:
        # IndexError past the end keeps `for x in dataset` finite (the skip wraps around).
        return self._encoded(range(len(self))[index])

    def name(self, index: int) -> str:
        """What row ``index`` is called in messages and the bad-image log."""
        return f"{self.root}[{self.split}][{index}]"

    def _read(self, index: int) -> tuple[str | bytes, int, str]:
        index = int(index)
        value = self.hf[index].column(0)[0].as_py()
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str) and not os.path.isabs(value):
            under_root = os.path.join(self.root, value)
            value = under_root if os.path.exists(under_root) else value
        # No image at all (null): an empty, unreadable image.
        return (b"" if value is None else value), int(self.targets[index]), self.name(index)


def build_hf(
    split: str,
    root: str | os.PathLike | None,
    transform: Callable | None,
    in_chans: int,
    image_key: str = "image",
    label_key: str | None = "label",
    on_bad_image: str = "skip",
    bad_image_log: str | os.PathLike | None = None,
    decode_on: str = "workers",
    cache_dir: str | os.PathLike | None = None,
) -> HFImageDataset:
    """Split ``split`` of the Hugging Face dataset at ``root`` (layouts and split names: the
    module docstring).

    Args:
        image_key: the image column (an ``Image`` feature, encoded bytes or file paths).
        label_key: the label column (``ClassLabel``, integers or strings); None or a column the
            split lacks: unlabeled.
        cache_dir: where parquet files are converted to arrow (None: datasets' cache).
        (the others: :func:`msn.data.datasets.build_dataset`)

    Raises:
        FileNotFoundError: ``root`` is missing, holds no dataset, or has no split ``split``.
        ValueError: no column ``image_key``, a label column of another type, an empty split.
        BadImageError: none of the probed rows decodes.
    """
    if root is None:
        raise ValueError("dataset hf needs data.root: a save_to_disk folder, or parquet / arrow files")
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    layout = _open(root, None if cache_dir is None else os.fspath(cache_dir))
    parts = layout.resolve(split)
    loaded = [layout.load(part) for part in parts]
    ds = loaded[0] if len(loaded) == 1 else datasets.concatenate_datasets(loaded)
    where = f"split {split!r} of the {layout.kind} at {root!r}"
    _check_image_column(ds, image_key, where)
    if len(ds) == 0:
        raise ValueError(f"{where} has no rows")
    targets, classes = _labels(layout, label_key, ds)
    encoded = {"on_bad_image": on_bad_image, "bad_image_log": bad_image_log, "decode_on": decode_on}
    dataset = HFImageDataset(ds, root, split, targets, classes, image_key, transform, in_chans, **encoded)
    dataset.probe(f"rows of column {image_key!r} of split {split!r}", "Check data.root and data.image_key.")
    return dataset
