"""The installed package: its public names, and what the wheel ships."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import zpipe

ROOT = Path(__file__).resolve().parents[1]


def test_public_names_import_from_zpipe() -> None:
    from zpipe.client import Client
    from zpipe.config import load

    assert zpipe.Client is Client
    assert zpipe.load_config is load
    for name in zpipe.__all__:
        assert getattr(zpipe, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        zpipe.Nope  # noqa: B018


def test_wheel_holds_the_library_and_no_benchmarks(tmp_path: Path) -> None:
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for d in ("zpipe", "brokers", "nodes", "bench", "scripts", "tests"):
        shutil.copytree(ROOT / d, src / d, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(src)],
                   check=True, timeout=300, cwd=tmp_path)
    (wheel,) = tmp_path.glob("zpipe-*.whl")
    tops = {name.split("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {"zpipe", "brokers", "nodes"} <= tops
    assert not {"bench", "scripts", "tests"} & tops
    assert "zpipe/serve/dashboard.html" in zipfile.ZipFile(wheel).namelist()  # package data
    assert not [n for n in zipfile.ZipFile(wheel).namelist() if "bench" in n.rsplit("/", 1)[-1]]
