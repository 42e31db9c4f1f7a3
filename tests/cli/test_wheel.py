"""``pip install .`` as a user gets it: the wheel built from the checkout, installed into a fresh
venv that sees this environment's dependencies but not the checkout, runs its console scripts
from an empty folder with the configs it ships."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import FAST

ROOT = Path(__file__).resolve().parents[2]
# What the build reads; copied out so that build/ and *.egg-info never land in the checkout.
BUILD_INPUTS = ("pyproject.toml", "README.md", "msn", "configs")


def _pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        from setuptools.config.pyprojecttoml import load_file

        return load_file(ROOT / "pyproject.toml")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _folders_holding(root: Path, pattern: str) -> list[Path]:
    """``root`` and its subfolders that hold a ``pattern`` file (caches left out)."""
    return sorted({p.parent for p in root.rglob(pattern) if "__pycache__" not in p.relative_to(root).parts})


def _checkout_modules() -> list[str]:
    """The dotted name of every module of the checkout's msn/."""
    names = []
    for path in sorted((ROOT / "msn").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if "__pycache__" in parts:
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_packages_list_names_every_folder_of_modules_and_configs() -> None:
    # An explicit list misses a new folder silently: its modules or configs would be left out of the wheel.
    declared = set(_pyproject()["tool"]["setuptools"]["packages"])
    code = {".".join(p.relative_to(ROOT).parts) for p in _folders_holding(ROOT / "msn", "*.py")}
    configs = {
        ".".join(("msn", "configs", *p.relative_to(ROOT / "configs").parts))
        for p in _folders_holding(ROOT / "configs", "*.yaml")
    }
    assert declared == code | configs, "update [tool.setuptools] packages in pyproject.toml"


@dataclass(frozen=True)
class Installed:
    venv: Path
    site_packages: Path
    wheel: Path
    env: dict[str, str]

    def run(self, args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def script(self, name: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.run([str(self.venv / "bin" / name), *args], cwd=cwd, timeout=timeout)


def _check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """The stdout of ``args``, which must succeed."""
    return _check(subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)).stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_ROOT_USER_ACTION="ignore")
    pip = [sys.executable, "-m", "pip"]
    build = ["wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp)]
    _run([*pip, *build], cwd=tmp, env=env)
    (wheel,) = tmp.glob("msn_lightning-*.whl")

    # No pip of its own (faster, and works where ensurepip is missing): this pip installs into it.
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
    python = str(venv / "bin" / "python")
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = Path(_run([python, "-c", purelib], cwd=tmp, env=env).strip())
    # The dependencies: this environment's site folders, appended to sys.path. The .pth files in
    # them are not run, so the editable finder that maps msn to the checkout stays inactive.
    paths = sysconfig.get_paths()
    user = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
    deps = list(dict.fromkeys([*site.getsitepackages(), *user, paths["purelib"], paths["platlib"]]))
    (site_packages / "_msn_test_deps.pth").write_text("".join(f"{d}\n" for d in deps if Path(d).is_dir()))
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=tmp, env=env)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return Installed(venv=venv, site_packages=site_packages, wheel=wheel, env=env)


@pytest.mark.slow
def test_wheel_holds_every_module_and_config(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "msn").rglob("*.py") if "__pycache__" not in p.parts}
    configs = {f"msn/configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert modules and configs
    assert modules - names == set()
    assert configs - names == set()


@pytest.mark.slow
def test_every_module_imports_from_the_installed_wheel(installed: Installed, tmp_path: Path) -> None:
    code = (
        "import importlib, json, sys\n"
        "files = {m: importlib.import_module(m).__file__ for m in sys.argv[1:]}\n"
        "from msn.cli.common import CONFIG_DIR\n"
        "print(json.dumps({'files': files, 'configs': str(CONFIG_DIR)}))\n"
    )
    modules = _checkout_modules()
    assert "msn" in modules and "msn.cli.train" in modules
    proc = _check(installed.run([str(installed.venv / "bin" / "python"), "-c", code, *modules], cwd=tmp_path))
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    site_packages = installed.site_packages.resolve()
    outside = {m: f for m, f in found["files"].items() if not Path(f).resolve().is_relative_to(site_packages)}
    assert outside == {}, f"modules not from the installed wheel in {site_packages}"
    assert Path(found["configs"]).resolve() == site_packages / "msn" / "configs"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["msn-train", "msn-finetune", "msn-export", "msn-extract", "msn-prepare"])
def test_console_script_prints_its_composed_config(installed: Installed, tmp_path: Path, script: str) -> None:
    # One at a time: each is CPU-bound importing torch and Lightning; side by side they are slower.
    out = _check(installed.script(script, "--cfg", "job", cwd=tmp_path)).stdout
    assert out.strip(), f"{script} printed no config"
    if script == "msn-train":
        assert "\ndata:\n" in f"\n{out}" and "\n  name: digits\n" in out
        assert "\nmodel:\n" in out and "\ntrainer:\n" in out
    assert list(tmp_path.iterdir()) == []  # --cfg job runs nothing and writes nothing


@pytest.mark.slow
def test_msn_train_two_steps_writes_outputs_under_cwd(installed: Installed, tmp_path: Path) -> None:
    proc = _check(installed.script("msn-train", *FAST, cwd=tmp_path, timeout=600))
    assert "MSN target encoder" in proc.stdout and "raw pixels" in proc.stdout
    (table,) = (tmp_path / "outputs").rglob("lowshot.json")
    assert set(json.loads(table.read_text())) == {"MSN target encoder", "random init", "raw pixels"}
    assert list((tmp_path / "outputs").rglob("last.ckpt"))


def test_missing_config_folder_ends_with_where_it_looked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from msn.cli import common

    monkeypatch.setattr(common, "CONFIG_DIR", tmp_path / "configs")
    monkeypatch.setattr(common, "_config_dirs", lambda: (tmp_path / "msn" / "configs", tmp_path / "configs"))
    with pytest.raises(SystemExit) as exit_:
        common.hydra_entry("train", lambda cfg: None)
    message = str(exit_.value.code)
    assert message.startswith("error: no config folder") and "pip install ." in message
    assert str(tmp_path / "msn" / "configs") in message and str(tmp_path / "configs") in message
