"""``index.html`` of a report: one static page (no server, no network) that shows every figure
with its caption, the low-shot table and the run's config, so it opens from a cluster's file
system in any browser."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Figure:
    """One figure of the page: its file (next to ``index.html``), heading and caption."""

    file: str
    heading: str
    caption: str


# Counts the images that loaded, so a page copied without its PNGs says so, and a headless browser
# can read the count from the DOM (``data-images-loaded`` / ``data-images-total`` on <body>).
_IMAGE_CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.dataset.imagesLoaded = ok.length;
  document.body.dataset.imagesTotal = imgs.length;
  var status = document.getElementById("image-status");
  if (ok.length < imgs.length) {
    var missing = imgs.filter(function (i) { return ok.indexOf(i) < 0; })
      .map(function (i) { return i.getAttribute("src"); });
    status.textContent = (imgs.length - ok.length) + " of " + imgs.length +
      " images did not load: " + missing.join(", ");
    status.className = "warn";
  }
});
</script>"""

_STYLE = """<style>
body { font-family: sans-serif; max-width: 1400px; margin: 1em auto; padding: 0 1em; color: #222; }
img { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.warn { color: #a00; font-weight: bold; }
figcaption { font-size: 0.9em; color: #444; margin: 0.3em 0 1.5em; }
</style>"""


def lowshot_html(lowshot: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """``lowshot.json`` (``{row: {column: {"mean", "std", ...}}}``) as an HTML table; k-shot columns
    (keys ``"1"``, ``"2"``, ...) are headed ``k=1``, ``k=2``."""
    columns = list(dict.fromkeys(c for row in lowshot.values() for c in row))
    head = "".join(f"<th>{html.escape(f'k={c}' if c.isdigit() else c)}</th>" for c in columns)
    rows = []
    for name, row in lowshot.items():
        cells = "".join(
            f"<td>{row[c]['mean']:.1f} ± {row[c]['std']:.1f}</td>" if c in row else "<td>-</td>"
            for c in columns
        )
        rows.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    return f"<table><tr><th>features</th>{head}</tr>{''.join(rows)}</table>"


def write_page(
    path: Path,
    *,
    title: str,
    facts: Sequence[tuple[str, str]],
    figures: Sequence[Figure],
    skipped: Sequence[str],
    lowshot: Mapping[str, Any] | None,
    lowshot_note: str,
    config: str | None,
) -> Path:
    """Write the page: ``facts`` (label, value) under the title, the low-shot table (or
    ``lowshot_note`` without one), every figure, what was left out and why, and the config."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        _STYLE,
        "</head><body>",
        f"<h1>{e(title)}</h1>",
        '<p id="image-status"></p>',
        "<table>" + "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in facts) + "</table>",
        "<h2>Low-shot accuracy (%)</h2>",
        lowshot_html(lowshot) if lowshot else f"<p>{e(lowshot_note)}</p>",
    ]
    for fig in figures:
        parts += [
            f'<h2 id="{e(Path(fig.file).stem)}">{e(fig.heading)}</h2>',
            f'<figure><img src="{e(fig.file)}" alt="{e(fig.heading)}">',
            f"<figcaption>{e(fig.caption)}</figcaption></figure>",
        ]
    if skipped:
        parts.append(
            "<h2>Not in this report</h2><ul>" + "".join(f"<li>{e(s)}</li>" for s in skipped) + "</ul>"
        )
    parts += [
        "<h2>Config</h2>",
        f"<pre>{e(config) if config else 'not recorded next to the checkpoint'}</pre>",
    ]
    parts += [_IMAGE_CHECK, "</body></html>"]
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
