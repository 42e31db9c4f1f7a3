"""The data pipeline from JPEG files to the official views, in images per CPU core, three ways.

    python benchmarks/decode_pipeline.py                      # 2,000 JPEGs of 500 x 375, CPU
    python benchmarks/decode_pipeline.py images=4000 device=cuda batch=64

The files are Fashion-MNIST images upscaled to 500 x 375 RGB JPEGs (quality 90; the Debian package
``dataset-fashion-mnist``, else random-noise images of the same size), written once to a temporary
folder. Each path is timed by the CPU time of this process (``time.process_time``, one thread), so
the figure is per core; a GPU's share runs on the GPU and is reported apart:

- ``PIL workers`` (``data.augment_on=workers``, the official pipeline): read, decode with PIL, and
  the views of :class:`msn.data.transforms.MultiViewTransform`, one image at a time;
- ``CPU decode + device views`` (``augment_on=device``): the workers read, decode and resize to
  ``load_size`` (PIL); :class:`msn.data.batched.BatchedMultiView` makes the views of each batch;
- ``device decode`` (``augment_on=device decode_on=device``): the workers only read the bytes;
  :func:`msn.data.decode.decode_batch` decodes and resizes each batch (nvJPEG on CUDA, libjpeg-turbo
  on the CPU), then the same batched views.

"Cores per 1,000 images/s" is 1,000 x (host CPU seconds per image); on a GPU machine the device
part leaves the host cores. ``feed=N`` (the model step's images/s, e.g. from
``benchmarks/throughput.py``) adds what keeping that step fed costs: host cores, and the share of
the device's time that decoding and views take at N images/s.
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.keyvalue import parse_key_values  # noqa: E402
from msn.data.batched import BatchedMultiView  # noqa: E402
from msn.data.datasets import DEFAULT_FASHION_MNIST_DIR, read_idx  # noqa: E402
from msn.data.decode import EncodedImage, decode_batch, load_image  # noqa: E402
from msn.data.transforms import INTERPOLATIONS, MultiViewTransform  # noqa: E402

DEFAULTS = {"images": 2000, "batch": 64, "load_size": 256, "device": "cpu", "threads": 1, "feed": 0.0}
VIEWS = {"rand_size": 224, "focal_size": 96, "rand_views": 1, "focal_views": 10}  # + the target view


def write_jpegs(folder: Path, count: int) -> list[Path]:
    """``count`` 500 x 375 RGB JPEGs: Fashion-MNIST upscaled (else noise)."""
    idx = Path(DEFAULT_FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz"
    source = read_idx(idx, 0x00000803)[:count] if idx.is_file() else None
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        if source is not None:
            img = Image.fromarray(source[i]).resize((500, 375), Image.BICUBIC).convert("RGB")
        else:
            img = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
        path = folder / f"{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def _cpu_seconds(fn: Callable[[], None]) -> tuple[float, float]:
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start_wall, time.process_time() - start_cpu


def main(argv: list[str]) -> None:
    opts = {**DEFAULTS, **parse_key_values(argv, DEFAULTS)}
    images, batch, load_size = int(opts["images"]), int(opts["batch"]), int(opts["load_size"])
    feed = float(opts["feed"])
    if feed < 0:
        raise SystemExit(f"feed={feed}: the model step's images/s, > 0 (or 0: no feed columns)")
    device = torch.device(str(opts["device"]))
    torch.set_num_threads(int(opts["threads"]))
    per_image = MultiViewTransform(**VIEWS)
    batched = BatchedMultiView(**VIEWS).to(device)
    resize = INTERPOLATIONS["bilinear"]
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), images)
        mb = sum(p.stat().st_size for p in paths) / 2**20
        batches = [paths[i : i + batch] for i in range(0, len(paths) - batch + 1, batch)]
        n = len(batches) * batch
        generator = torch.Generator(device=device).manual_seed(0)

        def timed(host: Callable[[list[Path]], object], on_device: Callable[[object], object] | None):
            """(host CPU-s, device s) over all batches: ``host`` is the workers' part, ``on_device``
            the training process's (CPU time here; on CUDA wall time after a synchronize)."""
            host_s = device_s = 0.0
            for group in batches:
                c0 = time.process_time()
                payload = host(group)
                host_s += time.process_time() - c0
                if on_device is not None:
                    t1, c1 = time.perf_counter(), time.process_time()
                    on_device(payload)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                        device_s += time.perf_counter() - t1
                    else:
                        device_s += time.process_time() - c1
            return host_s, device_s

        def pil_views(group: list[Path]) -> object:
            return [per_image(load_image(p, "RGB")) for p in group]

        # What MSNDataModule's workers do with augment_on=device: short side, centre square, uint8.
        square = T.Compose(
            [T.Resize(load_size, interpolation=resize), T.CenterCrop(load_size), T.PILToTensor()]
        )

        def pil_load(group: list[Path]) -> torch.Tensor:
            return torch.stack([square(load_image(p, "RGB")) for p in group])

        def read(group: list[Path]) -> list[EncodedImage]:
            return [EncodedImage(p.read_bytes(), str(p)) for p in group]

        paths_ = {
            "PIL workers (`augment_on=workers`)": (pil_views, None),
            "CPU decode + device views (`augment_on=device`)": (
                pil_load,
                lambda x: batched(x.to(device), generator),
            ),
            "device decode (`decode_on=device`)": (
                read,
                lambda x: batched(decode_batch(x, 3, load_size, device), generator),
            ),
            # The part of the row above that is decoding (and resizing to load_size).
            "  of which decode + resize": (read, lambda x: decode_batch(x, 3, load_size, device)),
        }
        cpu = platform.processor() or platform.machine()
        print(
            f"# {n} JPEGs of 500 x 375 ({mb / len(paths) * 1024:.0f} KB each), batch {batch}, load_size "
            f"{load_size}, views 2 x 224 + 10 x 96; device {device}; {cpu}; torch {torch.__version__}; "
            f"threads {torch.get_num_threads()}"
        )
        cols = [
            "path",
            "host CPU-s / image",
            "device s / image",
            "images/s per host core",
            "host cores per 1,000 images/s",
            "everything on this CPU: images per CPU-second",
        ]
        cols += (
            [f"host cores for {feed:,.0f} images/s", f"device share at {feed:,.0f} images/s"] if feed else []
        )
        print("| " + " | ".join(cols) + " |\n|---|" + "---:|" * (len(cols) - 1))
        for name, (host, on_device) in paths_.items():
            host_s, dev_s = timed(host, on_device)
            total = host_s + (dev_s if device.type == "cpu" else 0.0)
            per = (host_s / n, dev_s / n)
            cells = [f"{per[0]:.2g}", f"{per[1]:.2g}", f"{n / host_s:,.0f}", f"{1000 * per[0]:.2g}"]
            cells += [f"{n / total:,.1f}"]
            cells += [f"{feed * per[0]:.1f}", f"{100 * feed * per[1]:.0f} %"] if feed else []
            print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
