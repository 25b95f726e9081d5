"""A registered variant is a first-class timm model; shipped configs are valid and load."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import timm
import torch

import timm_anysize
from conftest import unique_name
from timm_anysize.apps.demo import register_demo_variants
from timm_anysize.core.spec import parse_variant
from timm_anysize.plan import made_plan, make_plan
from timm_anysize.pretrained_cfg import spec_pretrained_cfg, variant_pretrained_cfg
from timm_anysize.registry import _shipped_config_files

SEED = "vit_tiny_patch4_64"


def test_seed_variant_is_a_timm_model():
    assert SEED in timm.list_models()
    assert SEED in timm.list_models("vit_tiny_patch4*")
    assert "vit_tiny_patch4_64.augreg_in21k_ft_in1k" in timm.list_pretrained("vit_tiny_patch4*")
    assert timm.is_model_pretrained(SEED)
    assert SEED in timm.list_models(module="variants")
    cfg = timm.models.get_pretrained_cfg(SEED)
    assert cfg.input_size == (1, 64, 64) and cfg.mean == (0.5,) and cfg.num_classes == 10
    assert cfg.hf_hub_id == "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k" and cfg.custom_load is False
    assert cfg.fixed_input_size is False  # dynamic by default
    m = timm.create_model(SEED)
    assert m.patch_embed.grid_size == (16, 16) and m.patch_embed.proj.in_channels == 1
    assert timm.data.resolve_data_config(model=m) == {
        "input_size": (1, 64, 64),
        "interpolation": "bicubic",
        "mean": (0.5,),
        "std": (0.5,),
        "crop_pct": 0.9,
        "crop_mode": "center",
    }


def test_tagged_name_creates_the_variant():
    m = timm.create_model(f"{SEED}.augreg_in21k_ft_in1k")
    assert m.pretrained_cfg["tag"] == "augreg_in21k_ft_in1k" and m.pretrained_cfg["architecture"] == SEED


SHIPPED_AND_DEMO = sorted(
    {*timm_anysize.list_variants(), *register_demo_variants()}
    - {n for n in timm_anysize.list_variants() if n.startswith("t_")}
)


@pytest.mark.parametrize("name", SHIPPED_AND_DEMO)
def test_shipped_variants_build_at_their_geometry(name):
    """Like timm's test_models: every shipped variant builds on meta and reports its own geometry."""
    spec = timm_anysize.get_variant(name)
    plan = make_plan(spec)
    with torch.device("meta"):
        m = timm.create_model(name)
    c, h, w = m.pretrained_cfg["input_size"]
    assert (h, w) == plan.target.img_size and c == plan.target.in_chans
    assert len(m.pretrained_cfg["mean"]) == c == len(m.pretrained_cfg["std"])
    assert m.pretrained_cfg["first_conv"] and m.pretrained_cfg["classifier"]
    assert timm.is_model_pretrained(name)


def test_shipped_configs_are_installed_with_the_package():
    files = [p.name for p in _shipped_config_files()]
    assert "vit.yaml" in files


def test_kwargs_override_the_spec():
    m = timm.create_model(SEED, num_classes=3, img_size=32, in_chans=2)
    assert m.pretrained_cfg["input_size"] == (2, 32, 32) and m.num_classes == 3
    assert m(torch.randn(1, 2, 32, 32)).shape == (1, 3)


def test_register_variant_data_overrides():
    name = timm_anysize.register_variant(
        unique_name(),
        base="test_vit",
        in_chans=2,
        img_size=32,
        patch_size=8,
        data={"mean": [0.1, 0.2], "std": [0.3], "crop_pct": 1.0, "interpolation": "bilinear"},
        card={"label_names": ["a", "b"], "license": "mit"},
        num_classes=2,
    )
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.mean == (0.1, 0.2) and cfg.std == (0.3, 0.3) and cfg.crop_pct == 1.0
    assert cfg.interpolation == "bilinear" and cfg.label_names == ("a", "b") and cfg.license == "mit"


def test_env_var_configs_register_on_import(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("variants:\n  env_vit_a:\n    base: test_vit\n    img_size: 32\n")
    b.write_text("variants:\n  env_vit_b:\n    base: test_vit\n    img_size: 48\n")
    code = textwrap.dedent("""
        import timm, timm_anysize
        print(timm.create_model('env_vit_a').pretrained_cfg['input_size'], timm.is_model('env_vit_b'))
    """)
    env = {**os.environ, "TIMM_ANYSIZE_CONFIGS": f"{a}{os.pathsep}{b}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(3, 32, 32) True"


def test_an_unknown_name_is_a_registration_error_with_a_did_you_mean(tmp_path):
    with pytest.raises(timm_anysize.RegistrationError) as info:
        timm_anysize.get_variant("vit_tiny_patch4_46")
    expected = str(info.value)
    assert expected.startswith("'vit_tiny_patch4_46' is not a timm-anysize variant; did you mean vit_tiny_patch4_64")
    assert expected.endswith("?")
    with pytest.raises(timm_anysize.RegistrationError) as info:  # before anything is built or written
        timm_anysize.export("vit_tiny_patch4_46", tmp_path / "out")
    assert str(info.value) == expected and not (tmp_path / "out").exists()
    with pytest.raises(timm_anysize.RegistrationError) as info:
        timm_anysize.get_variant("zzzz")
    assert str(info.value) == "'zzzz' is not a timm-anysize variant; list_variants() names them"


def _grid(name: str) -> tuple[int, int]:
    with torch.device("meta"):
        return timm.create_model(name).patch_embed.grid_size


def test_a_changed_spec_is_refused_by_default_and_replaced_with_overwrite():
    name = timm_anysize.register_variant(unique_name(), base="test_vit", img_size=64, patch_size=8)
    assert _grid(name) == (8, 8)
    with pytest.raises(timm_anysize.RegistrationError) as info:
        timm_anysize.register_variant(name, base="test_vit", img_size=64, patch_size=16)
    assert str(info.value) == (
        f"<dict>: {name}: the name is already registered with a different spec (from <dict>); rename one of them, "
        "or pass overwrite=True to replace it"
    )
    assert _grid(name) == (8, 8)  # the refusal changed nothing
    old = timm_anysize.get_variant(name)
    assert made_plan(old) is not None
    assert timm_anysize.register_variant(name, base="test_vit", img_size=64, patch_size=16, overwrite=True) == name
    assert made_plan(old) is None  # the replaced spec's cached plan is dropped
    assert timm_anysize.get_variant(name).patch_size == (16, 16)
    assert _grid(name) == (4, 4)  # timm's entrypoint builds the new spec
    assert timm.models.get_pretrained_cfg(name).input_size == (3, 64, 64)
    assert timm_anysize.list_variants().count(name) == 1 and timm.list_models(name) == [name]


def test_register_yaml_overwrite_replaces_registered_unplanned_and_its_cfg(tmp_path):
    """A file registered unplanned (as $TIMM_ANYSIZE_CONFIGS is), edited and registered again with overwrite: the
    new spec's cfg is timm's, and its first create_model plans the new spec (no stale plan or cfg)."""
    name = unique_name()
    path = tmp_path / "v.yaml"
    path.write_text(f"variants:\n  {name}:\n    base: test_vit\n    img_size: 32\n    in_chans: 1\n")
    timm_anysize.register_yaml(path, validate=False)
    assert timm.models.get_pretrained_cfg(name).input_size == (1, 32, 32)
    path.write_text(f"variants:\n  {name}:\n    base: test_vit\n    img_size: 48\n    in_chans: 2\n")
    with pytest.raises(timm_anysize.RegistrationError, match="pass overwrite=True to replace it"):
        timm_anysize.register_yaml(path)
    assert timm_anysize.register_yaml(path, overwrite=True) == [name]
    assert timm.models.get_pretrained_cfg(name).input_size == (2, 48, 48)
    m = timm.create_model(name)
    assert m.pretrained_cfg["input_size"] == (2, 48, 48) and m.patch_embed.grid_size == (3, 3)


def test_overwrite_still_refuses_timm_models_and_two_specs_of_one_name():
    with pytest.raises(timm_anysize.RegistrationError, match="collides with timm's built-in model 'test_vit'"):
        timm_anysize.register_variant("test_vit", base="test_vit", img_size=32, overwrite=True)
    name = unique_name()
    specs = [parse_variant(name, {"base": "test_vit", "img_size": size}) for size in (32, 48)]
    with pytest.raises(timm_anysize.RegistrationError, match="the name is given twice with different specs"):
        timm_anysize.register_specs(specs, overwrite=True)
    assert name not in timm_anysize.list_variants()


def test_unregister_removes_the_variant_from_timm():
    name = timm_anysize.register_variant(unique_name(), base="test_vit", img_size=32, patch_size=8)
    assert timm.list_models(name) == [name] and timm.list_pretrained(f"{name}*")
    spec = timm_anysize.get_variant(name)
    timm_anysize.unregister(name)
    assert name not in timm_anysize.list_variants() and made_plan(spec) is None
    assert timm.list_models(name) == [] and timm.list_pretrained(f"{name}*") == [] and not timm.is_model(name)
    with pytest.raises(RuntimeError, match=f"Unknown model \\({name}\\)"):
        timm.create_model(name)
    with pytest.raises(timm_anysize.RegistrationError, match=f"{name!r} is not a timm-anysize variant"):
        timm_anysize.unregister(name)
    # the name is free again: registering it anew is not a change of spec
    assert timm_anysize.register_variant(name, base="test_vit", img_size=48, patch_size=8) == name
    assert _grid(name) == (6, 6)


def test_an_unknown_create_model_kwarg_is_a_type_error_as_for_timm_models():
    """timm's API contract (its test_models.py checks it): an unknown call-time kwarg is the caller's TypeError."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_a_model_arg'"):
        timm.create_model("test_vit", not_a_model_arg=1)  # timm's own behaviour, the reference
    name = timm_anysize.register_variant(unique_name(), base="test_vit", img_size=64, patch_size=8)
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_a_model_arg'") as info:
        timm.create_model(name, not_a_model_arg=1)
    assert not isinstance(info.value, timm_anysize.SpecError)


def test_spec_errors_stay_spec_errors():
    with pytest.raises(
        timm_anysize.SpecError,
        match=r"model_args: .*unexpected keyword argument 'not_an_arg'|"
        r"cannot build test_vit .*not_an_arg",
    ):
        timm_anysize.register_variant(unique_name(), base="test_vit", img_size=64, model_args={"not_an_arg": 1})
    name = timm_anysize.register_variant(unique_name(), base="test_vit", img_size=64, patch_size=8)
    with pytest.raises(timm_anysize.SpecError, match="must divide the target img_size"):
        timm.create_model(name, img_size=60)  # a geometry the variant cannot take is a spec error, as at validation


SWIN_TINY = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4)


@pytest.mark.parametrize("base", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "swinv2_cr_tiny_224"])
@pytest.mark.parametrize("img_size", [[64, 96], 136])
def test_pool_size_is_the_feature_map_of_a_forward_at_the_variant_size(base, img_size):
    name = timm_anysize.register_variant(unique_name(), base=base, img_size=img_size, in_chans=1, model_args=SWIN_TINY)
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, *cfg["input_size"]))
    spatial = timm.layers.get_spatial_dim(getattr(model, "output_fmt", "NCHW"))
    assert cfg["pool_size"] == tuple(out.shape[d] for d in spatial)
    assert cfg["pool_size"] != timm.models.get_pretrained_cfg(base).pool_size
    assert cfg["fixed_input_size"] is False  # it runs at any size


def test_pool_size_follows_a_call_time_img_size():
    name = timm_anysize.register_variant(
        unique_name(), base="swin_tiny_patch4_window7_224", img_size=64, model_args=SWIN_TINY
    )
    assert timm.create_model(name, img_size=(128, 96)).pretrained_cfg["pool_size"] == (4, 3)


def test_test_and_min_input_size_are_scaled_to_the_variant():
    """No supported base has them in timm today, so the plan's base cfg is given them."""
    from timm_anysize.pretrained_cfg import variant_pretrained_cfg

    name = unique_name()
    spec = timm_anysize.core.spec.parse_variant(
        name,
        {
            "base": "vit_base_patch16_clip_224.openai_ft_in12k_in1k",
            "img_size": [112, 224],
            "in_chans": 1,
            "model_args": {"embed_dim": 64, "depth": 1, "num_heads": 2},
        },
    )
    plan = make_plan(spec)
    cfg = variant_pretrained_cfg(
        dataclasses.replace(
            plan,
            base_cfg=dict(plan.base_cfg, test_input_size=(3, 256, 256), min_input_size=(3, 64, 64), test_crop_pct=1.0),
        )
    )
    assert cfg["test_input_size"] == (1, 128, 256)  # x 112/224 and 224/224, whole patches of 16
    assert cfg["min_input_size"] == (1, 32, 64)
    assert cfg["test_crop_pct"] == 1.0
    plain = variant_pretrained_cfg(plan)
    assert "test_input_size" not in plain and "min_input_size" not in plain and "pool_size" not in plain


def test_a_fixed_size_variant_says_so_and_a_dynamic_one_does_not():
    fixed = timm_anysize.register_variant(unique_name(), base="test_vit", img_size=64, dynamic=False)
    dynamic = timm_anysize.register_variant(unique_name(), base="test_vit", img_size=64)
    assert timm.create_model(fixed).pretrained_cfg["fixed_input_size"] is True
    assert timm.create_model(dynamic).pretrained_cfg["fixed_input_size"] is False


# --- nothing built at import ------------------------------------------------------------------------------------


def test_import_builds_no_model():
    """``import timm_anysize`` registers the shipped variants from their specs: no timm model (meta or not) and no
    torch module is built, and the demo's digits variants are not registered."""
    code = textwrap.dedent("""
        import torch.nn as nn, timm
        built, modules = [], [0]
        real_create, real_init = timm.create_model, nn.Module.__init__
        def create_model(*args, **kwargs):
            built.append(args[0] if args else kwargs.get("model_name"))
            return real_create(*args, **kwargs)
        def init(self, *args, **kwargs):
            modules[0] += 1
            real_init(self, *args, **kwargs)
        timm.create_model, nn.Module.__init__ = create_model, init
        import timm_anysize
        print(built, modules[0], len(timm_anysize.list_variants()) > 0, timm.is_model("vit_digits_patch4_32"))
        cfg = timm.models.get_pretrained_cfg("vit_tiny_patch4_64")
        print(cfg.input_size, cfg.fixed_input_size, built)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[] 0 True False", "(1, 64, 64) False []"], out


@pytest.mark.parametrize("name", SHIPPED_AND_DEMO)
def test_the_cfg_registered_before_the_plan_is_the_plans(name):
    """What ``get_pretrained_cfg`` / ``resolve_data_config`` give before a variant is built (from the spec alone) is
    what its plan gives, except what only a built model tells (pool_size, the grid in the description)."""
    spec = timm_anysize.get_variant(name)
    early, planned = spec_pretrained_cfg(spec), variant_pretrained_cfg(make_plan(spec))
    for key in ("pool_size", "description"):
        early.pop(key, None), planned.pop(key, None)
    assert early == planned


def _geometry_error_file(tmp_path) -> tuple[Path, str]:
    name = unique_name("late")
    path = tmp_path / "late.yaml"
    path.write_text(f"variants:\n  {name}:\n    base: test_vit\n    img_size: 60\n")  # patch 16 does not divide 60
    return path, name


def test_a_geometry_error_of_an_import_time_file_is_raised_at_create_model_and_by_check(tmp_path):
    path, name = _geometry_error_file(tmp_path)
    with pytest.raises(timm_anysize.SpecError) as eager:  # what a validating registration raises
        timm_anysize.register_yaml(path)
    message = str(eager.value)
    assert message == (
        f"{path}: {name}.img_size: the target patch size [16, 16] must divide the target img_size "
        f"[60, 60]; pick a multiple of the patch"
    )
    code = textwrap.dedent(f"""
        import timm, timm_anysize
        assert timm.is_model({name!r})
        for _ in range(2):  # a failed plan is not cached: the error comes again
            try:
                timm.create_model({name!r})
            except timm_anysize.SpecError as e:
                print(e)
    """)
    env = {**os.environ, "TIMM_ANYSIZE_CONFIGS": str(path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [message, message]
    check = subprocess.run(
        [sys.executable, "-m", "timm_anysize", "check", str(path)], env=env, capture_output=True, text=True
    )
    assert check.returncode == 1 and check.stderr.strip() == message


def test_a_schema_error_of_an_import_time_file_is_one_warning_line_and_breaks_no_import(tmp_path):
    """A broken $TIMM_ANYSIZE_CONFIGS file: the import goes on (the CLI's --help too), its variants are not
    registered, and one line names the file and the key."""
    path = tmp_path / "typo.yaml"
    path.write_text("variants:\n  typo_vit:\n    base: test_vit\n    img_sise: 64\n")
    env = {**os.environ, "TIMM_ANYSIZE_CONFIGS": str(path)}
    code = "import timm, timm_anysize; print(timm.is_model('typo_vit'), timm.is_model('vit_tiny_patch4_64'))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "False True\n", proc.stderr[-2000:]
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith(f"$TIMM_ANYSIZE_CONFIGS: {path}: typo_vit.img_sise: unknown key; did you mean")
    assert proc.stderr.endswith("(its variants are not registered)\n")


def test_registering_unplanned_defers_the_plan_and_registering_again_validates(tmp_path):
    path, name = _geometry_error_file(tmp_path)
    assert timm_anysize.register_yaml(path, validate=False) == [name]
    assert timm.models.get_pretrained_cfg(name).input_size == (3, 60, 60)
    with pytest.raises(timm_anysize.SpecError, match="must divide the target img_size"):
        timm.create_model(name)
    with pytest.raises(timm_anysize.SpecError, match="must divide the target img_size"):
        timm_anysize.register_yaml(path)  # the same file, registered validating: planned now


def test_the_first_create_model_completes_the_registered_cfg(tmp_path):
    name = timm_anysize.register_specs(
        [
            timm_anysize.core.spec.parse_variant(
                unique_name(), {"base": "swin_tiny_patch4_window7_224", "img_size": 64, "model_args": SWIN_TINY}
            )
        ],
        validate=False,
    )[0]
    assert timm.models.get_pretrained_cfg(name).pool_size is None  # a forward at the variant's size tells it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm's "Overwriting ... in registry" is not for users to see
        model = timm.create_model(name)
    registered = timm.models.get_pretrained_cfg(name)
    assert registered.pool_size == model.pretrained_cfg["pool_size"] == (2, 2)
    assert registered.description == model.pretrained_cfg["description"]
    assert timm.list_models(name) == [name] and timm.list_pretrained(name + "*") == [f"{name}.anysize"]


def test_the_registered_cfg_never_has_sizes_the_plan_would_change(tmp_path):
    # Gemma 4's base cfg has a min_input_size; the spec leaves the patch to the base, so whole-patch sizes wait for
    # the plan: before it they are absent (never rounded to 1 px), after validate_variant they are the model's.
    args = {"depth": 1, "embed_dim": 64, "num_heads": 2, "head_dim": 32, "intermediate_size": 128}
    spec = timm_anysize.core.spec.parse_variant(
        unique_name(), {"base": "gemma4_vit_167m", "img_size": [96, 144], "in_chans": 1, "model_args": args}
    )
    (name,) = timm_anysize.register_specs([spec], validate=False)
    assert timm.models.get_pretrained_cfg(name).min_input_size is None
    timm_anysize.validate_variant(name)
    planned = timm.models.get_pretrained_cfg(name)
    assert planned.min_input_size == variant_pretrained_cfg(make_plan(spec))["min_input_size"]
    assert all(s % 16 == 0 for s in planned.min_input_size[1:]), planned.min_input_size
    assert timm.create_model(name).pretrained_cfg["min_input_size"] == planned.min_input_size
