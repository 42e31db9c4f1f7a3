"""LitData's streaming format (``data=litdata``): image folders converted once into optimized
chunks (``msn-prepare``), then streamed by every rank and DataLoader worker from disjoint chunks,
from a local folder or an object store.

A prepared root holds one LitData dataset per split (``train/``, and ``test/`` when the source had
a ``test`` or ``val`` folder) whose records are ``{"image": encoded bytes, "label": int, "name":
str}``, plus ``msn.json`` beside each index with the class names and the labels in record order
(what the low-shot protocol needs without reading every image).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from litdata import StreamingDataLoader, StreamingDataset, optimize
from litdata.streaming.sampler import ChunkedIndex

from msn.data.decode import EncodedImages
from msn.data.folders import imagefolder_listing
from msn.data.resumable import sample_seed

__all__ = ["META_FILE", "StreamingImages", "is_remote", "prepare_litdata", "streaming_loader"]

log = logging.getLogger(__name__)

META_FILE = "msn.json"
# The sub-folders of a source image folder that become splits (the same rule as imagefolder's).
_SOURCE_SPLITS = {"train": ("train",), "test": ("test", "val")}


def is_remote(root: str) -> bool:
    """Whether LitData reads ``root`` from an object store (``s3://``, ``gs://``, ...)."""
    return "://" in root and not root.startswith("local:")


def _split_dir(root: str, split: str) -> str:
    """The dataset of ``split`` under a prepared ``root``: ``root/<split>``, or ``root`` itself
    when it is a single dataset (then it is the train split; "all" is the same)."""
    if is_remote(root):
        return root.rstrip("/") + "/" + split if split != "all" else root
    if os.path.isfile(os.path.join(root, "index.json")):
        if split == "test":
            raise FileNotFoundError(f"{root!r} is a single LitData dataset: there is no test split")
        return root
    if split == "all":
        split = "train"
    path = os.path.join(root, split)
    if not os.path.isfile(os.path.join(path, "index.json")):
        raise FileNotFoundError(
            f"no LitData dataset of split {split!r} under data.root={root!r} (looked for "
            f"{os.path.join(path, 'index.json')}); write one with msn-prepare src=FOLDER out={root}"
        )
    return path


class StreamingImages(EncodedImages, StreamingDataset):
    """The images of a prepared LitData dataset: ``(image, label)``, or ``(image, label, seed)``
    with ``return_seed``.

    As a stream (the training loader), LitData shuffles the chunks and the records inside them
    from ``seed`` and the epoch, and splits the chunks between ranks and workers. Every record's
    augmentation is seeded by ``sample_seed(seed, epoch, index)``, not by the worker that reads it,
    so a resumed loader repeats the uninterrupted run's views. As a map-style dataset
    (``dataset[i]``, for evaluation) it reads record ``i``.

    Args:
        input_dir: A prepared split (local folder or object-store URL).
        transform: Applied to the decoded image (``decode_on="workers"``).
        in_chans: 1 or 3.
        on_bad_image, bad_image_log, decode_on: see :class:`~msn.data.decode.EncodedImages`.
        shuffle: Shuffle the stream (training).
        seed: Shuffling and augmentation seed.
        drop_last: Let every rank see as many records (LitData's rule: on for several ranks).
        return_seed: Append the sample seed (for the batched augmentation of ``augment_on=device``).
    """

    def __init__(
        self,
        input_dir: str,
        transform: Callable | None = None,
        in_chans: int = 3,
        on_bad_image: str = "skip",
        bad_image_log: str | os.PathLike | None = None,
        decode_on: str = "workers",
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool | None = None,
        return_seed: bool = False,
    ) -> None:
        StreamingDataset.__init__(self, input_dir, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self._init_encoded(transform, in_chans, on_bad_image, bad_image_log, decode_on)
        self.root = input_dir
        self.return_seed = return_seed
        meta = self._meta()
        self.classes: list[str] = list(meta.get("classes", []))
        self._targets: list[int] | None = meta.get("targets")

    def _meta(self) -> dict[str, Any]:
        path = os.path.join(self.root, META_FILE)
        if is_remote(self.root) or not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    @property
    def targets(self) -> list[int]:
        """Labels in record order (``-1``: unlabeled); read from the records when ``msn.json``
        is not at hand (a remote root)."""
        if self._targets is None:
            self._targets = [int(StreamingDataset.__getitem__(self, i)["label"]) for i in range(len(self))]
            self.classes = self.classes or [str(c) for c in sorted({t for t in self._targets if t >= 0})]
        return self._targets

    def _read(self, index: ChunkedIndex | int) -> tuple[bytes, int, str]:
        record = StreamingDataset.__getitem__(self, index)
        return record["image"], int(record["label"]), f"{self.root}#{record['name']}"

    def __getitem__(self, index: ChunkedIndex | int) -> Any:  # type: ignore[override]
        position = index.index if isinstance(index, ChunkedIndex) else int(index)
        if not self.shuffle:  # evaluation: deterministic transforms, nothing to seed
            return self._encoded(position, index)
        seed = sample_seed(self.seed, self.current_epoch, position)
        # As SeededDataset does for map-style data: only torch's CPU generator, restored afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            image, label = self._encoded(position, index)
        return (image, label, seed) if self.return_seed else (image, label)


def build_litdata(
    split: str,
    root: str | None,
    transform: Callable | None,
    in_chans: int,
    on_bad_image: str = "skip",
    bad_image_log: str | os.PathLike | None = None,
    decode_on: str = "workers",
) -> StreamingImages:
    """The prepared split of ``root`` as a map-style :class:`StreamingImages` (the training stream
    is made by :func:`streaming_loader`)."""
    if root is None:
        raise ValueError("data=litdata needs data.root: a folder written by msn-prepare (or its URL)")
    directory = _split_dir(os.fspath(root), split)
    dataset = StreamingImages(directory, transform, in_chans, on_bad_image, bad_image_log, decode_on)
    if not is_remote(directory):  # remotely, the probe would fetch chunks spread over the data
        dataset.probe(f"records of {directory}", "Check data.root.")
    return dataset


class _StreamLoader(StreamingDataLoader):
    """LitData's loader, resumed by Lightning (which saves a stateful loader's ``state_dict()`` in
    every checkpoint and loads it back) without replaying the resumed epoch.

    LitData replays from a loaded state until an epoch's iteration runs to its end. Lightning
    knows the epoch's length and stops taking batches at its last one, so that end is never
    reached, and the next epoch would start over at the resume point. Here only the first epoch
    after a load continues from it.
    """

    _resuming = False

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._resuming = self.restore

    def __iter__(self) -> Iterator[Any]:
        # Runs at the first batch of an epoch: iterators that Lightning makes and drops unused
        # do not count.
        if not self._resuming:
            self.restore = False
        self._resuming = False
        yield from super().__iter__()


def streaming_loader(
    dataset: StreamingImages,
    batch_size: int,
    num_workers: int,
    seed: int,
    drop_last: bool,
    pin_memory: bool,
    worker_init_fn: Callable[[int], None] | None,
    return_seed: bool,
) -> _StreamLoader:
    """The shuffled training stream of ``dataset`` (rebuilt here, inside the run, so that LitData
    sees the process group: each rank and worker then reads its own chunks)."""
    stream = StreamingImages(
        dataset.root,
        dataset.image_transform,
        dataset.in_chans,
        dataset.on_bad_image,
        dataset.bad_image_log,
        dataset.decode_on,
        shuffle=True,
        seed=seed,
        drop_last=True if drop_last else None,
        return_seed=return_seed,
    )
    return _StreamLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        # New workers every epoch: a persistent worker keeps its own copy of the dataset, whose
        # epoch (and so shuffle and augmentation seeds) only moves on when that worker reaches the
        # end of the stream, which an epoch cut short (limit_train_batches) never does.
        persistent_workers=False,
        worker_init_fn=worker_init_fn,
    )


def _record(sample: tuple[str, int, str]) -> dict[str, Any]:
    path, label, name = sample
    with open(path, "rb") as f:
        return {"image": f.read(), "label": label, "name": name}


def prepare_litdata(
    src: str | os.PathLike,
    out: str | os.PathLike,
    num_workers: int | None = None,
    chunk_bytes: str = "64MB",
    list_cache: str | os.PathLike | None = None,
) -> dict[str, int]:
    """Convert an image folder into a LitData root: ``out/train`` (and ``out/test`` from a
    ``test`` or ``val`` folder), records keeping the files' encoded bytes. Labels come from class
    sub-folders when there are any (the imagefolder rule). Returns the records per split."""
    src, out = os.fspath(src), os.fspath(out)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"src={src!r} is not an existing folder")
    present = {}
    for split, names in _SOURCE_SPLITS.items():
        found = [os.path.join(src, d) for d in names if os.path.isdir(os.path.join(src, d))]
        if found:
            present[split] = found[0]
    if "train" not in present:
        present = {"train": src}  # a folder without train/: all of it is the train split
    written = {}
    for split, directory in present.items():
        samples, classes = imagefolder_listing(directory, list_cache)
        if not samples:
            raise ValueError(f"no images found under {directory!r}")
        target = os.path.join(out, split)
        inputs = [(path, label, os.path.relpath(path, directory)) for path, label in samples]
        workers = max(1, min(num_workers or os.cpu_count() or 1, len(inputs)))
        print(f"msn-prepare: {split}: {len(inputs)} images from {directory} -> {target}", flush=True)
        optimize(
            fn=_record,
            inputs=inputs,
            output_dir=target,
            chunk_bytes=chunk_bytes,
            num_workers=workers,
            mode="overwrite",
            verbose=True,
        )
        # Labels in record order (the workers interleave the inputs), so that the low-shot pool
        # needs no pass over the images later.
        records = StreamingDataset(target)
        targets = [int(records[i]["label"]) for i in range(len(records))]
        meta = {"classes": classes, "targets": targets, "source": os.path.abspath(directory)}
        with open(os.path.join(target, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f)
        written[split] = len(records)
    return written
