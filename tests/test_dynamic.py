"""Dynamic input size: exactness against timm, padding, the cache and each of its invalidation paths, feature
APIs, threads, copies, torch.compile, torch.export and ONNX."""

from __future__ import annotations

import ast
import copy
import logging
import pickle
import threading
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_anysize
from conftest import unique_name
from timm_anysize import dynamic_cache_info, enable_dynamic
from timm_anysize.core.runtime_options import cache_for
from timm_anysize.core.size_cache import size_lru_cache

SMALL = dict(embed_dim=64, depth=2, num_heads=2)
FAMILIES = [
    ("test_vit", {}),
    ("deit_tiny_distilled_patch16_224", SMALL),
    ("vit_small_patch14_reg4_dinov2", dict(SMALL, img_size=70)),  # registers + no_embed_class
    ("eva02_tiny_patch14_224", dict(SMALL, img_size=56)),  # abs pos-embed + RoPE
]


def pair(base: str, kwargs: dict, seed: int = 0):
    """A static timm model and a dynamic one with the same weights, built as variants build them."""
    torch.manual_seed(seed)
    static = timm.create_model(base, **kwargs).eval()
    with torch.no_grad():
        static.pos_embed.add_(torch.randn_like(static.pos_embed) * 0.1)
    dyn = timm.create_model(base, dynamic_img_size=True, dynamic_img_pad=True, **kwargs).eval()
    dyn.load_state_dict(static.state_dict())
    return static, enable_dynamic(dyn)


@torch.no_grad()
def test_enable_dynamic_on_a_static_timm_model():
    static, _ = pair("test_vit", {})
    dyn = enable_dynamic(copy.deepcopy(static))
    x = torch.randn(2, 3, 160, 160)
    assert torch.equal(dyn(x), static(x))
    ref = copy.deepcopy(static)
    ref.set_input_size(img_size=(96, 64))
    x = torch.randn(2, 3, 96, 64)
    torch.testing.assert_close(dyn(x), ref(x), rtol=1e-5, atol=1e-6)


def test_enable_dynamic_refuses_fixed_grid_rope():
    with pytest.raises(TypeError, match=r"RoPE for a fixed \(4, 4\) grid; create it with .*dynamic_img_size=True"):
        enable_dynamic(timm.create_model("eva02_tiny_patch14_224", img_size=56, **SMALL))


@pytest.mark.parametrize("base, kwargs", FAMILIES)
@torch.no_grad()
def test_exact_at_own_size_and_equal_to_set_input_size_elsewhere(base, kwargs):
    static, dyn = pair(base, kwargs)
    size = static.patch_embed.img_size
    x = torch.randn(2, 3, *size)
    assert torch.equal(dyn(x), static(x))  # own size: bit-identical
    p = static.patch_embed.patch_size[0]
    for hw in [(size[0] + 2 * p, size[1] + 2 * p), (size[0] - p, size[1] + 3 * p)]:
        ref = copy.deepcopy(static)
        ref.set_input_size(img_size=hw)
        x = torch.randn(2, 3, *hw)
        torch.testing.assert_close(dyn(x), ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base, kwargs", FAMILIES)
@torch.no_grad()
def test_pinned_against_timms_own_dynamic_path(base, kwargs):
    """The cached path builds exactly the tokens timm's dynamic_img_size path builds."""
    _, dyn = pair(base, kwargs)
    timm_dyn = timm.create_model(base, dynamic_img_size=True, **kwargs).eval()
    timm_dyn.load_state_dict(dyn.state_dict())
    p = dyn.patch_embed.patch_size[0]
    for hw in [(4 * p, 6 * p), (7 * p, 3 * p)]:
        x = torch.randn(1, 3, *hw)
        assert torch.equal(dyn(x), timm_dyn(x))
        assert torch.equal(dyn(x), timm_dyn(x))  # second call served from the cache


@torch.no_grad()
def test_patch_embed_without_the_zero_pad_copy_equals_timms():
    from timm_anysize.dynamic import DynamicPatchEmbed

    _, dyn = pair("test_vit", {})
    assert type(dyn.patch_embed) is DynamicPatchEmbed
    timm_pe = timm.create_model("test_vit", dynamic_img_size=True, dynamic_img_pad=True).patch_embed
    timm_pe.load_state_dict(dyn.patch_embed.state_dict())
    for hw in [(64, 96), (70, 90), (16, 16)]:
        x = torch.randn(2, 3, *hw)
        assert torch.equal(dyn.patch_embed(x), timm_pe(x))


@torch.no_grad()
def test_non_divisible_sizes_are_padded_like_timm():
    static, dyn = pair("test_vit", {})
    x = torch.randn(1, 3, 70, 101)
    padded = F.pad(x, (0, 112 - 101, 0, 80 - 70))
    ref = copy.deepcopy(static)
    ref.set_input_size(img_size=(80, 112))
    torch.testing.assert_close(dyn(x), ref(padded), rtol=1e-5, atol=1e-6)


def test_pad_off_gives_a_clear_error():
    name = timm_anysize.register_variant(unique_name(), base="test_vit", img_size=64, pad=False)
    m = timm.create_model(name).eval()
    assert m(torch.randn(1, 3, 96, 48)).shape == (1, 1000)
    with pytest.raises(
        ValueError, match=r"input 70x64 is not a multiple of the patch 16x16 and padding is off.*pad: true"
    ):
        m(torch.randn(1, 3, 70, 64))


def test_variant_is_dynamic_by_default_and_can_be_static(make_checkpoint):
    path, _ = make_checkpoint("test_vit")
    dyn = timm.create_model(
        timm_anysize.register_variant(unique_name(), base="test_vit", img_size=64, pretrained={"file": str(path)}),
        pretrained=True,
    ).eval()
    static = timm.create_model(
        timm_anysize.register_variant(
            unique_name(), base="test_vit", img_size=64, dynamic=False, pretrained={"file": str(path)}
        ),
        pretrained=True,
    ).eval()
    assert timm_anysize.is_dynamic(dyn) and not timm_anysize.is_dynamic(static)
    assert dyn.pretrained_cfg["fixed_input_size"] is False and static.pretrained_cfg["fixed_input_size"] is True
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dyn(x), static(x))
        with pytest.raises(timm_anysize.InputSizeError, match="runs at its own size 64x64 only"):  # not timm's assert
            static(torch.randn(1, 3, 96, 96))


@torch.no_grad()
def test_cache_hits_bounds_and_keys():
    _, dyn = pair("test_vit", {})
    enable_dynamic(dyn, cache_size=2)
    for hw in [(64, 64), (64, 64), (96, 96), (64, 64), (128, 64), (96, 96)]:
        dyn(torch.randn(1, 3, *hw))
    info = dynamic_cache_info(dyn)
    # (64,64) miss, hit; (96,96) miss; (64,64) hit; (128,64) miss evicts (96,96); (96,96) miss again
    assert (info["hits"], info["misses"], info["size"], info["maxsize"]) == (2, 4, 2, 2)
    dyn(torch.randn(1, 3, 160, 160))  # the native grid never touches the cache
    assert dynamic_cache_info(dyn)["misses"] == 4


def test_size_lru_cache_logs_each_miss_makes_normal_tensors_and_steps_aside_while_tracing(caplog):
    calls = []

    @size_lru_cache(maxsize=2)
    def mask(h: int, w: int) -> torch.Tensor:
        calls.append((h, w))
        return torch.zeros(h, w)

    with caplog.at_level(logging.DEBUG, logger="timm_anysize.core.size_cache"):
        for hw in [(2, 3), (2, 3), (4, 4), (2, 3), (5, 1), (4, 4)]:  # (5, 1) evicts (4, 4)
            mask(*hw)
    assert calls == [(2, 3), (4, 4), (5, 1), (4, 4)]
    lines = [r.getMessage() for r in caplog.records if r.name == "timm_anysize.core.size_cache"]
    assert lines == [
        "size cache miss for mask(2, 3): hit rate 0/1 (0%), 1 of 2 entries",
        "size cache miss for mask(4, 4): hit rate 1/3 (33%), 2 of 2 entries",
        "size cache miss for mask(5, 1): hit rate 2/5 (40%), 2 of 2 entries",
        "size cache miss for mask(4, 4): hit rate 2/6 (33%), 2 of 2 entries",
    ]
    before = mask.cache_info()
    # a value first made in inference mode is a normal tensor: autograd can use it later (an index saved for backward)
    with torch.inference_mode():
        arange = size_lru_cache(maxsize=2)(torch.arange)
        assert not arange(3).is_inference()
    weight = torch.ones(4, requires_grad=True)
    weight[arange(3)].sum().backward()
    assert weight.grad.tolist() == [1.0, 1.0, 1.0, 0.0]
    # traced: the function runs (no state in a graph), the cache is untouched; check_trace would run it eagerly too
    torch.jit.trace(lambda x: x + mask(2, 3), torch.ones(2, 3), check_trace=False)
    assert calls[4:] == [(2, 3)] and mask.cache_info() == before


def _stale_check(dyn: torch.nn.Module, mutate) -> None:
    """After ``mutate`` changes the weights, outputs must match a fresh model with the new weights."""
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        dyn(x)
    mutate(dyn)
    fresh = enable_dynamic(timm.create_model("test_vit").to(dyn.pos_embed.dtype).eval())
    fresh.load_state_dict(dyn.state_dict())
    with torch.no_grad():
        assert torch.equal(dyn(x.to(dyn.pos_embed.dtype)), fresh(x.to(dyn.pos_embed.dtype)))
    assert dynamic_cache_info(dyn)["invalidations"] == 1


def test_cache_invalidated_by_load_state_dict():
    _, dyn = pair("test_vit", {})
    other, _ = pair("test_vit", {}, seed=1)
    _stale_check(dyn, lambda m: m.load_state_dict(other.state_dict()))


def test_cache_invalidated_by_optimizer_step():
    _, dyn = pair("test_vit", {})

    def step(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(torch.randn(2, 3, 64, 64)).sum().backward()
        opt.step()
        m.eval()

    _stale_check(dyn, step)


def test_cache_invalidated_by_to_dtype():
    _, dyn = pair("test_vit", {})
    _stale_check(dyn, lambda m: m.to(torch.float64))


def test_cache_invalidated_by_replacing_the_parameter():
    _, dyn = pair("test_vit", {})

    def replace(m):
        m.pos_embed = torch.nn.Parameter(m.pos_embed.detach() * 2)

    _stale_check(dyn, replace)


def test_training_is_uncached_and_differentiable():
    _, dyn = pair("test_vit", {})
    dyn.train()
    dyn(torch.randn(2, 3, 96, 64)).sum().backward()
    assert dyn.pos_embed.grad is not None and dyn.pos_embed.grad.abs().sum() > 0
    assert dynamic_cache_info(dyn)["misses"] == 0
    dyn.eval()
    dyn.zero_grad()
    dyn(torch.randn(2, 3, 96, 64)).sum().backward()  # eval with grad: still differentiable, still uncached
    assert dyn.pos_embed.grad.abs().sum() > 0 and dynamic_cache_info(dyn)["misses"] == 0


@torch.no_grad()
def test_threads_share_one_model_and_cache():
    _, dyn = pair("test_vit", {})
    sizes = [(64, 64), (96, 128), (80, 48), (112, 112), (70, 90)]
    inputs = {hw: torch.randn(2, 3, *hw) for hw in sizes}
    expected = {hw: dyn(x) for hw, x in inputs.items()}
    cache_for(dyn, "pos_embed").clear()
    errors = []

    def worker(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(12):
            hw = sizes[torch.randint(len(sizes), (1,), generator=g).item()]
            if not torch.equal(dyn(inputs[hw]), expected[hw]):
                errors.append(hw)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@torch.no_grad()
def test_copies_and_pickles_get_a_fresh_cache():
    _, dyn = pair("test_vit", {})
    dyn(torch.randn(1, 3, 64, 64))
    clone = copy.deepcopy(dyn)
    restored = pickle.loads(pickle.dumps(dyn))
    for m in (clone, restored):
        assert dynamic_cache_info(m)["size"] == 0
        assert torch.equal(m(torch.randn(1, 3, 64, 64) * 0), dyn(torch.randn(1, 3, 64, 64) * 0))
    assert not any(k.startswith("_anysize") for k in dyn.state_dict())  # nothing derived for DDP to broadcast


@torch.no_grad()
def test_feature_apis_at_dynamic_sizes():
    _, dyn = pair("test_vit", {})
    x = torch.randn(2, 3, 96, 144)
    assert dyn.forward_features(x).shape == (2, 1 + 6 * 9, 64)
    feats = dyn.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 6, 9)] * 2
    padded = dyn.forward_intermediates(torch.randn(1, 3, 70, 90), indices=1, intermediates_only=True)
    assert tuple(padded[0].shape) == (1, 64, 5, 6)


def test_features_only_variant(make_checkpoint):
    path, base = make_checkpoint("test_vit")
    name = timm_anysize.register_variant(unique_name(), base="test_vit", img_size=64, pretrained={"file": str(path)})
    m = timm.create_model(name, pretrained=True, features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        feats = m(torch.randn(2, 3, 96, 48))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 6, 3)] * 2
    assert torch.equal(m.model.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.weight)
    assert "num_classes" not in m.pretrained_cfg
    assert timm_anysize.adaptation_report(m).dropped["head.weight"] == "pruned by features_only"


def test_enable_dynamic_rejects_unsupported_models():
    with pytest.raises(TypeError, match="ResNet is not supported"):
        enable_dynamic(timm.create_model("resnet10t"))


def test_compile_dynamic_recompiles_at_most_once():
    from torch._dynamo.utils import counters

    _, dyn = pair("test_vit", {})
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(dyn, dynamic=True, backend="eager")
    with torch.no_grad():
        for hw in [(64, 64), (96, 128), (128, 80), (112, 160)]:
            x = torch.randn(2, 3, *hw)
            torch.testing.assert_close(compiled(x), dyn(x), rtol=1e-5, atol=1e-6)
    assert counters["frames"]["ok"] <= 2  # first compile + at most 1 recompile
    torch._dynamo.reset()


def test_torch_export_dynamic_height_width():
    from torch.export import Dim, export

    _, dyn = pair("test_vit", {})
    ep = export(dyn, (torch.randn(2, 3, 96, 128),), dynamic_shapes={"x": {2: Dim.DYNAMIC, 3: Dim.DYNAMIC}})
    with torch.no_grad():
        for hw in [(64, 64), (80, 112), (70, 90)]:
            x = torch.randn(2, 3, *hw)
            torch.testing.assert_close(ep.module()(x), dyn(x), rtol=1e-5, atol=1e-6)


def test_onnx_export_dynamic_axes(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from torch.export import Dim

    _, dyn = pair("test_vit", {})
    prog = torch.onnx.export(
        dyn,
        (torch.randn(2, 3, 96, 128),),
        dynamo=True,
        verbose=False,
        dynamic_shapes={"x": {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}},
    )
    prog.save(str(tmp_path / "m.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    with torch.no_grad():
        for hw in [(64, 64), (80, 112), (70, 90)]:
            x = torch.randn(3, 3, *hw)
            out = torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
            torch.testing.assert_close(out, dyn(x), rtol=1e-4, atol=1e-5)


def _anysize_attributes(path, store: bool) -> set[str]:
    """The ``_anysize_*`` attributes a module of the package assigns (``store``) or reads, by name (also through
    ``getattr`` / ``setattr`` with a literal name)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_anysize_"):
            if isinstance(node.ctx, ast.Store) == store:
                found.add(node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) > 1:
            name = node.args[1]
            if isinstance(name, ast.Constant) and str(name.value).startswith("_anysize_"):
                if (node.func.id == "setattr") == store and node.func.id in ("getattr", "setattr", "hasattr"):
                    found.add(name.value)
    return found


def test_families_read_no_attribute_the_pipeline_sets():
    """What the pipeline decides at run time reaches a family through core.runtime_options, never through an
    attribute a pipeline module sets by name; the options' own attributes are named in core.runtime_options only."""
    package = Path(timm_anysize.__file__).parent
    pipeline_set = set().union(*(_anysize_attributes(p, store=True) for p in package.glob("*.py")))
    assert "_anysize_plan" in pipeline_set  # the scan sees what the pipeline sets (builder.py)
    for path in sorted((package / "families").glob("*.py")):
        read = _anysize_attributes(path, store=False) | _anysize_attributes(path, store=True)
        assert not read & pipeline_set, (path.name, sorted(read & pipeline_set))
    core_names = {"_anysize_options", "_anysize_caches"}
    for path in sorted(package.rglob("*.py")):
        if path.name != "runtime_options.py":
            assert not any(name in path.read_text() for name in core_names), path
