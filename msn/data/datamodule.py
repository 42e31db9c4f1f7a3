"""Lightning data module for MSN pre-training (multi-view batches) plus labelled datasets for evaluation."""

from __future__ import annotations

import inspect
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from msn.checks import raise_problems
from msn.data.batched import BatchedMultiView
from msn.data.datasets import DATASETS, ENCODED_DATASETS, SPLITS, build_dataset, has_labels
from msn.data.decode import DECODE_ON, ON_BAD_IMAGE, BadImageLog, decode_batch
from msn.data.resumable import ResumableSampler, SeededDataset, batch_seed, data_position
from msn.data.transforms import (
    INTERPOLATIONS,
    ConvertMode,
    MultiViewTransform,
    _resolve_mean_std,
    crop_pct_problems,
    eval_transform,
    image_mode,
    int_problems,
    is_int,
    mean_std_problems,
)

__all__ = ["AUGMENT_ON", "MSNDataModule"]

# Where the multi-view augmentation runs: per image in the DataLoader workers (PIL, the official
# pipeline) or per batch on the training device after the transfer (msn.data.batched).
AUGMENT_ON = ("workers", "device")

# Splits whose meaning differs between pre-training and evaluation: STL-10's "train" is train+unlabeled (right
# for pre-training), but evaluation needs the labelled part.
_EVAL_SPLIT_ALIASES = {("stl10", "train"): "labeled"}


def _worker_init(worker_id: int) -> None:
    """Workers ignore Ctrl-C: the terminal sends SIGINT to them too, and a dead worker would end
    the step that the training process finishes and saves before it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.environ.get("PL_SEED_WORKERS") == "1":  # what Lightning adds when no init function is given
        pl_worker_init_function(worker_id)


def _transform_arguments(transform: Mapping | None, in_chans: Any, mean: Any, std: Any) -> dict[str, Any]:
    """The MultiViewTransform keywords of a ``data.transform`` mapping, with the data module's
    channels and normalisation where it names none."""
    kwargs = {str(k): v for k, v in (transform or {}).items() if k != "_target_"}
    return {"in_chans": in_chans, "mean": mean, "std": std, **kwargs}


def _transform_problems(transform: Any, in_chans: Any, mean: Any, std: Any) -> list[str]:
    """What is wrong with ``data.transform`` (named relative to ``data``) for these channels."""
    if not (transform is None or isinstance(transform, (Mapping, MultiViewTransform))):
        return [
            "transform must be a MultiViewTransform, a mapping of its arguments or null, "
            f"got {type(transform).__name__}"
        ]
    ready = isinstance(transform, MultiViewTransform)
    kwargs = {} if ready else _transform_arguments(transform, in_chans, mean, std)
    given = transform.in_chans if ready else kwargs["in_chans"]
    if given != in_chans:
        return [f"transform.in_chans ({given}) differs from in_chans ({in_chans})"]
    try:
        return [] if ready else [f"transform.{p}" for p in MultiViewTransform.problems(**kwargs)]
    except TypeError as e:  # a key it does not take
        return [f"transform: {e}; allowed keys: {list(inspect.signature(MultiViewTransform).parameters)}"]


class MSNDataModule(L.LightningDataModule):
    """Multi-view pre-training data for MSN.

    Batches from :meth:`train_dataloader` are ``(views, labels)``: ``views`` is a list of
    ``transform.num_views`` tensors of shape ``(B, C, H, W)`` (target view first, then the ``rand_size``
    anchors, then the ``focal_size`` views) and ``labels`` is a ``(B,)`` int64 tensor (``-1`` when unlabeled).

    Args:
        name: Dataset name, one of :data:`msn.data.datasets.DATASETS`.
        root: Data folder (see :func:`msn.data.build_dataset`).
        download: Let torchvision download missing datasets.
        in_chans: 1 or 3 image channels.
        batch_size: Images per batch (per device).
        num_workers: DataLoader worker processes; ``-1`` means ``min(os.cpu_count(), 8)``.
        pin_memory: Pin host memory (only used when CUDA is available).
        persistent_workers: Keep workers alive between epochs (only used when ``num_workers > 0``).
        drop_last: Drop the last incomplete batch (keeps the batch size, and thus the MSN loss, constant).
        transform: A :class:`MultiViewTransform`, or a mapping of its keyword arguments (e.g. a Hydra
            DictConfig); ``None`` uses the official defaults. ``in_chans``/``mean``/``std`` default to this
            module's.
        eval_img_size: Image size of the evaluation transform.
        eval_crop_pct: Centre-crop fraction of the evaluation transform (1.0 for tiny images).
        mean: Normalisation mean (``None``: ImageNet for RGB, 0.5 for grayscale).
        std: Normalisation std (``None``: ImageNet for RGB, 0.5 for grayscale).
        seed: Seeds the shuffling generator (and so the DataLoader workers' base seeds).
        train_split: Split used for pre-training.
        eval_train_split: Labelled split used as the evaluation training (support) set.
        eval_test_split: Labelled split used as the evaluation test set.
        augment_on: ``workers`` (PIL, one image at a time in the DataLoader workers; official) or
            ``device`` (:class:`~msn.data.batched.BatchedMultiView` on whole uint8 batches after they
            reach the training device: far less CPU per image, and no GPU starved by its workers).
        load_size: With ``augment_on=device``, the workers resize the short side to this and centre-crop
            a square so that images batch together; ``null`` keeps the stored size (all images must
            then have the same size, as in digits, Fashion-MNIST, CIFAR and STL-10).
        on_bad_image: ``skip`` (default) or ``raise`` on an image that cannot be decoded (the
            formats of encoded images: imagefolder, hf, litdata; see :class:`~msn.data.decode.EncodedImages`).
        bad_image_log: File that skipped images are listed in (``name<TAB>reason`` lines).
        decode_on: ``workers`` (PIL, per image) or ``device`` (with ``augment_on=device``: the
            workers only read the encoded bytes, and every training batch is decoded on the training
            device by :func:`~msn.data.decode.decode_batch`; JPEGs by nvJPEG on CUDA).
        image_key: hf: the column that holds the images.
        label_key: hf: the column that holds the labels (null: unlabeled).
        list_cache: imagefolder: folder where the file list of a tree is kept between runs, keyed by
            the tree's path and the modification times of its folders (null: list it every time).

    Resuming: the training stream is a pure function of ``(seed, epoch, position)``
    (:mod:`msn.data.resumable`), and :meth:`state_dict` stores the epoch and the batches already
    consumed, so a run resumed from a checkpoint continues with the very next batch.
    """

    def __init__(
        self,
        name: str = "digits",
        root: str | None = None,
        download: bool = False,
        in_chans: int = 3,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = True,
        transform: MultiViewTransform | Mapping | None = None,
        eval_img_size: int = 224,
        eval_crop_pct: float = 0.875,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
        train_split: str = "train",
        eval_train_split: str = "train",
        eval_test_split: str = "test",
        augment_on: str = "workers",
        load_size: int | None = None,
        on_bad_image: str = "skip",
        bad_image_log: str | os.PathLike | None = None,
        decode_on: str = "workers",
        image_key: str = "image",
        label_key: str | None = "label",
        list_cache: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        problems = MSNDataModule.problems(
            name=name,
            root=root,
            download=download,
            in_chans=in_chans,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            drop_last=drop_last,
            transform=transform,
            eval_img_size=eval_img_size,
            eval_crop_pct=eval_crop_pct,
            mean=mean,
            std=std,
            seed=seed,
            train_split=train_split,
            eval_train_split=eval_train_split,
            eval_test_split=eval_test_split,
            augment_on=augment_on,
            load_size=load_size,
            on_bad_image=on_bad_image,
            bad_image_log=bad_image_log,
            decode_on=decode_on,
            image_key=image_key,
            label_key=label_key,
            list_cache=list_cache,
        )
        raise_problems(problems, prefix="data.")
        in_chans, mean_t, std_t = _resolve_mean_std(in_chans, mean, std)
        self.name = name
        self.root = None if root is None else os.fspath(root)
        self.download = bool(download)
        self.in_chans = in_chans
        self.mean, self.std = mean_t, std_t
        self.batch_size = int(batch_size)
        self.num_workers = min(os.cpu_count() or 1, 8) if num_workers == -1 else int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.drop_last = bool(drop_last)
        self.eval_img_size = int(eval_img_size)
        self.eval_crop_pct = float(eval_crop_pct)
        self.seed = int(seed)
        self.train_split = str(train_split)
        self.eval_train_split = str(eval_train_split)
        self.eval_test_split = str(eval_test_split)
        self.transform = self._build_transform(transform)
        self.augment_on = augment_on
        self.load_size = None if load_size is None else int(load_size)
        # Same arguments as the PIL pipeline (already validated by it); used when augment_on=device.
        self.batched_transform: BatchedMultiView | None = None
        if augment_on == "device":
            self.batched_transform = BatchedMultiView(**self._transform_kwargs(self.transform))

        self.on_bad_image = on_bad_image
        self.bad_image_log = None if bad_image_log is None else os.fspath(bad_image_log)
        self.decode_on = decode_on
        self.image_key = image_key
        self.label_key = label_key
        self.list_cache = None if list_cache is None else os.path.expanduser(os.fspath(list_cache))
        # What the training process reports the images that fail to decode on the device in.
        self._device_bad_log = BadImageLog(self.bad_image_log)

        self.train_dataset: Dataset | None = None
        self._listing_shared = False
        self._eval_datasets: tuple[Dataset, Dataset] | None = None
        # Set by load_state_dict: where the training stream of a resumed run continues.
        self._resume_state: dict | None = None

    @staticmethod
    def problems(**kwargs: Any) -> list[str]:
        """Every problem of these constructor arguments (the missing ones take their defaults), named
        as the keys of the ``data`` config node; TypeError for an argument it does not take."""
        given = inspect.signature(MSNDataModule).bind_partial(**kwargs)
        given.apply_defaults()
        a = given.arguments
        name, load_size = a["name"], a["load_size"]
        problems = []
        if not (isinstance(name, str) and name in DATASETS):
            problems.append(f"name={name!r} is unknown; allowed: {', '.join(DATASETS)}")
        problems += int_problems("batch_size", a["batch_size"], 1)
        if not (is_int(a["num_workers"]) and a["num_workers"] >= -1):
            problems.append(
                f"num_workers={a['num_workers']} must be an integer >= 0, or -1 for one per CPU core (max 8)"
            )
        problems += int_problems("eval_img_size", a["eval_img_size"], 1)
        problems += crop_pct_problems("eval_crop_pct", a["eval_crop_pct"])
        if a["augment_on"] not in AUGMENT_ON:
            problems.append(f"augment_on must be one of {list(AUGMENT_ON)}, got {a['augment_on']!r}")
        elif a["augment_on"] == "device" and name in ENCODED_DATASETS and load_size is None:
            # Files of different sizes cannot be stacked into one uint8 batch.
            problems.append(
                f"augment_on=device with data.name={name} needs data.load_size (e.g. 256): "
                "the images are resized to one square size before batching"
            )
        if a["decode_on"] not in DECODE_ON:
            problems.append(f"decode_on must be one of {list(DECODE_ON)}, got {a['decode_on']!r}")
        elif a["decode_on"] == "device" and a["augment_on"] != "device":
            problems.append(
                "decode_on=device needs augment_on=device: the views are made from the decoded batch"
            )
        elif a["decode_on"] == "device" and name in DATASETS and name not in ENCODED_DATASETS:
            problems.append(
                f"decode_on=device needs encoded image files ({', '.join(ENCODED_DATASETS)}); "
                f"{name!r} is held decoded"
            )
        if not (isinstance(a["image_key"], str) and a["image_key"]):
            problems.append(f"image_key must be a column name, got {a['image_key']!r}")
        if not (a["label_key"] is None or isinstance(a["label_key"], str)):
            problems.append(f"label_key must be a column name or null, got {a['label_key']!r}")
        if not (load_size is None or (is_int(load_size) and load_size >= 1)):
            problems.append(f"load_size must be an integer >= 1 or null, got {load_size!r}")
        if not is_int(a["seed"]):
            problems.append(f"seed must be an integer, got {a['seed']!r}")
        if a["on_bad_image"] not in ON_BAD_IMAGE:
            allowed = ", ".join(ON_BAD_IMAGE)
            problems.append(f"on_bad_image={a['on_bad_image']!r} is unknown; allowed: {allowed}")
        for key in ("train_split", "eval_train_split", "eval_test_split") if name in DATASETS else ():
            split = a[key] if key != "eval_train_split" else _EVAL_SPLIT_ALIASES.get((name, a[key]), a[key])
            if SPLITS[name] and split not in SPLITS[name]:
                problems.append(f"{key} must be one of {list(SPLITS[name])} for {name!r}, got {a[key]!r}")
        # The transform takes these channels and statistics unless it names its own: checked once right.
        channels = mean_std_problems(a["in_chans"], a["mean"], a["std"])
        transform = channels or _transform_problems(a["transform"], a["in_chans"], a["mean"], a["std"])
        return problems + transform

    def _build_transform(self, transform: MultiViewTransform | Mapping | None) -> MultiViewTransform:
        """A ready transform, or one made of its kwargs (Hydra passes a DictConfig) with this module's
        channels and normalisation unless given (the arguments are checked by :meth:`problems`)."""
        if isinstance(transform, MultiViewTransform):
            return transform
        kwargs = _transform_arguments(transform, self.in_chans, self.mean, self.std)
        return MultiViewTransform(**kwargs)

    @staticmethod
    def _transform_kwargs(t: MultiViewTransform) -> dict:
        keys = inspect.signature(MultiViewTransform).parameters
        return {k: getattr(t, k) for k in keys}

    def _load_transform(self) -> T.Compose:
        """What the workers do with ``augment_on=device``: decode to a uint8 tensor (optionally resized)."""
        steps: list = [ConvertMode(image_mode(self.in_chans))]
        if self.load_size is not None:
            steps += [
                T.Resize(self.load_size, interpolation=INTERPOLATIONS[self.transform.interpolation]),
                T.CenterCrop(self.load_size),
            ]
        return T.Compose([*steps, T.PILToTensor()])

    def on_before_batch_transfer(self, batch: object, dataloader_idx: int) -> object:
        """With ``decode_on=device``: decode the training batch's encoded images on the training
        device (the transfer that follows then has nothing left to move)."""
        if self.decode_on != "device" or self.trainer is None or not self.trainer.training:
            return batch
        encoded, labels, seeds = batch  # type: ignore[misc]
        images = decode_batch(
            encoded,
            self.in_chans,
            self.load_size,
            self.trainer.strategy.root_device,
            self.transform.interpolation,
            self.on_bad_image,
            self._device_bad_log,
        )
        return images, labels, seeds

    def on_after_batch_transfer(self, batch: object, dataloader_idx: int) -> object:
        """With ``augment_on=device``: turn the uint8 training batch into the list of views."""
        if self.batched_transform is None or self.trainer is None or not self.trainer.training:
            return batch
        images, labels, seeds = batch  # type: ignore[misc]
        # Seeded from the batch's sample seeds, not the global random state: every rank of a
        # multi-GPU run gets other crops (all ranks share the global seed), and a resumed run
        # repeats the uninterrupted run's views.
        generator = torch.Generator(device=images.device).manual_seed(batch_seed(seeds))
        return self.batched_transform.to(images.device)(images, generator), labels

    @property
    def num_views(self) -> int:
        """Number of views per image in a training batch."""
        return self.transform.num_views

    def _build(self, split: str, transform: Callable | None, decode_on: str = "workers") -> Dataset:
        return build_dataset(
            self.name,
            split,
            self.root,
            transform,
            download=self.download,
            in_chans=self.in_chans,
            on_bad_image=self.on_bad_image,
            bad_image_log=self.bad_image_log,
            decode_on=decode_on,
            image_key=self.image_key,
            label_key=self.label_key,
            list_cache=self.list_cache,
        )

    def prepare_data(self) -> None:
        """Download once (Lightning calls this on a single process) before ``setup`` runs everywhere."""
        if self.download:
            self._build(self.train_split, None)

    def setup(self, stage: str | None = None) -> None:
        """Build the pre-training dataset with the multi-view transform (once) and check the batch size.

        An image folder is listed by global rank 0 only and sent to the other ranks, so that they
        all train on the same file list and the tree is walked once per run."""
        trainer = self.trainer
        world, rank = (
            (trainer.world_size, trainer.global_rank) if trainer is not None else (1, rank_zero_only.rank)
        )
        shared = self.name == "imagefolder"
        if self.train_dataset is None and not (shared and rank > 0):
            self.train_dataset = self._checked(self._build_train())
        if shared and world > 1 and not self._listing_shared:
            self.train_dataset = trainer.strategy.broadcast(self.train_dataset if rank == 0 else None)  # type: ignore[union-attr]
            self._listing_shared = True

    def _build_train(self) -> Dataset:
        if self.decode_on == "device":
            return self._build(self.train_split, None, "device")
        return self._build(
            self.train_split, self.transform if self.batched_transform is None else self._load_transform()
        )

    def _checked(self, dataset: Dataset) -> Dataset:
        if self.drop_last and self.batch_size > len(dataset):
            # With drop_last every batch would be dropped and training would silently run zero steps.
            raise ValueError(
                f"data.batch_size ({self.batch_size}) is larger than the {self.name!r} split "
                f"{self.train_split!r} ({len(dataset)} images) while data.drop_last is true: no batch would "
                "be produced. Lower data.batch_size or set data.drop_last=false."
            )
        return dataset

    def train_dataloader(self) -> DataLoader:
        """Shuffled multi-view batches ``(views, labels)``; see the class docstring."""
        if self.train_dataset is None:
            self.setup("fit")
        if self.name == "litdata":
            from msn.data.streaming import streaming_loader

            # LitData orders the stream and Lightning saves (and restores) the loader's position.
            return streaming_loader(
                self.train_dataset,  # type: ignore[arg-type]
                self.batch_size,
                self.num_workers,
                self.seed,
                self.drop_last,
                self.pin_memory and torch.cuda.is_available(),
                _worker_init,
                return_seed=self.batched_transform is not None,
            )
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # Shuffle order and augmentation depend on (data.seed, epoch, index) only (msn.data.resumable).
        sampler = ResumableSampler(self.train_dataset, self.batch_size, self.seed, world_size, rank)
        if self._resume_state is not None:
            state, self._resume_state = self._resume_state, None
            if (state["batch_size"], state["world_size"]) != (self.batch_size, world_size):
                rank_zero_warn(
                    f"resuming with data.batch_size={self.batch_size} on {world_size} process(es) instead of "
                    f"{state['batch_size']} on {state['world_size']}: the rest of epoch {state['epoch']} "
                    "is not the one the interrupted run would have seen"
                )
            sampler.set_position(state["epoch"], state["batches_done"])
        # The loader's own generator only draws the workers' base seeds; without one it would draw
        # them from (and so move) the global random state at every epoch.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            SeededDataset(self.train_dataset, return_seed=self.batched_transform is not None),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=self.drop_last,
            generator=generator,
            worker_init_fn=_worker_init,
        )

    def state_dict(self) -> dict:
        """Position of the training stream, saved in every checkpoint: ``epoch`` and ``batches_done``
        in it (an epoch's end is stored as the next epoch's start), plus the batch layout."""
        trainer = self.trainer
        if trainer is None:
            return {}
        epoch, done = data_position(
            trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx + 1, trainer.num_training_batches
        )
        return {
            "epoch": epoch,
            "batches_done": done,
            "batch_size": self.batch_size,
            "world_size": trainer.world_size,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Remember where to continue; applied by the next :meth:`train_dataloader`."""
        self._resume_state = dict(state_dict) if state_dict else None

    def eval_datasets(self) -> tuple[Dataset, Dataset]:
        """``(train, test)`` labelled datasets with the deterministic eval transform (for low-shot eval).

        Raises:
            ValueError: the dataset (or one of the chosen splits) has no labels or its files are missing.
        """
        if self._eval_datasets is None:
            tf = self.eval_view()
            train, test = (self.labelled_split(key, tf) for key in ("eval_train_split", "eval_test_split"))
            self._eval_datasets = (train, test)
        return self._eval_datasets

    def eval_view(self) -> Callable:
        """The deterministic evaluation transform (resize, centre crop, normalise)."""
        return eval_transform(
            self.eval_img_size,
            self.in_chans,
            self.mean,
            self.std,
            self.eval_crop_pct,
            self.transform.interpolation,
        )

    def eval_images(self) -> tuple[Dataset, bool]:
        """``(dataset, labelled)``: the images that evaluations needing no labels look at (the
        visual report, RankMe), with the evaluation transform: the labelled evaluation train split,
        else (unlabelled data) the training split."""
        try:
            return self.eval_datasets()[0], True
        except ValueError:
            return self._build(self.train_split, self.eval_view()), False

    def labelled_split(self, key: str, transform: Callable) -> Dataset:
        """The labelled split ``data.<key>`` (``eval_train_split`` or ``eval_test_split``) with ``transform``.

        Raises:
            ValueError: the split has no labels or its files are missing.
        """
        split = getattr(self, key)
        split = _EVAL_SPLIT_ALIASES.get((self.name, split), split)
        try:
            ds = self._build(split, transform)
        except FileNotFoundError as e:
            # E.g. an imagefolder without a test/ or val/ folder. Reported as "no evaluation data"
            # (ValueError) so callers can skip the evaluation instead of failing after pre-training.
            raise ValueError(f"no evaluation data for data.{key}={split!r}: {e}") from e
        if not has_labels(ds):
            raise ValueError(
                f"evaluation needs labels, but split {split!r} (data.{key}) of dataset {self.name!r} has "
                "none (an imagefolder needs one sub-folder per class). Choose a labelled "
                "dataset/split or disable the evaluation."
            )
        return ds
