"""Property (issue 21): nothing validation accepts fails later, for every family, under random geometries.

For each family's tiny model (its row's ``tiny``), a random geometry (size, square or not, patch, channels, classes,
``dynamic``) is exactly one of:

(a) refused at validation with a :class:`~timm_anysize.SpecError` (or, for a geometry that fits the memory budget
    only in half precision, refused by ``create_model`` in float32 before anything is allocated, naming
    ``dtype=torch.bfloat16``: validation does not know the dtype), or
(b) loaded from a checkpoint, giving finite outputs of the right shape at its own size, and then
(c) at random run-time sizes, finite outputs of the right shape or the documented
    :class:`~timm_anysize.InputSizeError` -- never another exception.

CI runs a few derandomized examples per family (the same ones every run); ``pytest --fuzz-long`` hunts with many
more, randomly (``$TIMM_ANYSIZE_FUZZ_EXAMPLES`` sets how many per family).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import timm_anysize
from conftest import tiny_arch, unique_name
from timm_anysize.families import FAMILIES

sides = st.integers(min_value=8, max_value=80)
geometries = st.fixed_dictionaries(
    {},
    optional={
        "img_size": st.one_of(sides, st.lists(sides, min_size=2, max_size=2)),
        "patch_size": st.integers(min_value=2, max_value=16),
        "in_chans": st.integers(min_value=1, max_value=5),
        "num_classes": st.sampled_from([1, 7, 1000]),
        "dynamic": st.booleans(),
    },
)
run_sizes = st.lists(st.tuples(st.integers(1, 100), st.integers(1, 100)), min_size=2, max_size=2)


def _settings(pytestconfig: pytest.Config) -> settings:
    long = pytestconfig.getoption("--fuzz-long")
    count = int(os.environ.get("TIMM_ANYSIZE_FUZZ_EXAMPLES", 0)) or (60 if long else 4)
    return settings(
        max_examples=count,
        derandomize=not long,  # CI: the same examples every run
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def _checkpoint(family, folder: Path) -> tuple[Path, dict]:
    tiny = family.tiny
    size = {"img_size": tiny.img_size} if tiny.img_size_arg else {}
    torch.manual_seed(0)
    model = timm.create_model(tiny_arch(family), **size, **tiny.model_args)
    path = folder / f"{family.name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    pretrained = {"file": str(path), **size}
    return path, pretrained


def _check_output(y: torch.Tensor, num_classes: int, what: str) -> None:
    assert y.shape[0] == 1 and (num_classes == 0 or y.shape[-1] == num_classes), (what, tuple(y.shape))
    assert bool(torch.isfinite(y).all()), f"{what}: non-finite output"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_random_geometries_are_refused_up_front_or_run(family, pytestconfig: pytest.Config, tmp_path: Path) -> None:
    _, pretrained = _checkpoint(family, tmp_path)
    outcomes = {"refused": 0, "ran": 0}

    @_settings(pytestconfig)
    @given(geometry=geometries, runs=run_sizes)
    def check(geometry: dict, runs: list[tuple[int, int]]) -> None:
        spec = dict(base=tiny_arch(family), model_args=family.tiny.model_args, pretrained=pretrained, **geometry)
        try:
            name = timm_anysize.register_variant(unique_name(), **spec)
        except timm_anysize.SpecError:
            outcomes["refused"] += 1
            return
        try:
            model = timm.create_model(name, pretrained=True).eval()
        except timm_anysize.SpecError as e:
            assert "built in float32" in str(e) and "dtype=torch.bfloat16" in str(e), str(e)  # the one refusal here
            outcomes["refused"] += 1
            return
        chans, h, w = model.pretrained_cfg["input_size"]
        classes = model.pretrained_cfg["num_classes"]
        with torch.no_grad():
            _check_output(model(torch.randn(1, chans, h, w)), classes, f"{spec} at its own size {h}x{w}")
            for rh, rw in runs:
                try:
                    y = model(torch.randn(1, chans, rh, rw))
                except timm_anysize.InputSizeError:
                    continue  # the documented refusal
                _check_output(y, classes, f"{spec} at run-time size {rh}x{rw}")
        outcomes["ran"] += 1

    check()
    assert sum(outcomes.values()) > 0, outcomes
