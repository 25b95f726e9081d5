"""The harness shared by the TorchScript / FX / compile / export test modules (``test_script_fx_*.py``).

Each family of :data:`timm_anysize.families.FAMILIES` is exercised on the tiny model its row declares (``Family.tiny``):
a seeded checkpoint at the setup's size, a registered variant at a non-square size loading it, and a plain timm
model with the same weights made dynamic (``enable_dynamic``, or timm's own arguments where timm is dynamic itself).
The checks compare each to its eager self, bit for bit where the operations are the same.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import timm_anysize
from conftest import tiny_arch, unique_name
from timm_anysize.apps.docs import families_markdown
from timm_anysize.core.family import Family
from timm_anysize.families import FAMILIES


def family(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


def group(script_fx: str) -> list[Family]:
    """The rows that tests/test_script_fx_<script_fx>.py checks (``TinyModel.script_fx``)."""
    return [f for f in FAMILIES if f.tiny is not None and f.tiny.script_fx == script_fx]


def cells(fams: list[Family], skip: Callable[[Family], str] = lambda f: "") -> list:
    """One test cell per row, skipped with the row's reason where ``skip(row)`` gives one."""
    return [pytest.param(f, id=f.name, marks=[pytest.mark.skip(reason=skip(f))] if skip(f) else []) for f in fams]


def sizes(name: str) -> list[tuple[int, int]]:
    """The variant's (non-square) size, then two other non-square sizes (the last not whole patches where the
    family pads; for Swin the windows of the first stages need padding at every one), or the row's
    ``other_sizes``."""
    s = family(name).tiny
    own = (s.img_size + s.step, s.img_size)
    if s.other_sizes:
        return [own, *s.other_sizes]
    return [own, (own[0] + 2 * s.step, own[1] + s.step), (own[0] - s.step, own[1] + 2 * s.step + 1)]


@functools.lru_cache(maxsize=None)
def checkpoint(name: str, tmp: str) -> str:
    """A seeded checkpoint of the family's tiny setup, every parameter perturbed (no zero-initialized position
    embeddings or tables: resampling must show)."""
    s = family(name).tiny
    torch.manual_seed(0)
    model = timm.create_model(tiny_arch(family(name)), img_size=s.img_size, **s.model_args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = f"{tmp}/{name}.pt"
    torch.save(model.state_dict(), path)
    return path


def variant(name: str, ckpt_dir: str, img_size=None, **kwargs) -> str:
    """A registered variant at ``img_size`` (default: the first of :func:`sizes`) loading :func:`checkpoint`."""
    s = family(name).tiny
    return timm_anysize.register_variant(
        unique_name(),
        base=tiny_arch(family(name)),
        model_args=s.model_args,
        img_size=list(img_size or sizes(name)[0]),
        pretrained={"file": checkpoint(name, ckpt_dir), "img_size": s.img_size},
        **kwargs,
    )


def models(name: str, ckpt_dir: str) -> list[torch.nn.Module]:
    """A dynamic variant, and enable_dynamic on a plain timm model with the same weights (the families timm makes
    dynamic itself: the timm model built with its own dynamic arguments)."""
    fam = family(name)
    s = fam.tiny
    var = timm.create_model(variant(name, ckpt_dir), pretrained=True).eval()
    plain = timm.create_model(
        tiny_arch(fam), img_size=s.img_size, **s.model_args, **fam.dynamic_kwargs(True, True)
    ).eval()
    plain.load_state_dict(torch.load(checkpoint(name, ckpt_dir), weights_only=True))
    return [var, plain if fam.dynamic == "native" else timm_anysize.enable_dynamic(plain)]


def inputs(name: str, n: int = 2) -> list[torch.Tensor]:
    """Seeded batches at the first ``n`` of :func:`sizes`."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, *hw, generator=gen) for hw in sizes(name)[:n]]


def fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """timm's test harness ``_create_fx_model`` (eval): trace with timm's notrace registry, return the last node."""
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs
    )


def assert_scripted_equals_eager(name: str, ckpt_dir: str, n: int = 2) -> None:
    """The scripted models equal eager at the first ``n`` of :func:`sizes`; where the row's ``script_error`` says
    timm's own model does not script, TorchScript raises that on it."""
    error = family(name).tiny.script_error
    if error:
        with pytest.raises(torch.jit.frontend.NotSupportedError, match=error):
            torch.jit.script(models(name, ckpt_dir)[1])
        return
    for model in models(name, ckpt_dir):
        scripted = torch.jit.script(model)
        with torch.no_grad():
            for x in inputs(name, n):
                assert torch.equal(scripted(x), model(x)), (type(model).__name__, tuple(x.shape))


def assert_fx_equals_eager(name: str, ckpt_dir: str, n: int = 2) -> None:
    for model in models(name, ckpt_dir):
        traced = fx_model(model)
        with torch.no_grad():
            for x in inputs(name, n):
                (out,) = traced(x).values()
                assert torch.equal(out, model(x)), (type(model).__name__, tuple(x.shape))


def assert_fx_features_equal_module_outputs(name: str, ckpt_dir: str, out_indices: tuple, n: int = 2) -> None:
    """``features_only=True, feature_cls='fx'``: each feature is the eager dynamic model's module output (one of
    them where a module returns several: PiT, CrossViT, TNT; NHWC or tokens as the module gives them)."""
    variant_name = variant(name, ckpt_dir)
    feats = timm.create_model(
        variant_name, pretrained=True, features_only=True, feature_cls="fx", out_indices=out_indices
    ).eval()
    assert feats.pretrained_cfg["fixed_input_size"] is False
    model = timm.create_model(variant_name, pretrained=True).eval()
    modules = feats.feature_info.module_name()
    with torch.no_grad():
        for x in inputs(name, n):
            seen = {}
            hooks = [
                model.get_submodule(m).register_forward_hook(
                    lambda mod, args, out, m=m, seen=seen: seen.__setitem__(
                        m, out if isinstance(out, (list, tuple)) else [out]
                    )
                )
                for m in modules
            ]
            model(x)
            for h in hooks:
                h.remove()
            got = feats(x)
            assert len(got) == len(modules)
            for m, f in zip(modules, got):
                assert any(f.shape == o.shape and torch.equal(f, o) for o in seen[m]), (m, tuple(x.shape))


def dynamic_and_built(name: str, ckpt_dir: str, other: tuple[int, int]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The dynamic variant, and a plain timm model built at ``other`` with the variant's own weights resampled
    once more to it (a static variant of them at that size)."""
    own = sizes(name)[0]
    dynamic = timm.create_model(variant(name, ckpt_dir), pretrained=True).eval()
    weights = f"{ckpt_dir}/{name}_variant.pt"
    torch.save(dynamic.state_dict(), weights)
    built_name = timm_anysize.register_variant(
        unique_name(),
        base=tiny_arch(family(name)),
        model_args=family(name).tiny.model_args,
        img_size=list(other),
        dynamic=False,
        pretrained={"file": weights, "img_size": list(own)},
    )
    built = timm.create_model(built_name, pretrained=True).eval()
    assert type(built).__module__.startswith("timm.")
    return dynamic, built


def assert_equals_built_at_another_size(name: str, ckpt_dir: str) -> None:
    """At a size other than the variant's (square where the family's ``static_unsupported`` refuses non-square
    sizes), the dynamic model's outputs, ``forward_intermediates`` (one per ``feature_info`` level) and
    ``features_only`` model (every level) equal those of a timm model built at that size with the variant's weights resampled to
    it (a static variant of them at that size), bit for bit."""
    other = sizes(name)[1]
    # ConViT: timm's GPSA takes a square grid from the token count
    if "img_non_square" in family(name).static_unsupported:
        other = (other[0], other[0])
    dynamic, built = dynamic_and_built(name, ckpt_dir, other)
    x = torch.randn(2, 3, *other)
    with torch.no_grad():
        (final, inter), (final_built, inter_built) = dynamic.forward_intermediates(x), built.forward_intermediates(x)
        assert torch.equal(dynamic(x), built(x))
    finals = zip([final], [final_built]) if isinstance(final, torch.Tensor) else zip(final, final_built)  # CrossViT
    assert all(torch.equal(a, b) for a, b in finals)
    assert len(inter) == len(inter_built) == len(dynamic.feature_info) > 0
    assert all(torch.equal(a, b) for a, b in zip(inter, inter_built))
    indices = tuple(range(len(inter)))  # every level
    feats = timm.create_model(variant(name, ckpt_dir), pretrained=True, features_only=True, out_indices=indices)
    with torch.no_grad():
        got = feats.eval()(x)
    assert len(got) == len(indices) and all(torch.equal(f, inter[i]) for f, i in zip(got, indices))


def assert_compiled_equals_eager(name: str, ckpt_dir: str, rtol: float = 1e-4) -> None:
    """``torch.compile`` (the eager backend: the graph capture is what is checked) at three sizes, each output equal
    to eager: with symbolic sizes, or one graph per size where the row's ``compile_static`` says why; at the sizes
    of :func:`sizes`, or at the row's ``compile_sizes`` in exactly one graph."""
    from torch._dynamo.utils import counters

    tiny = family(name).tiny
    at: Optional[tuple[tuple[int, int], ...]] = tiny.compile_sizes or None
    graphs = 1 if at else None
    model = models(name, ckpt_dir)[0]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, dynamic=not tiny.compile_static, backend="eager")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for x in inputs(name, 3) if at is None else [torch.randn(2, 3, *hw, generator=gen) for hw in at]:
            torch.testing.assert_close(compiled(x), model(x), rtol=rtol, atol=1e-5)
    if graphs is not None:
        assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    torch._dynamo.reset()


def exported(model: torch.nn.Module, name: str, batch: bool = False):
    """``torch.export`` with a dynamic height and width (and batch), traced at the second of :func:`sizes`."""
    from torch.export import Dim, export

    dims = {d: Dim.DYNAMIC for d in ((0, 2, 3) if batch else (2, 3))}
    return export(model, (inputs(name, 2)[1],), dynamic_shapes={"x": dims})


def assert_exports_equal_eager(name: str, ckpt_dir: str, onnx_path=None, rtol: float = 1e-4) -> None:
    """``torch.export`` (dynamic H/W) and, given a path, ONNX run in onnxruntime (dynamic N/H/W) equal the eager
    model at three sizes. One export: the ONNX program is converted from the same exported program."""
    model = models(name, ckpt_dir)[0]
    ep = exported(model, name, batch=onnx_path is not None)
    program = ep.module()
    session = None
    if onnx_path is not None:
        import onnxruntime as ort

        onnx = torch.onnx.export(ep, dynamo=True, verbose=False)
        onnx.save(str(onnx_path))
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for x in inputs(name, 3):
            expected = model(x)
            torch.testing.assert_close(program(x), expected, rtol=rtol, atol=1e-5)
            if session is not None:
                out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
                torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def assert_notes_are_documented_and_errors_raised(fams: list[Family], ckpt_dir: str) -> None:
    """Each row left out of the export checks has its reason in docs/families.md, and where the row names the
    error ``torch.export`` stops with (``export_error``), it does."""
    table = families_markdown()
    assert all(f"no: {f.export_note}" in table for f in fams if f.export_note)
    assert all(f"torch.export yes; ONNX no: {f.onnx_note}" in table for f in fams if f.onnx_note)
    assert all(f.export_note for f in fams if f.tiny.export_error)
    for fam in fams:
        if fam.tiny.export_error:
            with pytest.raises(torch._dynamo.exc.UserError, match=fam.tiny.export_error):
                exported(models(fam.name, ckpt_dir)[0], fam.name)
