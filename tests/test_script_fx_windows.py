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
