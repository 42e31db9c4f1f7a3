"""``msn-prepare``: its config, and bad input stopped before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from msn.checks import ConfigError
from msn.cli.prepare import prepare
from tests.helpers import composed

pytest.importorskip("litdata")


def test_the_config_needs_src_and_out_and_caches_the_file_list(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = composed("prepare", f"src={tmp_path}", f"out={tmp_path / 'out'}")
    assert cfg.num_workers is None and cfg.chunk_bytes == "64MB"
    assert cfg.list_cache == f"{tmp_path / 'cache'}/msn-lightning/file-lists"
    assert composed("prepare", "src=a", "out=b", "list_cache=null").list_cache is None


def test_bad_arguments_and_a_missing_source_stop_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="num_workers must be an integer >= 1, got 0"):
        prepare(composed("prepare", f"src={tmp_path}", f"out={tmp_path / 'out'}", "num_workers=0"))
    with pytest.raises(FileNotFoundError, match="is not an existing folder"):
        prepare(composed("prepare", f"src={tmp_path / 'nope'}", f"out={tmp_path / 'out'}"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images found"):
        prepare(composed("prepare", f"src={empty}", f"out={tmp_path / 'out'}"))
    assert not (tmp_path / "out").exists()
