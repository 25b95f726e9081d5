"""Nothing that validation accepts may fail later (issue 21): the memory a geometry costs, every buffer included,
and timm's own model run at a ``dynamic: false`` size, both checked when the variant is registered."""

from __future__ import annotations

import json
import re
import time

import pytest
import timm
import torch
from load_memory_child import run_child
from safetensors.torch import save_file

import timm_anysize
from conftest import unique_name
from timm_anysize.apps.cli import main as cli_main
from timm_anysize.core import memory as core_memory
from timm_anysize.core.family import Family
from timm_anysize.core.memory import (
    cgroup_memory_limit,
    estimate_cost,
    format_bytes,
    memory_budget,
    physical_memory,
)
from timm_anysize.core.meta import meta_device
from timm_anysize.core.spec import parse_variant
from timm_anysize.families import FAMILIES, generic_family
from timm_anysize.plan import make_plan
from timm_anysize.timm_geometry import geometry_of

TINY_BEIT = dict(base="beit_base_patch16_224", model_args={"depth": 2, "embed_dim": 64, "num_heads": 2})


# --- memory ------------------------------------------------------------------------------------------------------


def test_a_non_persistent_relative_position_index_too_large_is_refused_at_registration(monkeypatch):
    """BEiT at patch 1 builds a 50,177² int64 relative-position index in each block: a buffer outside the state
    dict that the old estimate (state dict + one attention map) missed, so loading died asking for 40 GB."""
    monkeypatch.setenv("TIMM_ANYSIZE_MAX_BYTES", str(16 * 2**30))  # the same answer on any machine
    start = time.perf_counter()
    with pytest.raises(timm_anysize.SpecError) as err:
        timm_anysize.register_variant(unique_name(), patch_size=1, img_size=224, **TINY_BEIT)
    assert time.perf_counter() - start < 10  # meta builds only: nothing allocated
    msg = str(err.value)
    assert ".img_size: 224x224 px, patch 1x1" in msg and "over the 16.0 GiB budget (TIMM_ANYSIZE_MAX_BYTES)" in msg
    assert "relative-position index `blocks.0.attn.relative_position_index` (50,177² entries, int64, 2 of them)" in msg
    assert "= 37.5 GiB" in msg  # 2 x 50,177² x 8 bytes
    # the nearest geometries that fit, both checked by the same estimate
    assert "nearest that fit: img_size [" in msg and "patch_size 2 at img_size [224, 224]" in msg
    timm_anysize.register_variant(unique_name(), patch_size=2, img_size=224, **TINY_BEIT)


def test_a_small_geometry_is_accepted_and_its_estimate_counts_non_persistent_buffers():
    plan = make_plan(parse_variant(unique_name(), {**TINY_BEIT, "img_size": 64}))
    cost = plan.cost
    assert cost is not None and cost.tokens == 4 * 4 + 1 and cost.heads == 2
    model = timm.create_model("beit_base_patch16_224", img_size=64, **TINY_BEIT["model_args"])
    assert "blocks.0.attn.relative_position_index" not in model.state_dict()  # non-persistent ...
    assert tuple(model.blocks[0].attn.relative_position_index.shape) == (17, 17)  # ... int64, one per block
    tensors = [*model.parameters(), *model.buffers()]
    assert cost.params_bytes + cost.buffers_bytes == sum(t.numel() * t.element_size() for t in tensors)
    assert cost.buffers_bytes >= 2 * 17 * 17 * 8
    assert cost.attention_maps == 4 and cost.attention_bytes == 4 * 17 * 17 * 2 * 4  # scores, bias, softmax, temp
    assert cost.total == cost.params_bytes + cost.buffers_bytes + cost.attention_bytes
    line = cost.describe()
    assert (
        line.startswith(f"~{format_bytes(cost.total)} at 17 tokens: weights ")
        and "(4 maps of 2 heads, one image)" in line
    )


def test_a_geometry_that_fits_only_in_half_precision_is_accepted_and_built_only_in_it(monkeypatch, tmp_path, capsys):
    """A 7B ViT is 25 GiB in float32 and 12.5 GiB in bfloat16: registration (which does not know the dtype) accepts
    it; create_model refuses float32 before allocating anything, naming the dtype that fits, and builds bfloat16."""
    spec = dict(base="test_vit", img_size=64, patch_size=8)
    cost = make_plan(parse_variant(unique_name(), spec)).cost
    assert cost is not None and cost.total_in(torch.float32) == cost.total
    half = cost.total_in(torch.bfloat16)
    assert cost.total // 2 <= half < cost.total  # floating tensors halve; integer buffers stay
    source = timm.create_model("test_vit")
    file = tmp_path / "test_vit.safetensors"
    save_file(source.state_dict(), str(file))
    monkeypatch.setenv("TIMM_ANYSIZE_MAX_BYTES", str((half + cost.total) // 2))
    name = timm_anysize.register_variant(unique_name(), pretrained={"file": str(file)}, **spec)
    assert cli_main(["show", name]) == 0
    shown = capsys.readouterr().out
    assert f"over this machine's budget in float32: build it with dtype=torch.bfloat16 (~{format_bytes(half)})" in shown
    with pytest.raises(timm_anysize.SpecError) as err:
        timm.create_model(name, pretrained=True)
    msg = str(err.value)
    assert f"{name}: built in float32 at 64x64 px, patch 8x8" in msg and "over the" in msg
    assert f"timm.create_model('{name}', dtype=torch.bfloat16) needs ~{format_bytes(half)}" in msg
    model = timm.create_model(name, pretrained=True, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight.bfloat16())
    monkeypatch.setenv("TIMM_ANYSIZE_MAX_BYTES", str(half - 1))  # not even in half precision: refused up front
    with pytest.raises(timm_anysize.SpecError, match=r"\.pretrained\.img_size: 160x160 px.* in bfloat16\), over the"):
        timm_anysize.register_variant(unique_name(), **spec)


# The rows whose patch can change: each is measured at a patch that gives a large grid.
PATCH_ROWS = [f for f in FAMILIES if f.changes_patch and f.tiny is not None]


def _large_grid_patch(family: Family) -> int:
    """The largest patch that gives at least a 48x48 grid (2,304 tokens) at the example's own size."""
    size = timm.models.get_pretrained_cfg(family.example).input_size[-1]
    return max(p for p in range(1, size + 1) if size % p == 0 and (size // p) ** 2 >= 48 * 48)


@pytest.mark.parametrize("family", PATCH_ROWS, ids=lambda f: f.name)
def test_the_estimate_bounds_what_a_forward_at_the_variants_size_takes(family):
    """Measured in a fresh process (peak resident memory while building and running one image at a grid of 48x48 or
    more): attention that materialises its scores holds several maps at once (BEiT's bias, CaiT's talking heads,
    ConViT's position scores, SAM's relative positions), and Gemma 4 a position one-hot per token; an estimate of one
    map let through a load 1.7-3x its figure. Checked on every row whose estimate counts several maps in an attention
    that outweighs its tensors."""
    geometry = dict(patch_size=_large_grid_patch(family), model_args=family.tiny.model_args)
    cost = make_plan(parse_variant(unique_name(), dict(base=family.example, **geometry))).cost
    assert cost is not None
    if cost.attention_maps == 1 or cost.attention_bytes < cost.params_bytes + cost.buffers_bytes:
        held = "one map (fused attention)" if cost.attention_maps == 1 else "windows, smaller than its tensors"
        pytest.skip(f"its attention holds {held}: {cost.describe()}")
    out = run_child("forward", "-", family.example, json.dumps(geometry))
    assert out["added"] <= out["estimate"] + 64 * 2**20, (out["added"] / 2**20, out["describe"])
    assert out["added"] > out["estimate"] / 4  # and it is a bound, not a guess far above


def test_a_model_without_attention_costs_its_tensors_only():
    with meta_device():
        model = timm.create_model("resnet18")
    cost = estimate_cost(model, geometry_of(model, generic_family(model, {}), img_size=224))
    assert cost.attention_bytes == 0 and "no attention map" in cost.describe()
    assert cost.buffers_bytes == sum(b.numel() * b.element_size() for b in model.buffers())  # int64 counters too


def test_the_default_budget_is_three_quarters_of_the_machine(monkeypatch):
    monkeypatch.delenv("TIMM_ANYSIZE_MAX_BYTES", raising=False)
    budget, where = memory_budget(cgroup_files=())  # outside any container
    total = physical_memory()
    assert total is None or budget == int(total * 0.75)
    assert "TIMM_ANYSIZE_MAX_BYTES" in where


@pytest.mark.parametrize("version", ["memory.max", "memory.limit_in_bytes"])
def test_a_container_limit_below_the_machine_is_the_budget(monkeypatch, tmp_path, version):
    """In a container the machine's memory is not what the process may use: the cgroup's limit (v2 or v1) is."""
    monkeypatch.delenv("TIMM_ANYSIZE_MAX_BYTES", raising=False)
    limit = tmp_path / version
    limit.write_text(f"{2**30}\n")
    assert cgroup_memory_limit([tmp_path / "absent", limit]) == 2**30  # the first file that exists says
    budget, where = memory_budget(cgroup_files=[limit])
    assert budget == int(2**30 * 0.75)
    assert where == "75% of this container's 1.0 GiB memory limit (cgroup); TIMM_ANYSIZE_MAX_BYTES sets it"


@pytest.mark.parametrize("no_limit", ["max", "9223372036854771712", str(2**50)])
def test_no_container_limit_or_one_above_the_machine_leaves_the_machine(monkeypatch, tmp_path, no_limit):
    """cgroup v2 says ``max``, v1 a huge number when there is no limit; a limit above the machine's memory is none."""
    monkeypatch.delenv("TIMM_ANYSIZE_MAX_BYTES", raising=False)
    limit = tmp_path / "memory.max"
    limit.write_text(no_limit + "\n")
    assert memory_budget(cgroup_files=[limit]) == memory_budget(cgroup_files=())


def test_the_variable_overrides_the_container_limit(monkeypatch, tmp_path):
    limit = tmp_path / "memory.max"
    limit.write_text(f"{2**30}\n")
    monkeypatch.setenv("TIMM_ANYSIZE_MAX_BYTES", str(2**34))
    assert memory_budget(cgroup_files=[limit]) == (2**34, "TIMM_ANYSIZE_MAX_BYTES")


def test_validation_refuses_what_the_container_cannot_hold(monkeypatch, tmp_path):
    """The cgroup files the budget reads by default are the module's constant: pointed at a 512 KiB limit, test_vit
    (~1.4 MiB in float32, ~0.7 in bfloat16) is refused at registration, the container's limit named."""
    monkeypatch.delenv("TIMM_ANYSIZE_MAX_BYTES", raising=False)
    limit = tmp_path / "memory.max"
    limit.write_text(f"{2**19}\n")
    monkeypatch.setattr(core_memory, "CGROUP_MEMORY_FILES", (str(limit),))
    with pytest.raises(
        timm_anysize.SpecError, match=r"over the 384\.0 KiB budget \(75% of this container's 512\.0 KiB"
    ):
        timm_anysize.register_variant(unique_name(), base="test_vit", img_size=64)


def test_a_budget_that_is_not_a_number_names_the_variable(monkeypatch):
    monkeypatch.setenv("TIMM_ANYSIZE_MAX_BYTES", "64G")
    with pytest.raises(timm_anysize.SpecError, match=r"TIMM_ANYSIZE_MAX_BYTES='64G': not a positive whole number"):
        timm_anysize.register_variant(unique_name(), base="test_vit", img_size=64)


# --- dynamic: false runs timm's own model ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, error, near, dynamic_runs",
    [
        (
            dict(base="levit_128s", img_size=[185, 48]),
            r"must match|broadcast",
            "nearest sizes that run: [192, 48], [176, 48]",
            True,
        ),
        (dict(base="hiera_tiny_224", img_size=40, in_chans=4), r"shape '\[.*\]' is invalid", "[32, 32]", False),
    ],
)
def test_a_static_size_timms_own_model_cannot_run_is_refused_with_the_sizes_that_run(spec, error, near, dynamic_runs):
    name = unique_name()
    with pytest.raises(timm_anysize.SpecError) as err:
        timm_anysize.register_variant(name, dynamic=False, **spec)
    msg = str(err.value)
    size = spec["img_size"] if isinstance(spec["img_size"], list) else [spec["img_size"]] * 2
    assert f"{name}.img_size: dynamic: false builds timm's own " in msg
    assert f"model at {size}, which cannot run it: " in msg and msg.endswith("or leave dynamic on")
    assert near in msg
    assert re.search(error, msg)
    # the same spec on the dynamic path (the default): LeViT's dynamic model runs at 185x48; Hiera's mask units
    # do not fit 40 px either way, and its own-size check says so
    if dynamic_runs:
        timm_anysize.register_variant(unique_name(), **spec)
    else:
        with pytest.raises(timm_anysize.SpecError, match="cannot run at the variant's own size"):
            timm_anysize.register_variant(unique_name(), **spec)


def test_a_suggested_static_size_runs():
    name = timm_anysize.register_variant(unique_name(), base="levit_128s", img_size=[192, 48], dynamic=False)
    plan = make_plan(timm_anysize.get_variant(name))
    assert not plan.dynamic and plan.target.img_size == (192, 48)


def test_a_static_size_the_meta_device_cannot_judge_is_refused_by_the_familys_multiple():
    """timm's MViTv2 at 48 px sizes its stage tables for 48 // 8 = 6 tokens while its pooling gives 7: an index out
    of bounds on real tensors, which the meta device does not check (found by the property test's long run)."""
    with pytest.raises(timm_anysize.SpecError) as err:
        timm_anysize.register_variant(unique_name(), base="mvitv2_tiny", img_size=48, dynamic=False)
    assert "which runs only at sizes that are multiples of 32; nearest sides: 32 or 64" in str(err.value)
    with pytest.raises(IndexError):  # what it guards against: timm's own model at that size
        timm.create_model("mvitv2_tiny", img_size=48)(torch.randn(1, 3, 48, 48))
    name = timm_anysize.register_variant(unique_name(), base="mvitv2_tiny", img_size=64, dynamic=False)
    assert timm.create_model(name)(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
