"""The window / stage families under TorchScript, FX, forward_intermediates at any size, torch.compile, torch.export
and ONNX: each equals the eager dynamic model (a registered variant, and ``enable_dynamic`` on a timm model -- or,
for the families that timm itself makes dynamic, the timm model) at the variant's size and at other, non-square
sizes (Swin: also sizes whose windows need padding)."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from conftest import unique_name
from test_families import SETUP
from timm.layers import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import timm_anysize
from timm_anysize.families import FAMILIES

NAMES = ("swin", "swinv2", "swinv2_cr", "levit", "mvitv2", "twins", "xcit", "naflexvit")
FAMS = [f for f in FAMILIES if f.name in NAMES]
ids = [f.name for f in FAMS]


def sizes(name: str) -> list[tuple[int, int]]:
    """The variant's (non-square) size, then two other non-square sizes (the last not whole patches; for Swin the
    windows of the first stages need padding at every one)."""
    s = SETUP[name]
    own = (s.size + s.step, s.size)
    return [own, (own[0] + 2 * s.step, own[1] + s.step), (own[0] - s.step, own[1] + 2 * s.step + 1)]


@functools.lru_cache(maxsize=None)
def checkpoint(name: str, tmp: str) -> str:
    fam = next(f for f in FAMS if f.name == name)
    s = SETUP[name]
    torch.manual_seed(0)
    model = timm.create_model(fam.example, img_size=s.size, **s.args).eval()
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialized tables: resampling must show
            p.add_(torch.randn_like(p) * 0.02)
    path = f"{tmp}/{name}.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ckpt"))


def variant(name: str, ckpt_dir: str, img_size=None, **kwargs) -> str:
    fam = next(f for f in FAMS if f.name == name)
    s = SETUP[name]
    return timm_anysize.register_variant(
        unique_name(), base=fam.example, model_args=s.args, img_size=list(img_size or sizes(name)[0]),
        pretrained={"file": checkpoint(name, ckpt_dir), "img_size": s.size}, **kwargs,
    )


def models(name: str, ckpt_dir: str) -> list[torch.nn.Module]:
    """A dynamic variant, and enable_dynamic on a plain timm model with the same weights (the families timm makes
    dynamic itself: the timm model built with its own dynamic arguments)."""
    fam = next(f for f in FAMS if f.name == name)
    s = SETUP[name]
    var = timm.create_model(variant(name, ckpt_dir), pretrained=True).eval()
    plain = timm.create_model(fam.example, img_size=s.size, **s.args, **fam.dynamic_kwargs(True, True)).eval()
    plain.load_state_dict(torch.load(checkpoint(name, ckpt_dir), weights_only=True))
    return [var, plain if fam.dynamic == "native" else timm_anysize.enable_dynamic(plain)]


def inputs(name: str, n: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, *hw, generator=gen) for hw in sizes(name)[:n]]


@pytest.mark.parametrize("fam", FAMS, ids=ids)
def test_torchscript_equals_eager(fam, ckpt_dir):
    if fam.name == "naflexvit":  # timm's own NaFlexViT does not script (its test suite excludes '*naflex*')
        with pytest.raises(torch.jit.frontend.NotSupportedError, match="keyword-arg expansion"):
            torch.jit.script(models(fam.name, ckpt_dir)[1])
        return
    for model in models(fam.name, ckpt_dir):
        scripted = torch.jit.script(model)
        with torch.no_grad():
            for x in inputs(fam.name):
                assert torch.equal(scripted(x), model(x)), (type(model).__name__, tuple(x.shape))


def fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """timm's test harness ``_create_fx_model`` (eval): trace with timm's notrace registry, return the last node."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("fam", FAMS, ids=ids)
def test_fx_trace_equals_eager(fam, ckpt_dir):
    for model in models(fam.name, ckpt_dir):
        traced = fx_model(model)
        with torch.no_grad():
            for x in inputs(fam.name):
                (out,) = traced(x).values()
                assert torch.equal(out, model(x)), (type(model).__name__, tuple(x.shape))


def _feature_indices(name: str) -> tuple:
    return (0, 1) if name in ("levit", "xcit", "naflexvit") else (0, 1, 2)


# timm's Twins names its feature modules 'block.k' (the modules are 'blocks.k'): plain timm's own fx/hook feature
# extractors fail on it too (pinned below), so Twins has no fx feature model to compare.
FX_FEATURE_FAMS = [f for f in FAMS if f.name != "twins"]


def test_timm_twins_feature_info_names_modules_that_do_not_exist():
    model = timm.create_model("twins_pcpvt_small", pretrained=False, embed_dims=(32, 64, 128, 256),
                              depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
    assert model.feature_info[0]["module"] == "block.0"
    with pytest.raises(ValueError, match="'block.0' is not present"):
        timm.create_model("twins_pcpvt_small", pretrained=False, features_only=True, feature_cls="fx",
                          embed_dims=(32, 64, 128, 256), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))


@pytest.mark.parametrize("fam", FX_FEATURE_FAMS, ids=[f.name for f in FX_FEATURE_FAMS])
def test_fx_feature_model_equals_eager_modules(fam, ckpt_dir):
    """``features_only=True, feature_cls='fx'``: each feature is the eager dynamic model's module output."""
    name = variant(fam.name, ckpt_dir)
    feats = timm.create_model(name, pretrained=True, features_only=True, feature_cls="fx",
                              out_indices=_feature_indices(fam.name)).eval()
    assert feats.pretrained_cfg["fixed_input_size"] is False
    model = timm.create_model(name, pretrained=True).eval()
    modules = feats.feature_info.module_name()
    with torch.no_grad():
        for x in inputs(fam.name):
            seen = {}
            hooks = [model.get_submodule(m).register_forward_hook(
                lambda mod, args, out, m=m: seen.__setitem__(m, out if isinstance(out, (list, tuple)) else [out]))
                for m in modules]
            model(x)
            for h in hooks:
                h.remove()
            got = feats(x)
            assert len(got) == len(modules)
            for m, f in zip(modules, got):  # NHWC (Swin) or tokens (LeViT) come back as the module gave them
                assert any(f.shape == o.shape and torch.equal(f, o) for o in seen[m]), (m, tuple(x.shape))


def test_levit_forward_intermediates_at_another_size_equal_a_model_built_for_it(ckpt_dir):
    """At a size other than the variant's, LeViT's intermediates (and features_only) equal those of a timm model
    built at that size with the variant's weights resampled to it (a static variant of them at that size)."""
    own, other = sizes("levit")[:2]
    dynamic = timm.create_model(variant("levit", ckpt_dir), pretrained=True).eval()
    weights = f"{ckpt_dir}/levit_variant.pt"  # the variant's own weights, resampled once more to `other`
    torch.save(dynamic.state_dict(), weights)
    built_name = timm_anysize.register_variant(
        unique_name(), base="levit_128s", model_args=SETUP["levit"].args, img_size=list(other), dynamic=False,
        pretrained={"file": weights, "img_size": list(own)},
    )
    built = timm.create_model(built_name, pretrained=True).eval()
    assert type(built).__module__.startswith("timm.")
    x = torch.randn(2, 3, *other)
    with torch.no_grad():
        final, inter = dynamic.forward_intermediates(x)
        final_built, inter_built = built.forward_intermediates(x)
        feats = timm.create_model(variant("levit", ckpt_dir), pretrained=True, features_only=True).eval()(x)
    assert torch.equal(final, final_built)
    assert len(inter) == len(inter_built) == 3 and all(torch.equal(a, b) for a, b in zip(inter, inter_built))
    assert len(feats) == 3 and all(torch.equal(a, b) for a, b in zip(feats, inter))


@pytest.mark.parametrize("fam", FAMS, ids=ids)
def test_forward_intermediates_run_at_other_sizes(fam, ckpt_dir):
    """Every family's forward_intermediates runs at a size other than the variant's, its last feature the one
    forward_features gives there (timm's contract)."""
    model = models(fam.name, ckpt_dir)[0]
    x = inputs(fam.name)[1]
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
    assert len(inter) > 0 and all(torch.isfinite(t).all() for t in inter)


# torch.compile(dynamic=True), torch.export with dynamic H/W and ONNX: three sizes each.


# The Swin families' export_note: symbolic H x W does not finish; they compile one graph per size.
STATIC_COMPILE = ("swin", "swinv2", "swinv2_cr")


@pytest.mark.parametrize("fam", FAMS, ids=ids)
def test_compile_dynamic_equals_eager(fam, ckpt_dir):
    model = models(fam.name, ckpt_dir)[0]
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=fam.name not in STATIC_COMPILE, backend="eager")
    with torch.no_grad():
        for x in inputs(fam.name, 3):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def _exported(model: torch.nn.Module, name: str):
    from torch.export import Dim, export

    return export(model, (inputs(name, 2)[1],), dynamic_shapes={"x": {2: Dim.DYNAMIC, 3: Dim.DYNAMIC}})


@pytest.mark.parametrize("fam", [f for f in FAMS if not f.export_note], ids=lambda f: f.name)
def test_torch_export_and_onnx_dynamic_height_width(fam, ckpt_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from torch.export import Dim

    model = models(fam.name, ckpt_dir)[0]
    program = _exported(model, fam.name).module()
    onnx = torch.onnx.export(model, (inputs(fam.name, 2)[1],), dynamo=True, verbose=False,
                             dynamic_shapes={"x": {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}})
    onnx.save(str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for x in inputs(fam.name, 3):
            expected = model(x)
            torch.testing.assert_close(program(x), expected, rtol=1e-4, atol=1e-5)
            out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
