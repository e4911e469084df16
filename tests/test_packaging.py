"""conf/ must be found from an installed wheel, not only from a source checkout."""
from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_wheel_ships_conf_and_composes_from_a_fresh_venv(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("finetune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "finetune/conf/train.yaml" in names
    assert "finetune/conf/backbone/resnet50.yaml" in names
    assert "finetune/conf/experiment/two_stage.yaml" in names
    # every module of every subpackage, as in the source tree
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "finetune").rglob("*.py")}
    assert modules <= set(names), f"missing from the wheel: {sorted(modules - set(names))}"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    # --cfg job needs Hydra only; the wheel's heavy dependencies are not needed to compose
    subprocess.run([*pip, "hydra-core>=1.3.2,<1.4"], check=True, timeout=300)
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, timeout=300)
    result = subprocess.run([str(venv / "bin" / "finetune"), "train", "--cfg", "job", "backbone=resnet50"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "name: resnet50" in result.stdout


def test_every_package_and_conf_group_is_listed():
    import tomllib

    packages = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    conf = REPO / "conf"
    groups = {"finetune.conf." + ".".join(p.relative_to(conf).parts) for p in conf.rglob("*") if p.is_dir()}
    assert groups <= packages, f"add {groups - packages} to [tool.setuptools] packages"
    code = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "finetune").rglob("__init__.py")}
    code |= {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "hydra_plugins").rglob("__init__.py")}
    assert code <= packages, f"add {code - packages} to [tool.setuptools] packages"
