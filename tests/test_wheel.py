"""The package as users get it: the wheel built from this checkout, installed (not editable) in a fresh virtual
environment, carries its data files (configs, templates, py.typed, the demo's weights), and its command line and
demo models work from it (the demo itself runs in tests/test_digits_demo.py: the code is the same, the data is what
a wheel can lose)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_wheel_installs_with_its_data_and_the_demo_models_score(tmp_path: Path) -> None:
    # Built from a copy: setuptools writes build/ and *.egg-info/ beside the sources, never in the checkout.
    src = tmp_path / "src"
    skip = (
        ".git",
        ".ci-venv",
        ".venv",
        "venv",
        "build",
        "dist",
        "anysize-demo",
        "__pycache__",
        "*.egg-info",
        ".*_cache",
        ".hypothesis",
    )
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*skip))
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("timm_anysize-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    site = Path(
        _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip()
    )
    # The dependencies (torch, timm, ...) come from this environment, appended after the venv's own site-packages;
    # its .pth files (an editable install of this checkout) are not processed, so only the wheel provides the package.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        cwd=tmp_path,
    )
    where = _run(
        [str(py), "-c", "import timm_anysize, os; print(os.path.dirname(timm_anysize.__file__))"], cwd=tmp_path
    ).strip()
    assert Path(where) == site / "timm_anysize"
    for data in ("py.typed", "templates/modelcard.md", "configs/vit.yaml", "configs/anysize.schema.json"):
        assert (site / "timm_anysize" / data).is_file(), data
    # The metadata of a published package: an SPDX license with its text, the project's links, one version.
    (info,) = site.glob("timm_anysize-*.dist-info")
    meta = (info / "METADATA").read_text()
    assert "License-Expression: Apache-2.0\n" in meta and "License-File: LICENSE\n" in meta
    assert (info / "licenses" / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    links = {"Homepage", "Documentation", "Issues", "Changelog"}
    assert {
        line.split(": ", 1)[1].split(",")[0] for line in meta.splitlines() if line.startswith("Project-URL:")
    } == links
    (version,) = re.findall(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert f"Version: {version}\n" in meta
    code = "import timm_anysize; print(timm_anysize.__version__)"
    assert _run([str(py), "-c", code], cwd=tmp_path, env={"PYTHONPATH": ""}).strip() == version
    listed = _run([str(py), "-m", "timm_anysize", "list"], cwd=tmp_path, env={"PYTHONPATH": ""})
    assert "vit_tiny_patch4_64" in listed  # the shipped configs
    # Every demo model loads its weights from the wheel, and the digits base scores as the demo says.
    code = (
        "import timm; from timm_anysize.apps import demo; demo.register_demo_variants(); s = demo.load_digits_split(); "
        "[timm.create_model(r.variant, pretrained=True) for r in demo.DEMO_ROWS]; "
        "m = timm.create_model(demo.BASE_VARIANT, pretrained=True).eval(); "
        "print(demo.evaluate(m, demo.render(s.test_x, (32, 32), m), s.test_y))"
    )
    assert float(_run([str(py), "-c", code], cwd=tmp_path, env={"PYTHONPATH": ""}).strip()) >= 93.0
