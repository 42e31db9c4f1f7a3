"""``data=litdata``: msn-prepare's chunks, training from the stream, disjoint ranks, exact resume
after a SIGKILL, and unreadable records skipped and counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("litdata")

from msn.data import build_dataset  # noqa: E402
from msn.data.decode import BadImageError, EncodedImage, read_bad_image_log  # noqa: E402
from msn.data.streaming import META_FILE, StreamingImages, prepare_litdata  # noqa: E402
from tests.helpers import device_views_data, fit_steps, tiny_module  # noqa: E402
from tests.training.test_resume import TINY, _losses, _start, _wait_for_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BAD = "3/zz_bad.jpg"
# The tiny digits recipe on the prepared digits JPEGs (train.py drops the digits experiment
# when the command line chooses other data).
LITDATA = [
    "data=litdata",
    "model=vit_nano",
    "model.encoder.patch_size=8",
    "trainer=cpu",
    "data.in_chans=1",
    "data.mean=[0.5]",
    "data.std=[0.5]",
    "data.num_workers=0",
    "data.transform.rand_size=16",
    "data.transform.focal_size=8",
    "data.eval_crop_pct=1.0",
]


def _digits_jpegs(src: Path) -> Path:
    """Digits as 16 px grey JPEGs in class folders, train/ (120) and test/ (40), one broken file."""
    for split, count in (("train", 120), ("test", 40)):
        ds = build_dataset("digits", split, in_chans=1)
        for i in range(count):
            img, label = ds[i]
            folder = src / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            img.resize((16, 16), Image.BILINEAR).save(folder / f"{i:03d}.jpg", quality=95)
    (src / "train" / BAD).write_bytes(b"\xff\xd8\xff" + bytes(40))
    return src


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("litdata")
    src = _digits_jpegs(base / "src")
    written = prepare_litdata(src, base / "chunks", num_workers=2, chunk_bytes="8kb")
    assert written == {"train": 121, "test": 40}
    return base / "chunks"


def test_prepare_keeps_the_files_bytes_and_their_labels_in_record_order(prepared):
    src = prepared.parent / "src" / "train"
    records = StreamingImages(str(prepared / "train"), decode_on="device")
    meta = json.loads((prepared / "train" / META_FILE).read_text())
    assert meta["classes"] == [str(c) for c in range(10)] and records.classes == meta["classes"]
    assert len(records) == 121 and len(records.targets) == 121
    assert len(list((prepared / "train").glob("chunk-*.bin"))) > 2  # several chunks, two writers
    names = set()
    for i in range(len(records)):
        data, label = records[i]
        name = data.name.split("#", 1)[1]
        names.add(name)
        if name != BAD:
            assert bytes(data) == (src / name).read_bytes()  # still the encoded file
        assert label == int(name.split("/")[0]) == records.targets[i]
    assert names == {str(p.relative_to(src)) for p in src.rglob("*.jpg")}


def test_a_prepared_split_decodes_like_the_image_folder(prepared):
    folder = build_dataset("imagefolder", "test", str(prepared.parent / "src"), in_chans=1)
    stream = build_dataset("litdata", "test", str(prepared), in_chans=1)
    by_name = {}
    for i in range(len(stream)):
        img, label = stream[i]
        by_name[i] = (np.asarray(img), label)
    pixels = sorted((a.tobytes(), y) for a, y in by_name.values())
    expected = sorted((np.asarray(folder[i][0]).tobytes(), folder[i][1]) for i in range(len(folder)))
    assert pixels == expected


def test_unreadable_records_are_skipped_logged_or_raised(prepared, tmp_path):
    log = tmp_path / "bad.txt"
    records = StreamingImages(str(prepared / "train"), in_chans=1, bad_image_log=log)
    bad = next(i for i in range(len(records)) if records._read(i)[2].endswith(BAD))
    image, label = records[bad]  # the next readable record takes its place
    assert isinstance(image, Image.Image) and label == records.targets[(bad + 1) % len(records)]
    assert list(read_bad_image_log(log)) == [f"{prepared / 'train'}#{BAD}"]
    strict = StreamingImages(str(prepared / "train"), in_chans=1, on_bad_image="raise")
    with pytest.raises(BadImageError, match="zz_bad.jpg.*on_bad_image=raise"):
        strict[bad]


def test_a_few_training_steps_from_the_stream_with_views_and_decoding_on_the_device(prepared, tmp_path):
    for decode_on in ("workers", "device"):
        dm = device_views_data("litdata", prepared, tmp_path, decode_on, batch_size=8)
        trainer = fit_steps(tiny_module(seed=0), dm, 3).trainer
        assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])


_RANK = """
import json, sys
import torch.distributed as dist
from msn.data.streaming import StreamingImages, streaming_loader
rank, root, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
dataset = StreamingImages(root, in_chans=1, decode_on="device")
loader = streaming_loader(dataset, 4, 2, 0, True, False, None, False)
names = [[img.name for images, _ in loader for img in images] for epoch in range(2)]
open(out, "w").write(json.dumps(names))
dist.destroy_process_group()
"""


def test_two_gloo_ranks_and_their_workers_stream_disjoint_records(prepared, tmp_path):
    # Two processes, as Lightning's DDP starts them; each reads with two DataLoader workers.
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    init = f"file://{tmp_path / 'init'}"
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK, str(r), str(prepared / "train"), init, str(outs[r])],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=180) == 0, p.communicate()[1][-3000:]
    seen = [json.loads(o.read_text()) for o in outs]
    for epoch in (0, 1):
        ranks = [s[epoch] for s in seen]
        assert len(ranks[0]) == len(ranks[1]) > 40  # the same number of batches on both ranks
        for names in ranks:
            assert len(set(names)) == len(names)  # two workers per rank: no record twice
        assert not set(ranks[0]) & set(ranks[1])  # ranks read disjoint records
    assert seen[0][0] != seen[0][1]  # a new shuffle each epoch


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_logs_the_uninterrupted_losses(prepared, tmp_path):
    overrides = [*LITDATA, f"data.root={prepared}", "data.num_workers=1"]
    reference = tmp_path / "reference"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={reference}", *TINY, *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _losses(reference)
    assert sorted(expected) == list(range(14))

    run = tmp_path / "killed"
    proc = _start(run, *overrides)
    _wait_for_step(proc, run, 7)  # past the step-6 save, inside the second 5-step epoch
    proc.kill()
    proc.communicate()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run}", *TINY, *overrides, "ckpt_path=last"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(run) == expected
    assert "skipped 1 unreadable image" in proc.stdout
    assert os.path.getsize(run / "bad_images.txt") > 0


def test_a_missing_split_or_root_says_how_to_make_one(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="msn-prepare src=FOLDER"):
        build_dataset("litdata", "train", str(tmp_path))
    with pytest.raises(ValueError, match="needs data.root"):
        build_dataset("litdata", "train", None)
    single = StreamingImages(str(prepared / "test"), decode_on="device")
    assert isinstance(single[0][0], EncodedImage)
    with pytest.raises(FileNotFoundError, match="single LitData dataset"):
        build_dataset("litdata", "test", str(prepared / "test"))
