"""What `pip install` of hostfw produces: the version from git, the console
scripts where the unit's ExecStart looks, the unit and samples as data files.

The wheel is built from a clone of the committed HEAD (a clean clone, as an
operator's), offline: no build isolation, so the venv's setuptools-scm builds
it. The clone gets a tag of its own, so the expected version is known exactly.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agent import FALLBACK_VERSION
from tests.support.agent import ROOT

TAG = "7.8.9"
PREFIX = "/opt/hostfw"  # the unit's and doc/operations.md's install
ENV = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}

pytestmark = pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")


def pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def build(source: Path, out: Path) -> Path:
    pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source))
    (wheel,) = out.glob("hostfw_agent-*.whl")
    return wheel


@pytest.fixture(scope="module")
def tagged_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("packaging")
    subprocess.run(["git", "clone", "-q", str(ROOT), str(work / "src")], check=True,
                   timeout=120)
    subprocess.run(["git", "-C", str(work / "src"), "tag", TAG], check=True, timeout=30)
    return build(work / "src", work / "dist")


def test_the_version_is_the_git_tag(tagged_wheel: Path) -> None:
    assert tagged_wheel.name == f"hostfw_agent-{TAG}-py3-none-any.whl"


def test_without_git_metadata_the_fallback_version_is_built(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], check=True,
                             capture_output=True, timeout=120).stdout
    subprocess.run(["tar", "-x", "-C", str(bare)], input=archive, check=True, timeout=120)
    wheel = build(bare, tmp_path / "dist")
    assert wheel.name == f"hostfw_agent-{FALLBACK_VERSION}-py3-none-any.whl"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'fallback_version = "{FALLBACK_VERSION}"' in pyproject


def test_the_wheel_carries_the_scripts_license_unit_and_samples(tagged_wheel: Path) -> None:
    with zipfile.ZipFile(tagged_wheel) as whl:
        names = set(whl.namelist())
        entry_points = whl.read(f"hostfw_agent-{TAG}.dist-info/entry_points.txt").decode()
        metadata = whl.read(f"hostfw_agent-{TAG}.dist-info/METADATA").decode()
    scripts = configparser.ConfigParser()
    scripts.read_string(entry_points)
    assert set(scripts["console_scripts"]) >= {"hostfw-agent", "agent-ctl", "hostfw-controller"}
    data = f"hostfw_agent-{TAG}.data/data/"
    assert {data + "share/hostfw-agent/systemd/hostfw-agent.service",
            data + "share/hostfw-agent/etc/hostfw/agent.conf.sample",
            data + "share/hostfw-agent/etc/hostfw/agent.conf.example",
            data + "share/hostfw-agent/etc/hostfw/policy.example.yaml",
            data + "share/doc/hostfw-agent/operations.md"} <= names
    assert any(re.search(r"dist-info/(licenses/)?LICENSE$", name) for name in names)
    assert re.search(r"^License(-Expression)?: Apache-2\.0$", metadata, re.MULTILINE)
    for lib, cap in (("oslo.config", "10.8"), ("oslo.log", "8.4"), ("oslo.messaging", "18.4")):
        assert re.search(rf"^Requires-Dist: {re.escape(lib)}.*<{re.escape(cap)}\b",
                         metadata, re.MULTILINE), f"{lib} is not capped"


def test_an_install_puts_exec_start_where_the_unit_says(tagged_wheel: Path,
                                                        tmp_path: Path) -> None:
    """Installed into a venv standing in for /opt/hostfw: every path the unit names
    under the prefix exists there, the installed unit is the repository's, and the
    installed script prints the tag as its version.

    The venv borrows the test venv's dependencies through a .pth line, so nothing
    is downloaded; pip's --python aims it at the new venv, never at this one.
    """
    prefix = tmp_path / PREFIX.lstrip("/")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True,
                   timeout=120)
    (site,) = prefix.glob("lib/python3*/site-packages")
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "hostfw_test_deps.pth").write_text(deps + "\n")
    pip("--python", str(prefix / "bin/python"), "install", "--no-deps", "--no-index", "-q",
        str(tagged_wheel))
    unit = prefix / "share/hostfw-agent/systemd/hostfw-agent.service"
    assert unit.read_text() == (ROOT / "systemd/hostfw-agent.service").read_text()
    named = re.findall(rf"{re.escape(PREFIX)}/(\S+)", unit.read_text())
    assert "bin/hostfw-agent" in named
    for path in named:
        assert (prefix / path).exists(), f"the unit names {PREFIX}/{path}: not installed"
    proc = subprocess.run([str(prefix / "bin/hostfw-agent"), "--version"], capture_output=True,
                          text=True, timeout=60, env=ENV, cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (0, f"hostfw-agent {TAG}\n"), proc.stderr
