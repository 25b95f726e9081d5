"""Run-time patch size (timm_anysize.flexi): parity with timm's set_input_size, the kernel cache, threads, flexi
training, torch.compile."""

from __future__ import annotations

import copy
import inspect
import json
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed, resample_abs_pos_embed_nhwc, resample_patch_embed

import timm_anysize
from conftest import run_torchrun
from timm_anysize.apps.demo import register_demo_variants
from timm_anysize.core.family import Family, tensor_layouts
from timm_anysize.core.resample import resize_rel_axis
from timm_anysize.core.spec import parse_variant
from timm_anysize.families import FAMILIES, family_of

SMALL = dict(embed_dim=64, depth=2, num_heads=2)


@dataclass(frozen=True)
class FlexiModel:
    """A model the flexi tests run: a timm architecture and its constructor arguments, built at 32 px with patch 8
    (the architecture's own where smaller) unless told."""

    arch: str
    kwargs: dict

    def build(self, img: Any = 32, patch: Any = None) -> torch.nn.Module:
        if patch is None:
            patch = self.own_patch()
        torch.manual_seed(0)
        return timm.create_model(self.arch, img_size=img, patch_size=patch, num_classes=5, **self.kwargs).eval()

    def own_patch(self) -> int:
        """8, or the architecture's own patch where smaller (Swin's 4: a grid of whole windows)."""
        with torch.device("meta"):
            model = timm.create_model(self.arch, img_size=32, **self.kwargs)
        return min(8, family_of(model).patch_size(model)[0])


def _flexi_rows() -> list[Family]:
    """The rows a run-time patch applies to: a patch kernel to resize, on the dynamic path or the family's own flexi
    embedding."""
    return [f for f in FAMILIES if f.tiny and f.changes_patch and (f.dynamic == "cached" or f.flexi_embed)]


# Every flexi row at its tiny model (the family's constructor arguments for any size, padding off), and ViTs with
# registers, without an embedded class token, and FlexiViT.
MODELS = {
    **{
        f.name: FlexiModel(f.example, dict(f.tiny.model_args, **f.dynamic_kwargs(True, pad=False)))
        for f in _flexi_rows()
    },
    "vit_registers": FlexiModel("vit_base_patch16_reg4_gap_256", SMALL),
    "vit_no_embed_class": FlexiModel("vit_tiny_patch16_224", dict(SMALL, no_embed_class=True)),
    "flexivit": FlexiModel("flexivit_small", SMALL),
}
# The ViT the tests of the flexi machinery (cache, threads, training, compile) run.
VIT = FlexiModel("vit_tiny_patch16_224", SMALL)
# (patch, input size): grids that are whole windows for Swin (window 4, one merge).
CASES = [(4, (32, 32)), (8, (64, 32)), (2, (16, 16)), ((4, 2), (32, 16))]


def _reference(model: torch.nn.Module, flexi: FlexiModel, img: tuple, p) -> torch.nn.Module:
    """A copy moved to patch ``p`` and input ``img`` by timm's own API: set_input_size (the windows kept as built);
    where the family has none, timm's model built for ``p`` and ``img`` with the weights resampled by timm's
    functions, as a load at that size would (:func:`_built_reference`)."""
    ref = copy.deepcopy(model)
    pp = timm.layers.to_2tuple(p)
    params = inspect.signature(ref.set_input_size).parameters if hasattr(ref, "set_input_size") else {}
    windows = {"window_size": flexi.kwargs.get("window_size")} if "window_size" in params else {}
    if not params:
        return _built_reference(model, flexi, img, pp)
    if "patch_size" not in params:  # its PatchEmbed cannot change patch: the kernel as timm's PatchEmbed resizes it
        pe = ref.patch_embed
        with torch.no_grad():
            pe.proj.weight = torch.nn.Parameter(resample_patch_embed(pe.proj.weight, list(pp)))
        pe.proj.stride = pe.patch_size = pp
        pe.img_size = None  # re-derive the grid at the new patch
        ref.set_input_size(img_size=img, **windows)
    else:
        ref.set_input_size(img_size=img, patch_size=p, **windows)
    return ref


def _built_reference(model: torch.nn.Module, flexi: FlexiModel, img: tuple, pp: tuple) -> torch.nn.Module:
    """timm's model built for patch ``pp`` and input ``img``, with ``model``'s weights: the patch kernel PI-resized
    (a linear projection as the convolution it is, in the family's ``linear_patch`` order) and each geometry
    tensor resampled by its kind to the built model's shape."""
    family = family_of(model)
    state = dict(model.state_dict())
    layouts = tensor_layouts(family, state)
    other = set(layouts.values()) - {"pos_tokens", "pos_nhwc", "rel_axis"}
    if other:  # NesT's blocks: timm's nest.resize_pos_embed does not antialias, the dynamic path does
        pytest.skip(f"no timm function resamples {family.name}'s {', '.join(sorted(other))} tensors as it runs")
    ref = flexi.build(img, pp)
    target = ref.state_dict()
    key = f"{family.patch_embeds[0]}.proj.weight"
    w = state[key]
    if family.linear_patch == "hwc":  # (ph, pw, C) patches, as timm patchifies
        own = family.patch_size(model)
        conv = resample_patch_embed(w.reshape(w.shape[0], *own, -1).permute(0, 3, 1, 2), list(pp))
        state[key] = conv.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    else:
        state[key] = resample_patch_embed(w, list(pp))
    for name, kind in layouts.items():
        shape = target[name].shape
        if kind == "pos_tokens":
            state[name] = resample_abs_pos_embed(
                state[name],
                new_size=list(family.grid_size(ref)),
                old_size=list(family.grid_size(model)),
                num_prefix_tokens=family.pos_embed_prefix_tokens(model),
            )
        elif kind == "pos_nhwc":
            state[name] = resample_abs_pos_embed_nhwc(state[name], list(shape[1:3]))
        else:
            state[name] = resize_rel_axis(state[name], shape[0])
    ref.load_state_dict(state)
    return ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(MODELS))
def test_parity_with_set_input_size(name):
    flexi = MODELS[name]
    model = flexi.build()
    pristine = copy.deepcopy(model)
    family = family_of(model)
    embed = family.patch_embed(model)
    kernel = embed.proj.weight.detach().clone()
    # timm's own model runs only square sizes where the row says so (ConViT): compared there
    square = "img_non_square" in family.static_unsupported
    for p, img in [(p, img) for p, img in CASES if not square or img[0] == img[1]]:
        x = torch.randn(2, 3, *img)
        ref = _reference(pristine, flexi, img, p)
        with torch.no_grad():
            expected = ref(x)
            with timm_anysize.patch_size(model, p):
                got = model(x)
        assert got.shape == expected.shape
        assert _rel(got, expected) <= 1e-5, (name, p, img)
    assert torch.equal(embed.proj.weight, kernel)
    # back at its own patch and size outside the block
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), pristine(x))


def test_non_square_patch_and_sticky_set():
    model = VIT.build()
    pristine = copy.deepcopy(model)
    x = torch.randn(1, 3, 32, 48)
    timm_anysize.set_patch_size(model, (8, 4))
    assert timm_anysize.get_patch_size(model) == (8, 4)
    with torch.no_grad():
        assert _rel(model(x), _reference(pristine, VIT, (32, 48), (8, 4))(x)) <= 1e-5
        with timm_anysize.patch_size(model, 16):  # a block wins over the sticky size
            assert _rel(model(x), _reference(pristine, VIT, (32, 48), 16)(x)) <= 1e-5
        timm_anysize.set_patch_size(model, None)
        assert torch.equal(model(torch.randn(1, 3, 32, 32) * 0 + x[..., :32]), pristine(x[..., :32]))


def test_kernel_cache_hits_misses_invalidation_and_grad_bypass():
    model = VIT.build()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for p in (4, 4, 16, 4):
            with timm_anysize.patch_size(model, p):
                model(x)
    info = timm_anysize.flexi_cache_info(model)
    assert (info["hits"], info["misses"], info["size"]) == (2, 2, 2)
    with torch.no_grad():
        model.patch_embed.proj.weight.mul_(1.5)  # any in-place write moves the stamp
    with torch.no_grad(), timm_anysize.patch_size(model, 4):
        got = model(x)
    info = timm_anysize.flexi_cache_info(model)
    assert info["invalidations"] == 1 and info["misses"] == 3
    ref = _reference(copy.deepcopy(model), VIT, (32, 32), 4)
    with torch.no_grad():
        assert _rel(got, ref(x)) <= 1e-5  # the new weights, not the stale entry
    # with gradients flowing the cache is bypassed, and the gradient reaches the one stored kernel
    with timm_anysize.patch_size(model, 4):
        model(x).sum().backward()
    assert timm_anysize.flexi_cache_info(model)["misses"] == 3
    assert model.patch_embed.proj.weight.grad is not None and model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_threads_at_different_patch_sizes():
    model = VIT.build()
    pristine = copy.deepcopy(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = {p: _reference(pristine, VIT, (32, 32), p)(x) for p in (4, 8, 16)}
    errors: list = []
    barrier = threading.Barrier(3)

    def run(p: int) -> None:
        try:
            with torch.no_grad(), timm_anysize.patch_size(model, p):
                barrier.wait()
                for _ in range(5):
                    out = model(x)
                    assert _rel(out, expected[p]) <= 1e-5, p
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in (4, 8, 16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert timm_anysize.get_patch_size(model) == (8, 8)  # nothing leaked out of the blocks


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.tiny and not f.changes_patch], ids=lambda f: f.name)
def test_families_without_a_patch_kernel_raise(family):
    tiny = family.tiny
    model = timm.create_model(
        family.example, **({"img_size": tiny.img_size} if tiny.img_size_arg else {}), **tiny.model_args
    )
    with pytest.raises(TypeError, match=f"the {family.name} family has no single patch-embedding kernel"):
        timm_anysize.set_patch_size(model, 8)


def test_bad_patch_size_and_padding_off():
    model = VIT.build()
    with pytest.raises(ValueError, match="patch size must be a positive int"):
        timm_anysize.set_patch_size(model, 0)
    timm_anysize.enable_dynamic(model, pad=False)
    with pytest.raises(ValueError, match="not a multiple of the patch 6x6 and padding is off"):
        with timm_anysize.patch_size(model, 6):
            model(torch.randn(1, 3, 32, 32))


def test_flexi_training_sees_several_sizes_and_kernel_gets_gradients():
    model = timm_anysize.enable_flexi(VIT.build(), [4, 8, 16], weights=[1, 1, 2], seed=3).train()
    kernel = model.patch_embed.proj.weight
    seen_grids = set()
    hook = model.blocks[0].register_forward_pre_hook(lambda m, a: seen_grids.add(a[0].shape[1]))
    for _ in range(12):
        kernel.grad = None
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        assert kernel.grad is not None and kernel.grad.abs().sum() > 0
    hook.remove()
    assert set(model._anysize_flexi_seen) == {(4, 4), (8, 8), (16, 16)}
    assert seen_grids == {1 + 64, 1 + 16, 1 + 4}  # class token + grid at each patch size
    assert kernel.shape[-2:] == (8, 8)  # one stored kernel, at its own size
    # the same seed draws the same sizes (every DDP rank), eval runs at the set size
    other = timm_anysize.enable_flexi(VIT.build(), [4, 8, 16], weights=[1, 1, 2], seed=3)
    assert [other._anysize_flexi.draw(i) for i in range(12)] == [model._anysize_flexi.draw(i) for i in range(12)]
    model.eval()
    grids = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, a: grids.append(a[0].shape[1]))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        timm_anysize.set_patch_size(model, 4)
        model(torch.randn(1, 3, 32, 32))
    assert grids == [17, 65]


def test_compile_recompiles_at_most_once_per_patch_size():
    torch._dynamo.reset()
    model = VIT.build()
    timm_anysize.set_patch_size(model, 8)
    compiled = torch.compile(model, backend="eager", dynamic=False)
    x = torch.randn(1, 3, 32, 32)
    counts = []
    from torch._dynamo.utils import counters

    counters.clear()
    with torch.no_grad():
        for p in (8, 4, 16, 4, 8, 16):
            with timm_anysize.patch_size(model, p):
                y = compiled(x)
                assert _rel(y, model(x)) <= 1e-5
            counts.append(counters["stats"]["unique_graphs"])
    assert counts[2] == counts[-1]  # the second round at each size compiles nothing
    assert counts[2] <= 3


# --- YAML, launcher, DDP -----------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
FLEXI_YAML = """
variants:
  {name}:
    base: vit_tiny_patch16_224
    img_size: 32
    patch_size: 4
    in_chans: 1
    num_classes: 10
    model_args: {{embed_dim: 64, depth: 4, num_heads: 4}}
    flexi: {{patch_sizes: [2, 4, [8, 8]], weights: [1, 2, 1], seed: 7}}
    pretrained:
      file: {weights}
      img_size: 32
      patch_size: 4
      in_chans: 1
      num_classes: 10
"""


@pytest.fixture
def flexi_yaml(tmp_path):
    name = f"vit_digits_flexi_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "flexi.yaml"
    path.write_text(FLEXI_YAML.format(name=name, weights=ROOT / "configs/weights/vit_digits_patch4_32.safetensors"))
    return path, name


def test_yaml_flexi_variant_trains_at_drawn_sizes_and_evaluates_at_its_own(flexi_yaml):
    path, name = flexi_yaml
    timm_anysize.register_yaml(path)
    model = timm.create_model(name, pretrained=True)
    register_demo_variants()  # the demo's variants: `import timm_anysize` does not register them
    plain = timm.create_model("vit_digits_patch4_32", pretrained=True).eval()
    x = torch.rand(2, 1, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))  # eval: the variant's own patch, as the model without flexi
    model.train()
    for _ in range(10):
        model(x).sum().backward()
    assert set(model._anysize_flexi_seen) == {(2, 2), (4, 4), (8, 8)}
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"patch_sizes": []}, "flexi.patch_sizes"),
        ({"patch_sizes": [2, 4], "weights": [1]}, "one weight per patch size"),
        ({"patch_sizes": [2, 4], "weights": [0, 0]}, "all zero"),
        ({"patch_sizes": [0]}, "flexi.patch_sizes"),
        ({"patch_sizes": [2], "sizes": 1}, "unknown key"),
    ],
)
def test_yaml_flexi_errors_name_the_key(bad, message):
    with pytest.raises(timm_anysize.SpecError, match=message):
        parse_variant("v", {"base": "test_vit", "flexi": bad}, origin="f.yaml")
    with pytest.raises(timm_anysize.SpecError, match="flexi needs"):
        parse_variant("v", {"base": "test_vit", "dynamic": False, "flexi": {"patch_sizes": [8]}})
    with pytest.raises(timm_anysize.SpecError, match="does not divide img_size"):
        parse_variant("v", {"base": "test_vit", "img_size": 32, "pad": False, "flexi": {"patch_sizes": [6]}})


def test_yaml_flexi_on_a_family_without_a_kernel_is_a_spec_error():
    spec = parse_variant(
        "v_flexi_levit",
        {
            "base": "levit_128s",
            "flexi": {"patch_sizes": [8]},
            "model_args": dict(embed_dim=(32, 48, 64), depth=(1, 1, 1), num_heads=(1, 1, 1), key_dim=8),
        },
        origin="f.yaml",
    )
    from timm_anysize.builder import build_variant

    with pytest.raises(timm_anysize.SpecError, match="f.yaml: v_flexi_levit.flexi: .*levit family"):
        build_variant(spec)


DDP_SCRIPT = """
import json, os, sys, timm, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model = timm.create_model(sys.argv[1], pretrained=True).train()
sizes = []
model.blocks[0].register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[1]))
ddp = DDP(model)
opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
g = torch.Generator().manual_seed(100 + rank)
x, y = torch.rand(4, 1, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
for step in range(8):
    loss = torch.nn.functional.cross_entropy(ddp(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(world)]
dist.all_gather(gathered, flat)
all_sizes = [None] * world
dist.all_gather_object(all_sizes, sizes)
if rank == 0:
    same = all(torch.equal(gathered[0], t) for t in gathered[1:])
    with open(sys.argv[2], "w") as f:
        json.dump({"same": same, "sizes": all_sizes, "world": world}, f)
dist.barrier()
dist.destroy_process_group()
# Gloo's worker threads can still hold tensors at interpreter shutdown and abort the process there
# ("terminate called without an active exception", about one run in five with plain timm too; pytorch#179291):
# the work is done and written, so leave without finalisation.
os._exit(0)
"""


def test_torchrun_ddp_flexi_through_the_launcher(flexi_yaml):
    path, name = flexi_yaml
    (path.parent / "ddp.py").write_text(DDP_SCRIPT)
    out = path.parent / "result.json"
    run_torchrun("-m", "timm_anysize", "run", "--config", str(path), str(path.parent / "ddp.py"), name, str(out))
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["same"] is True  # DDP in sync: same size on every rank each step
    sizes = result["sizes"]
    assert sizes[0] == sizes[1] and len(set(sizes[0])) > 1  # several patch sizes, the same per step on both ranks


@pytest.mark.parametrize("family", [f for f in _flexi_rows() if f.flexi_embed], ids=lambda f: f.name)
def test_a_familys_own_flexi_embedding_trains_its_one_kernel(family):
    """A family's own flexi embedding (NaFlexViT's linear projection): random patch sizes in training, gradients on
    the one stored weight."""
    model = timm_anysize.enable_flexi(MODELS[family.name].build(), [4, 8, 16]).train()
    for _ in range(4):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert len(model._anysize_flexi_seen) >= 2
    weight = family.patch_embed(model).proj.weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
