"""The report page in a real headless browser: every image loads, and a missing one is reported
on the page. Needs Chromium (``apt-get install chromium``; .ci/run installs it)."""

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from msn.cli.evaluate import evaluate
from msn.report import PAGE, REPORT_DIR
from tests.helpers import composed, tiny_module

BROWSER = next(
    (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no Chromium on this machine: apt-get install chromium to run the browser test"
)


def _browser(tmp_path, *args: str) -> str:
    command = [
        BROWSER,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",  # let the load event and its script run
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _loaded(dom: str) -> tuple[int, int]:
    body = re.search(r"<body[^>]*>", dom).group(0)
    loaded = re.search(r'data-images-loaded="(\d+)"', body)
    total = re.search(r'data-images-total="(\d+)"', body)
    assert loaded and total, f"the page's image check did not run: {body}"
    return int(loaded.group(1)), int(total.group(1))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    model = tiny_module(num_prototypes=8)
    (run / "checkpoints").mkdir()
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "global_step": 3},
        run / "checkpoints" / "last.ckpt",
    )
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text("step,train/loss\n1,5.0\n2,4.5\n3,4.2\n")
    out = run / "eval"
    overrides = ["mode=report", "report.attention_images=4", "report.max_images=60", "report.embedding=tsne"]
    evaluate(
        composed("finetune", f"output_dir={out}", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", *overrides)
    )
    return out / REPORT_DIR


def test_every_image_of_the_page_loads_and_the_screenshot_shows_them(report, tmp_path):
    url = (report / PAGE).as_uri()
    loaded, total = _loaded(_browser(tmp_path, "--dump-dom", url))
    assert loaded == total == 4  # attention, embedding, prototypes, curves (no lowshot.json here)
    shot = tmp_path / "page.png"
    _browser(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars", url)
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    # A page of figures, not a blank or an error page: many distinct grey levels, dark and light.
    assert pixels.std() > 20 and len(np.unique(pixels)) > 100


def test_a_missing_image_is_reported_on_the_page(report, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(report, copy)
    (copy / "embedding.png").unlink()
    dom = _browser(tmp_path, "--dump-dom", (copy / PAGE).as_uri())
    assert _loaded(dom) == (3, 4)
    assert "1 of 4 images did not load: embedding.png" in dom
