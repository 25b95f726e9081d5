"""timm's own model test suite, run on timm-anysize variants: a variant is a timm model by timm's definition.

The test takes ``tests/test_models.py`` from the sdist of the *installed* timm (``pip download --no-binary``,
cached in ``~/.cache/timm-anysize/``; timm's test code is never copied into this repository), puts
tests/conformance/timm_conftest.py beside it (as its conftest.py) and runs it with pytest in a subprocess, with the conformance variants of
tests/conformance/variants.yaml registered through ``$TIMM_ANYSIZE_CONFIGS``. The conftest gives each variant
exactly the tests timm runs for the variant's base architecture. Every cell must pass.

``python tests/test_timm_conformance.py`` regenerates docs/conformance.md (``--no-bases``: without the plain-timm
run; ``--from-reports VARIANTS.json [BASES.json]``: from saved reports) (the variants' counts per family and per
test, next to plain timm's own base models run through the same file).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional

import pytest
import timm

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "conformance"
VARIANTS_YAML = HERE / "variants.yaml"
DOC = ROOT / "docs" / "conformance.md"
CACHE_ENV = "TIMM_ANYSIZE_CACHE"
_PYTEST_INI = """[pytest]
addopts = -p no:cacheprovider
filterwarnings =
    ignore::pytest.PytestUnknownMarkWarning
"""


def cache_dir() -> Path:
    """Where the sdist's tests are kept: ``$TIMM_ANYSIZE_CACHE``, else ``~/.cache/timm-anysize``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "timm-anysize")


def timm_test_models(version: str = timm.__version__) -> Path:
    """timm's ``tests/test_models.py`` from the sdist of timm ``version``, downloaded once with pip and cached."""
    target = cache_dir() / f"timm-{version}-tests" / "test_models.py"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "--dest", tmp, f"timm=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("timm-*.tar.gz"))
        if done.returncode or not sdists:
            raise RuntimeError(f"cannot fetch the timm {version} sdist for its tests ({' '.join(cmd)}):\n"
                               f"{done.stderr[-2000:]}")
        with tarfile.open(sdists[0]) as tar:
            member = tar.getmember(f"timm-{version}/tests/test_models.py")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)  # atomic: a concurrent run never reads half a file
    return target


def run_conformance(workdir: Path, models: str = "variants", only: tuple[str, ...] = (),
                    extra_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run timm's test_models.py on the variants (``models='variants'``) or on their plain-timm bases
    (``'bases'``) in a subprocess; returns the conftest's report (one entry per cell)."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(timm_test_models(), workdir / "test_models.py")
    shutil.copyfile(HERE / "timm_conftest.py", workdir / "conftest.py")  # a plugin for timm's file only
    (workdir / "pytest.ini").write_text(_PYTEST_INI)
    report = workdir / "report.json"
    configs = os.pathsep.join(filter(None, [os.environ.get("TIMM_ANYSIZE_CONFIGS"), str(VARIANTS_YAML)]))
    env = dict(os.environ, TIMM_ANYSIZE_CONFIGS=configs, TIMM_ANYSIZE_CONFORMANCE_MODELS=models,
               TIMM_ANYSIZE_CONFORMANCE_ONLY=",".join(only), TIMM_ANYSIZE_CONFORMANCE_REPORT=str(report),
               HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "pytest", "-q", "-rN", "--tb=line", "test_models.py", *extra_args]
    log = workdir / "pytest.log"  # streamed, so a long run can be followed with tail -f
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=workdir, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if not report.exists():
        raise RuntimeError(f"timm's test_models.py did not run (exit {code}):\n{log.read_text()[-4000:]}")
    return json.loads(report.read_text())


def counts(cells: list[dict[str, Any]], key: str) -> dict[str, tuple[int, int, int]]:
    """(passed, run, skipped) per ``key`` ('family' or 'test'); a skip is timm's own (e.g. a size over its limit)."""
    out: dict[str, Counter] = defaultdict(Counter)
    for c in cells:
        out[c[key]][c["outcome"]] += 1
    return {k: (v["passed"], v["passed"] + v["failed"], v["skipped"]) for k, v in sorted(out.items())}


def failures(cells: list[dict[str, Any]]) -> list[str]:
    """``test[model]: message`` of every failed cell."""
    return [f"{c['test']}[{c['model']}]: {c['message']}" for c in cells if c["outcome"] == "failed"]


def _cell(passed: int, run: int, skipped: int) -> str:
    if run == skipped == -1:
        return "not run"
    return f"{passed} / {run}" + (f" ({skipped} skipped)" if skipped else "")


def conformance_markdown(variants: dict[str, Any], bases: Optional[dict[str, Any]],
                         seconds: Optional[float] = None) -> str:
    """docs/conformance.md from the two reports (``bases`` None: the plain-timm run was not made)."""
    v_cells, b_cells = variants["cells"], (bases or {"cells": []})["cells"]
    fam_v, fam_b = counts(v_cells, "family"), counts(b_cells, "family")
    test_v, test_b = counts(v_cells, "test"), counts(b_cells, "test")
    missing = (0, 0, 0) if bases else (0, -1, -1)
    n_variants = len({c["model"].split(".")[0] for c in v_cells})
    base_names = sorted({c["arch"] for c in b_cells})
    lines = [
        "# timm's own model tests on timm-anysize variants",
        "",
        "<!-- generated by `python tests/test_timm_conformance.py`; do not edit by hand -->",
        "",
        f"timm {variants['timm']}'s `tests/test_models.py` (from the sdist of the installed timm) run on {n_variants} "
        "registered variants: the shipped configs and tests/conformance/variants.yaml (every family at a non-square "
        "1-channel size and at a 4-channel size that timm's tests clamp to sizes that are not a multiple of the "
        "patch, on bases shrunk through `model_args`). Each variant gets exactly the tests timm runs for its base "
        "architecture (timm's own filter lists, applied to the base's name); tests over hand-picked named models and "
        "the two that download pretrained weights are left out. Cells: passed / run; skips are timm's own "
        "(e.g. an input size over a test's limit). The *plain timm* column runs the variants' base architectures "
        f"({', '.join(f'`{b}`' for b in base_names)}) through the same file, unshrunk.",
        "",
        "`tests/test_timm_conformance.py` runs the variants' part (every variant) in the suite and asserts every "
        "cell passes.",
        "Regenerate this page with `python tests/test_timm_conformance.py` (it also runs the plain-timm bases, "
        "which takes longer).",
        "",
        "## Per family",
        "",
        "| family | variants | plain timm |",
        "|---|---|---|",
    ]
    for fam in sorted(set(fam_v) | set(fam_b)):
        lines.append(f"| {fam} | {_cell(*fam_v.get(fam, (0, 0, 0)))} | {_cell(*fam_b.get(fam, missing))} |")
    total_v = tuple(sum(x) for x in zip(*fam_v.values())) if fam_v else (0, 0, 0)
    total_b = tuple(sum(x) for x in zip(*fam_b.values())) if fam_b else missing
    lines += [f"| **all** | {_cell(*total_v)} | {_cell(*total_b)} |", "", "## Per test", "",
              "| timm test | variants | plain timm |", "|---|---|---|"]
    for test in sorted(set(test_v) | set(test_b)):
        lines.append(f"| `{test}` | {_cell(*test_v.get(test, (0, 0, 0)))} | {_cell(*test_b.get(test, missing))} |")
    failed = failures(v_cells)
    lines += ["", "## Failing variant cells", ""]
    lines += [f"- `{f.split(':', 1)[0]}`: {f.split(':', 1)[1].strip()}" for f in failed] or ["None."]
    if seconds is not None:
        lines += ["", f"The variants' run took {seconds:.0f} s on this machine."]
    return "\n".join(lines) + "\n"


QUICK_ENV = "TIMM_ANYSIZE_CONFORMANCE_QUICK"


def quick_variants() -> tuple[str, ...]:
    """A quicker selection for local runs (``$TIMM_ANYSIZE_CONFORMANCE_QUICK=1``): the non-square 1-channel
    conformance variant of every family. The suite runs every registered variant by default (about 6 minutes on
    2 idle cores)."""
    import yaml

    names = yaml.safe_load(VARIANTS_YAML.read_text())["variants"]
    return tuple(n for n in names if n.endswith("_gray"))


def test_timm_test_models_passes_on_every_variant(tmp_path):
    try:
        timm_test_models()
    except RuntimeError as e:  # no index reachable: say so rather than pass silently
        pytest.skip(str(e).splitlines()[0])
    report = run_conformance(tmp_path, only=quick_variants() if os.environ.get(QUICK_ENV) else ())
    cells = report["cells"]
    families = {c["family"] for c in cells}
    from timm_anysize.families import FAMILIES

    assert families >= {f.name for f in FAMILIES}, f"families without a conformance cell: {families}"
    failed = failures(cells)
    assert not failed, f"{len(failed)} of {len(cells)} cells fail:\n" + "\n".join(failed)


def main(argv: Optional[list[str]] = None) -> None:
    """``python tests/test_timm_conformance.py [--no-bases]``: run everything and write docs/conformance.md."""
    import time

    argv = sys.argv[1:] if argv is None else argv
    if "--from-reports" in argv:  # render saved report.json files: VARIANTS [BASES]
        paths = argv[argv.index("--from-reports") + 1:]
        reports = [json.loads(Path(p).read_text()) for p in paths]
        DOC.write_text(conformance_markdown(reports[0], reports[1] if len(reports) > 1 else None))
        return
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        variants = run_conformance(Path(tmp) / "variants")
        seconds = time.time() - start
        bases = None if "--no-bases" in argv else run_conformance(Path(tmp) / "bases", models="bases")
    DOC.write_text(conformance_markdown(variants, bases, seconds))
    print(f"wrote {DOC} ({len(variants['cells'])} variant cells, {len(bases['cells'])} plain-timm cells)")


if __name__ == "__main__":
    main()
