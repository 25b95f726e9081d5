"""The position-embedding families under TorchScript, FX, forward_intermediates at any size, torch.compile,
torch.export and ONNX: each equals the eager dynamic model (a registered variant, and ``enable_dynamic`` on a timm
model) at the variant's size and at other, non-square sizes."""

from __future__ import annotations

import copy
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

NAMES = ("vit", "vit_hybrid", "deit_distilled", "eva", "beit", "cait", "pit", "volo", "crossvit", "hiera")
FAMS = [f for f in FAMILIES if f.name in NAMES]
ids = [f.name for f in FAMS]


def sizes(name: str) -> list[tuple[int, int]]:
    """The variant's (non-square) size, then two other non-square sizes (the last not whole patches where the
    family pads)."""
    s = SETUP[name]
    own = (s.size + s.step, s.size)
    if name == "crossvit":  # branch sizes follow the input: any size runs
        return [own, (360, 240), (200, 280)]
    return [own, (own[0] + 2 * s.step, own[1] + s.step), (own[0] - s.step, own[1] + 2 * s.step + 1)]


@functools.lru_cache(maxsize=None)
def checkpoint(name: str, tmp: str) -> str:
    fam = next(f for f in FAMS if f.name == name)
    s = SETUP[name]
    torch.manual_seed(0)
    model = timm.create_model(fam.example, img_size=s.size, **s.args).eval()
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialized position embeddings: resampling must show
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
    """A dynamic variant, and enable_dynamic on a plain timm model with the same weights."""
    fam = next(f for f in FAMS if f.name == name)
    s = SETUP[name]
    var = timm.create_model(variant(name, ckpt_dir), pretrained=True).eval()
    plain = timm.create_model(fam.example, img_size=s.size, **s.args, **fam.dynamic_kwargs(True, True)).eval()
    plain.load_state_dict(torch.load(checkpoint(name, ckpt_dir), weights_only=True))
    return [var, timm_anysize.enable_dynamic(plain)]


def inputs(name: str, n: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, *hw, generator=gen) for hw in sizes(name)[:n]]


@pytest.mark.parametrize("fam", FAMS, ids=ids)
def test_torchscript_equals_eager(fam, ckpt_dir):
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


@pytest.mark.parametrize("fam", FAMS, ids=ids)
def test_fx_feature_model_equals_eager_modules(fam, ckpt_dir):
    """``features_only=True, feature_cls='fx'``: each feature is the eager dynamic model's module output."""
    name = variant(fam.name, ckpt_dir)
    indices = (0,) if fam.name in ("vit_hybrid", "crossvit") else (0, 1)  # depth 1; CrossViT: a block per branch
    feats = timm.create_model(name, pretrained=True, features_only=True, feature_cls="fx", out_indices=indices).eval()
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
            for m, f in zip(modules, got):  # a module returning several tensors (PiT, CrossViT) gives one of them
                assert any(f.shape == o.shape and torch.equal(f, o) for o in seen[m]), (m, tuple(x.shape))


@pytest.mark.parametrize("fam", [f for f in FAMS if f.name in ("beit", "cait", "pit", "volo", "hiera", "crossvit")],
                         ids=lambda f: f.name)
def test_forward_intermediates_at_another_size_equal_a_model_built_for_it(fam, ckpt_dir):
    """At a size other than the variant's, intermediates equal those of a timm model built at that size with the
    variant's weights resampled to it (a static variant of the variant's weights at that size)."""
    own, other = sizes(fam.name)[:2]
    dynamic = timm.create_model(variant(fam.name, ckpt_dir), pretrained=True).eval()
    weights = f"{ckpt_dir}/{fam.name}_variant.pt"  # the variant's own weights, resampled once more to `other`
    torch.save(dynamic.state_dict(), weights)
    built_name = timm_anysize.register_variant(
        unique_name(), base=fam.example, model_args=SETUP[fam.name].args, img_size=list(other), dynamic=False,
        pretrained={"file": weights, "img_size": list(own)},
    )
    built = timm.create_model(built_name, pretrained=True).eval()
    assert type(built).__module__.startswith("timm.")
    x = torch.randn(2, 3, *other)
    with torch.no_grad():
        ours = dynamic.forward_intermediates(x)
        theirs = built.forward_intermediates(x)
    (final, inter), (final_built, inter_built) = ours, theirs
    finals = zip([final], [final_built]) if isinstance(final, torch.Tensor) else zip(final, final_built)  # CrossViT
    assert all(torch.equal(a, b) for a, b in finals)
    assert len(inter) == len(inter_built) > 0 and all(torch.equal(a, b) for a, b in zip(inter, inter_built))


# torch.compile(dynamic=True), torch.export with dynamic H/W and ONNX: three sizes each.


@pytest.mark.parametrize("fam", [f for f in FAMS if f.name != "hiera"], ids=lambda f: f.name)  # see its export_note
def test_compile_dynamic_equals_eager(fam, ckpt_dir):
    model = models(fam.name, ckpt_dir)[0]
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True, backend="eager")
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
            torch.testing.assert_close(program(x), expected, rtol=1e-5, atol=1e-5)
            out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_a_family_that_cannot_export_says_why(ckpt_dir):
    """CrossViT's export stops on its branch-size guard; Hiera's does not finish (not run here)."""
    noted = {f.name for f in FAMS if f.export_note}
    assert noted == {"crossvit", "hiera"}
    assert all(f"no: {f.export_note}" in timm_anysize.families.families_markdown() for f in FAMS if f.export_note)
    with pytest.raises(torch._dynamo.exc.UserError, match="Constraints violated"):
        _exported(models("crossvit", ckpt_dir)[0], "crossvit")
