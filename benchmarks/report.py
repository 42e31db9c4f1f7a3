"""The visual report: what it costs, and whether trained attention looks at the object.

    python benchmarks/report.py --run digits=outputs/digits/<run>/checkpoints/last.ckpt \\
        --run fashion_mnist=outputs/fmnist_cpu/<run>/checkpoints/last.ckpt

For every ``--run DATA=CKPT``:

1. ``finetune.py mode=report data=DATA ckpt=CKPT`` in a fresh process, once per embedding method
   (``tsne``, and ``umap`` when umap-learn is installed); prints the seconds per figure from
   ``report/report.json`` and the whole process's wall time. Fashion-MNIST's report is set against
   the 15-minute budget of ``experiment=fmnist_cpu``.
2. How much of the class token's patch attention (last block of the target encoder, mean over
   heads, 256 evaluation views) falls on the object, for the checkpoint and for the same
   architecture untrained: ``sum_p a_p f_p / mean_p f_p``, with ``f_p`` the share of object pixels
   (grey level above a quarter of the range) in patch ``p``, for the mean over heads and for each
   head. 1 is what uniform attention gives; above 1, attention concentrates on the object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from msn.cli.common import CONFIG_DIR  # noqa: E402
from msn.cli.evaluate import eval_datamodule  # noqa: E402
from msn.eval.features import untrained_copy  # noqa: E402
from msn.io import read_checkpoint  # noqa: E402
from msn.io.load import msn_module  # noqa: E402
from msn.report.attention import cls_attention  # noqa: E402

#: The time budget of experiment=fmnist_cpu (configs/experiment/fmnist_cpu.yaml), seconds.
FMNIST_BUDGET_S = 15 * 60
ATTENTION_IMAGES = 256


def report_cost(data: str, ckpt: str, method: str, out: Path) -> dict:
    start = time.perf_counter()
    cmd = [
        sys.executable,
        str(ROOT / "finetune.py"),
        "mode=report",
        f"data={data}",
        f"ckpt={ckpt}",
        f"report.embedding={method}",
        f"hydra.run.dir={out}",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    record = json.loads((out / "report" / "report.json").read_text())
    return {"wall": wall, **record["seconds"], "images": record["images"]}


def object_share(model, images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(heads + 1,): ``sum_p a_p f_p / mean_p f_p`` averaged over images, for the mean over heads
    and for every head."""
    attention = cls_attention(model.target_encoder, images)  # (B, heads, N)
    attention = torch.cat([attention.mean(dim=1, keepdim=True), attention], dim=1)
    attention = attention / attention.sum(dim=-1, keepdim=True)
    p = model.target_encoder.patch_embed.patch_size[0]
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    pixels = images.mean(dim=1, keepdim=True) * std + mean  # back to [0, 1]
    f = torch.nn.functional.adaptive_avg_pool2d((pixels > 0.25).float(), grid).flatten(1)[:, None]
    return ((attention * f).sum(dim=-1) / f.mean(dim=-1).clamp_min(1e-6)).mean(dim=0)


def attention_on_object(data: str, ckpt_path: str) -> tuple[str, torch.Tensor, torch.Tensor]:
    from hydra import compose, initialize_config_dir

    ckpt = read_checkpoint(ckpt_path)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("finetune", overrides=[f"data={data}", f"ckpt={ckpt_path}"])
    datamodule = eval_datamodule(cfg.data, ckpt)
    train_ds, _ = datamodule.eval_datasets()
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train_ds), generator=g)[:ATTENTION_IMAGES].tolist()
    images = torch.stack([train_ds[i][0] for i in idx])
    model = msn_module(ckpt, "cpu")
    random_init = untrained_copy(model, 0).eval()
    mean, std = datamodule.mean[0], datamodule.std[0]
    p = model.target_encoder.patch_embed.patch_size[0]
    grid = f"{images.shape[-2] // p}x{images.shape[-1] // p}"
    return grid, object_share(model, images, mean, std), object_share(random_init, images, mean, std)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", action="append", required=True, metavar="DATA=CKPT")
    args = parser.parse_args()
    methods = ["tsne"] + (["umap"] if importlib.util.find_spec("umap") else [])
    runs = []
    for spec in args.run:
        data, sep, ckpt = spec.partition("=")
        if not sep or not Path(ckpt).exists():
            parser.error(f"--run {spec!r}: expected DATA=CKPT with an existing checkpoint")
        runs.append((data, ckpt))

    print(
        "| data | embedding | images | attention | features | embedding map | prototypes | curves "
        "| report | process wall | share of 15 min |"
    )
    print("|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    with tempfile.TemporaryDirectory() as tmp:
        for data, ckpt in runs:
            for method in methods:
                c = report_cost(data, ckpt, method, Path(tmp) / f"{data}_{method}")
                share = f"{100 * c['total'] / FMNIST_BUDGET_S:.1f} %" if data == "fashion_mnist" else "-"
                print(
                    f"| {data} | {method} | {c['images']:,} | {c['attention']:.1f} s | {c['features']:.1f} s "
                    f"| {c['embedding']:.1f} s | {c['prototypes']:.1f} s | {c['curves']:.1f} s "
                    f"| {c['total']:.1f} s | {c['wall']:.1f} s | {share} |",
                    flush=True,
                )
    print()
    print("| data | patch grid | attention on the object, trained | random init | uniform |")
    print("|:--|:--|--:|--:|--:|")
    for data, ckpt in runs:
        grid, trained, random_init = attention_on_object(data, ckpt)
        print(f"| {data} | {grid} | {trained:.3f} | {random_init:.3f} | 1.000 |", flush=True)


if __name__ == "__main__":
    main()
