"""timm's own model test suite, run on timm-anysize variants: a variant is a timm model by timm's definition.

The test takes ``tests/test_models.py`` from the sdist of the *installed* timm (``pip download --no-binary``,
cached in ``~/.cache/timm-anysize/``; timm's test code is never copied into this repository), puts
tests/conformance/timm_conftest.py beside it (as its conftest.py) and runs it with pytest in a subprocess, with the
conformance variants registered through ``$TIMM_ANYSIZE_CONFIGS``: :func:`conformance_specs` derives them from the
family rows (each family's tiny model at its ``Family.tiny.conformance`` changes) and writes them to a YAML file in
the run's folder; extra variants can be added with your own ``$TIMM_ANYSIZE_CONFIGS``. The conftest gives each
variant exactly the tests timm runs for the variant's base architecture. Every cell must pass.
In the suite, the other registered variants (the shipped configs: full-size ViT-S, DeiT, EVA, ResNet, ... at their
own sizes) get timm's pretrained-cfg tests only: their architectures' forward, backward, feature, FX, TorchScript
and pruning tests run on the families' tiny variants, and on them cost a fifth of the suite's time;
``$TIMM_ANYSIZE_CONFORMANCE_FULL=1`` runs every test on them too (as ``python tests/test_timm_conformance.py`` does).
``$TIMM_ANYSIZE_CONFORMANCE_QUICK=1``: the 1-channel variant of each family only;
``$TIMM_ANYSIZE_CONFORMANCE_FAMILIES=swin,vit``: only those families' variants.

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
import yaml

from timm_anysize.families import FAMILIES
from timm_anysize.registry import register_shipped_configs

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "conformance"
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
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--quiet",
            "--dest",
            tmp,
            f"timm=={version}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("timm-*.tar.gz"))
        if done.returncode or not sdists:
            raise RuntimeError(
                f"cannot fetch the timm {version} sdist for its tests ({' '.join(cmd)}):\n{done.stderr[-2000:]}"
            )
        with tarfile.open(sdists[0]) as tar:
            member = tar.getmember(f"timm-{version}/tests/test_models.py")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.partial")  # one per process: concurrent runs never share it
    partial.write_bytes(data)
    partial.replace(target)  # atomic: a concurrent run never reads half a file
    return target


def conformance_name(family: str, change: dict[str, Any]) -> str:
    """``cf_<family>_[patch<p>_]<size>_<gray|<n>ch>``: the name of a family's conformance variant."""
    size = change["img_size"]
    size = f"{size[0]}x{size[1]}" if isinstance(size, (list, tuple)) else str(size)
    patch = f"patch{change['patch_size']}_" if "patch_size" in change else ""
    chans = "gray" if change.get("in_chans") == 1 else f"{change.get('in_chans', 3)}ch"
    return f"cf_{family}_{patch}{size}_{chans}"


def conformance_specs() -> dict[str, dict[str, Any]]:
    """The conformance variants, name -> spec, from the family rows: each family's tiny model (``Family.tiny``:
    ``model_args`` shrink the example so each of timm's tests is cheap, or ``base`` names a smaller entrypoint of its
    class from tests/anysize_tiny_models.py, which the run registers; pretrained=False, no weights are read) at
    each of its ``tiny.conformance`` changes (a non-square 1-channel size, and a 4-channel one whose size timm's
    tests clamp to 128 and 96 px: sizes that are not a multiple of the patch or stride, padded / uneven stages)."""
    out: dict[str, dict[str, Any]] = {}
    for fam in FAMILIES:
        for change in fam.tiny.conformance:
            spec = {
                "base": fam.tiny.base or fam.example,  # a smaller entrypoint of the example's class where it has one
                **({"model_args": fam.tiny.model_args} if fam.tiny.model_args else {}),
                **change,
            }
            name = conformance_name(fam.name, change)
            if name in out:
                raise ValueError(f"two conformance variants of {fam.name} are both named {name}: change a size")
            out[name] = json.loads(json.dumps(spec))  # tuples as lists, for YAML
    return out


def run_conformance(
    workdir: Path,
    models: str = "variants",
    only: tuple[str, ...] = (),
    extra_args: tuple[str, ...] = (),
    chunk: tuple[int, int] = (0, 1),
    cfgs_only: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run timm's test_models.py on the variants (``models='variants'``) or on their plain-timm bases
    (``'bases'``) in a subprocess; returns the conftest's report (one entry per cell). ``chunk=(i, n)``: every n-th
    variant only, from the i-th (in name order); ``cfgs_only``: variants that get timm's pretrained-cfg tests only."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(timm_test_models(), workdir / "test_models.py")
    shutil.copyfile(HERE / "timm_conftest.py", workdir / "conftest.py")  # a plugin for timm's file only
    shutil.copyfile(HERE.parent / "anysize_tiny_models.py", workdir / "anysize_tiny_models.py")  # TinyModel.base
    (workdir / "pytest.ini").write_text(_PYTEST_INI)
    report = workdir / "report.json"
    variants_yaml = workdir / "variants.yaml"  # generated from the family rows, kept with the run for reading
    variants_yaml.write_text(yaml.safe_dump({"variants": conformance_specs()}, sort_keys=False))
    configs = os.pathsep.join(filter(None, [os.environ.get("TIMM_ANYSIZE_CONFIGS"), str(variants_yaml)]))
    env = dict(
        os.environ,
        TIMM_ANYSIZE_CONFIGS=configs,
        TIMM_ANYSIZE_CONFORMANCE_MODELS=models,
        TIMM_ANYSIZE_CONFORMANCE_ONLY=",".join(only),
        TIMM_ANYSIZE_CONFORMANCE_REPORT=str(report),
        TIMM_ANYSIZE_CONFORMANCE_CHUNK="{}/{}".format(*chunk),
        TIMM_ANYSIZE_CONFORMANCE_CFGS_ONLY=",".join(cfgs_only),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    # Shuffled by pytest-randomly, as the suite is (the conftest plans every variant first, so no cell depends on
    # which ran before it); the seed is in the log.
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


def conformance_markdown(
    variants: dict[str, Any], bases: Optional[dict[str, Any]], seconds: Optional[float] = None
) -> str:
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
        "registered variants: the shipped configs and the conformance variants of the family rows (every family's tiny "
        "model, `Family.tiny`, at a non-square "
        "1-channel size and at a 4-channel size that timm's tests clamp to sizes that are not a multiple of the "
        "patch, on bases shrunk through `model_args` or, where timm's entrypoint fixes the sizes, a smaller "
        "entrypoint of the same class from `tests/anysize_tiny_models.py`). Each variant gets exactly the tests timm "
        "runs for its base architecture (timm's own filter lists, applied to the base's name); tests over hand-picked "
        "named models and "
        "the two that download pretrained weights are left out. Cells: passed / run; skips are timm's own "
        "(e.g. an input size over a test's limit). The *plain timm* column runs the variants' base architectures "
        f"({', '.join(f'`{b}`' for b in base_names)}) through the same file, unshrunk.",
        "",
        "`tests/test_timm_conformance.py` runs the variants' part in the suite and asserts every cell passes: every "
        "test on the conformance variants, timm's pretrained-cfg tests on the full-size shipped ones "
        "(`$TIMM_ANYSIZE_CONFORMANCE_FULL=1`: every test on those too).",
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
    lines += [
        f"| **all** | {_cell(*total_v)} | {_cell(*total_b)} |",
        "",
        "## Per test",
        "",
        "| timm test | variants | plain timm |",
        "|---|---|---|",
    ]
    for test in sorted(set(test_v) | set(test_b)):
        lines.append(f"| `{test}` | {_cell(*test_v.get(test, (0, 0, 0)))} | {_cell(*test_b.get(test, missing))} |")
    failed = failures(v_cells)
    lines += ["", "## Failing variant cells", ""]
    lines += [f"- `{f.split(':', 1)[0]}`: {f.split(':', 1)[1].strip()}" for f in failed] or ["None."]
    if seconds is not None:
        lines += ["", f"The variants' run took {seconds:.0f} s on this machine."]
    return "\n".join(lines) + "\n"


QUICK_ENV = "TIMM_ANYSIZE_CONFORMANCE_QUICK"
FULL_ENV = "TIMM_ANYSIZE_CONFORMANCE_FULL"
FAMILIES_ENV = "TIMM_ANYSIZE_CONFORMANCE_FAMILIES"


def quick_variants() -> tuple[str, ...]:
    """A quicker selection for local runs (``$TIMM_ANYSIZE_CONFORMANCE_QUICK=1``): the non-square 1-channel
    conformance variant of every family. The suite runs every registered variant by default (about 2 minutes on
    2 idle cores)."""
    return tuple(n for n in conformance_specs() if n.endswith("_gray"))


def selected_families() -> list[str]:
    """``$TIMM_ANYSIZE_CONFORMANCE_FAMILIES`` (comma-separated family names): run only their conformance variants;
    unset: every family (and every other registered variant)."""
    names = [n for n in os.environ.get(FAMILIES_ENV, "").split(",") if n]
    unknown = sorted(set(names) - {f.name for f in FAMILIES})
    if unknown:
        known = ", ".join(f.name for f in FAMILIES)
        raise ValueError(f"${FAMILIES_ENV}: no family {', '.join(unknown)}; known: {known}")
    return names


def selected_variants() -> tuple[str, ...]:
    """The variants this run is restricted to (``()``: every registered variant): ``$TIMM_ANYSIZE_CONFORMANCE_QUICK``
    and ``$TIMM_ANYSIZE_CONFORMANCE_FAMILIES`` combined."""
    only = quick_variants() if os.environ.get(QUICK_ENV) else ()
    families = selected_families()
    if not families:
        return only
    theirs = {conformance_name(f.name, c) for f in FAMILIES if f.name in families for c in f.tiny.conformance}
    return tuple(n for n in (only or conformance_specs()) if n in theirs)


def cfgs_only_variants() -> tuple[str, ...]:
    """The variants the run registers besides the conformance variants (the shipped configs, and any of
    ``$TIMM_ANYSIZE_CONFIGS``; not those a test registered in this process): in the suite they get timm's
    pretrained-cfg tests only, unless ``$TIMM_ANYSIZE_CONFORMANCE_FULL`` is set."""
    if os.environ.get(FULL_ENV):
        return ()
    tiny = set(conformance_specs())
    return tuple(n for n in register_shipped_configs() if n not in tiny)


# The variants' run takes about 4 minutes of one core (seed 17 on 2026-12-07: chunks of 58-78 s): it runs as CHUNKS
# tests, each a subprocess on every CHUNKS-th variant, so the suite's parallel workers share it (the longest tests of
# the suite).
CHUNKS = 4


def test_every_family_has_a_conformance_variant_in_the_run():
    """With every chunk's variants each getting cells (below), every family gets cells."""
    wanted = set(selected_families()) or {f.name for f in FAMILIES}
    selected = set(selected_variants() or conformance_specs())
    have = {f.name for f in FAMILIES for c in f.tiny.conformance if conformance_name(f.name, c) in selected}
    assert have >= wanted, f"families without a conformance variant: {sorted(wanted - have)}"


@pytest.mark.parametrize("chunk", range(CHUNKS), ids=lambda i: f"chunk{i}of{CHUNKS}")
def test_timm_test_models_passes_on_every_variant(tmp_path, chunk):
    try:
        timm_test_models()
    except RuntimeError as e:  # no index reachable: say so rather than pass silently
        pytest.skip(str(e).splitlines()[0])
    only = selected_variants()
    if only:  # a selection: chunked here (none left for this chunk: nothing to start)
        only = tuple(sorted(only)[chunk::CHUNKS])
        if not only:
            pytest.skip(f"no selected variant falls in chunk {chunk} of {CHUNKS}")
    report = run_conformance(
        tmp_path, only=only, chunk=(0, 1) if only else (chunk, CHUNKS), cfgs_only=cfgs_only_variants()
    )
    cells = report["cells"]
    without = sorted(set(report["variants"]) - {c["arch"] for c in cells})
    assert report["variants"] and not without, f"variants without a conformance cell: {without or 'none run'}"
    failed = failures(cells)
    assert not failed, f"{len(failed)} of {len(cells)} cells fail:\n" + "\n".join(failed)


def main(argv: Optional[list[str]] = None) -> None:
    """``python tests/test_timm_conformance.py [--no-bases]``: run everything and write docs/conformance.md."""
    import time

    argv = sys.argv[1:] if argv is None else argv
    if "--from-reports" in argv:  # render saved report.json files: VARIANTS [BASES]
        paths = argv[argv.index("--from-reports") + 1 :]
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
