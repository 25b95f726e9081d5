"""Hostile configs and checkpoints, concurrency, resource limits, and nothing lost on failure."""

from __future__ import annotations

import hashlib
import pathlib
import struct
import threading
from pathlib import Path

import pytest
import safetensors.torch
import timm
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import timm_anysize
from conftest import unique_name
from timm_anysize.apps.demo import register_demo_variants
from timm_anysize.core.errors import AnysizeError

# --- config fuzzing --------------------------------------------------------------------------------------------

KEYS = [
    "base",
    "img_size",
    "patch_size",
    "in_chans",
    "num_classes",
    "model_args",
    "pretrained",
    "adapt",
    "data",
    "card",
    "dynamic",
    "pad",
]
SUBKEYS = {
    "pretrained": [
        "tag",
        "file",
        "hf_hub_id",
        "filename",
        "revision",
        "url",
        "img_size",
        "patch_size",
        "in_chans",
        "num_classes",
    ],
    "adapt": ["pos_embed", "patch_embed", "channels", "drop_keys", "init_keys"],
    "data": ["mean", "std", "crop_pct", "crop_mode", "interpolation"],
    "card": ["description", "license", "label_names", "datasets", "tags"],
}
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.sampled_from([0, 1, 2, 4, 7, 16, 64, 100000, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["test_vit", "vit_tiny_patch16_224", "resnet18", "nope", "../../etc/passwd", "ü∂ß", "weights.pth"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(st.sampled_from(KEYS + sum(SUBKEYS.values(), [])), st.text(max_size=6)), inner, max_size=4
        ),
    ),
    max_leaves=10,
)


@st.composite
def variant_specs(draw):
    spec = {}
    if draw(st.booleans()):
        spec["base"] = draw(
            st.sampled_from(["test_vit", "test_vit", "deit_tiny_distilled_patch16_224", "resnet18", "x"])
        )
    for key in draw(st.lists(st.sampled_from(KEYS + ["img_sise", "ünïcode", "patch"]), max_size=5)):
        if key in SUBKEYS and draw(st.booleans()):
            spec[key] = {k: draw(values) for k in draw(st.lists(st.sampled_from(SUBKEYS[key]), max_size=3))}
        elif key in ("img_size", "patch_size") and draw(st.booleans()):
            spec[key] = draw(st.one_of(st.integers(-4, 300), st.lists(st.integers(-4, 300), max_size=3)))
        else:
            spec[key] = draw(values)
    return spec


@st.composite
def yaml_documents(draw):
    """YAML text: generated variants, then text-level mutations (anchors, tags, duplicates, garbage)."""
    names = draw(
        st.lists(
            st.one_of(st.sampled_from(["fz_a", "fz_b", "vit_tiny_patch16_224", "Bad.Name", "ü"]), st.text(max_size=8)),
            min_size=1,
            max_size=3,
        )
    )
    doc = {"variants": {n: draw(variant_specs()) for n in names}}
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    mutation = draw(st.sampled_from(["none", "none", "anchor", "tag", "dup", "truncate", "toplevel", "binary"]))
    if mutation == "anchor":
        text = "common: &c {base: test_vit, img_size: 64}\n" + text.replace(
            "variants:\n", "variants:\n  fz_anchor: *c\n", 1
        )
    elif mutation == "tag":
        text = text.replace("variants:", "variants: !!python/object/apply:os.system ['touch PWNED']", 1)
    elif mutation == "dup":
        text += "variants: {}\n"
    elif mutation == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif mutation == "toplevel":
        text = draw(st.sampled_from(["[1, 2]", "42", "variants: 3", "variants: [a, b]", "{", "\t- x"]))
    elif mutation == "binary":
        text += "  fz_bin: !!binary aGVsbG8=\n"
    return text


def _fuzz_settings(pytestconfig):
    # database=None: no .hypothesis/ folder in the working directory, and no run replays another's examples
    return settings(
        max_examples=3000 if pytestconfig.getoption("--fuzz-long") else 300,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )


def test_config_fuzzing_raises_only_our_errors(pytestconfig, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    counter = iter(range(10**9))
    outcomes = {"registered": 0, "refused": 0}
    reasons: list[str] = []

    @_fuzz_settings(pytestconfig)
    @given(text=yaml_documents())
    @example(text="variants:\n  fz_a:\n    base: test_vit\n    img_size: 48\n")  # random documents rarely register
    def check(text: str) -> None:
        # Unique names per example, so successes in one example never collide with the next.
        suffix = f"_{next(counter)}"
        text = (
            text.replace("fz_a", "fz_a" + suffix)
            .replace("fz_b", "fz_b" + suffix)
            .replace("fz_anchor", "fz_anchor" + suffix)
        )
        text = text.replace("touch PWNED", f"touch {folder / 'pwned_yaml'}")  # were the tag run, it would show here
        path = folder / f"fuzz{suffix}.yaml"
        path.write_text(text, encoding="utf-8")
        before = set(timm.list_models())
        try:
            names = timm_anysize.register_yaml(path)
        except AnysizeError as e:
            msg = str(e)
            assert str(path) in msg, msg
            assert set(timm.list_models()) == before  # nothing registered from a failed file
            outcomes["refused"] += 1
            if len(reasons) < 5:
                reasons.append(msg[:300])
            return
        except BaseException as e:  # anything else is a bug
            raise AssertionError(f"{type(e).__name__} leaked for:\n{text}") from e
        assert all(timm.is_model(n) for n in names)
        outcomes["registered"] += 1

    check()
    # both paths exercised (the first refusals say why, should none register)
    assert outcomes["refused"] >= 100 and outcomes["registered"] >= 1, (outcomes, reasons)
    assert not (folder / "pwned_yaml").exists()


def test_error_messages_name_file_variant_and_key(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("variants:\n  fz_named:\n    base: test_vit\n    data: {crop_pct: 7}\n")
    with pytest.raises(
        timm_anysize.SpecError, match=rf"^{path}: fz_named\.data\.crop_pct: .*less than or equal to 1, got 7"
    ):
        timm_anysize.register_yaml(path)


def test_yaml_alias_bomb_is_rejected_quickly(tmp_path):
    lines = ["a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")  # 10^9 leaves once expanded
    text = "variants:\n  fz_bomb:\n    base: test_vit\n    model_args: {x: *a8}\n"
    path.write_text("x_defs:\n" + "\n".join("  " + ln for ln in lines) + "\n" + text.replace("*a8", "*a8"))
    with pytest.raises(timm_anysize.SpecError):
        timm_anysize.register_yaml(path)
    inline = tmp_path / "bomb2.yaml"
    inline.write_text(
        "variants:\n  fz_bomb2:\n    base: test_vit\n    model_args:\n      x: "
        + lines[0].split(": ", 1)[1]
        + "\n"
        + "".join(f"      y{i}: {ln.split(': ', 1)[1]}\n" for i, ln in enumerate(lines[1:], 1))
    )
    with pytest.raises(timm_anysize.SpecError, match="model_args is too large"):
        timm_anysize.register_yaml(inline)


# --- resource limits -------------------------------------------------------------------------------------------


def test_absurd_geometry_is_rejected_with_the_estimate_before_allocating():
    with pytest.raises(
        timm_anysize.SpecError,
        match=r"img_size: 100000x100000 px, patch 1x1, .* needs an estimated [\d,.]+ EiB .* over the [\d,.]+ [KMGT]iB "
        r"budget .* the attention of one image .* nearest that fit: img_size \[\d+, \d+\]",
    ):
        timm_anysize.register_variant(unique_name(), base="test_vit", img_size=100000, patch_size=1)


def test_memory_budget_is_configurable(monkeypatch):
    monkeypatch.setenv("TIMM_ANYSIZE_MAX_BYTES", str(2**19))  # test_vit is ~1.4 MiB in float32, ~0.7 in bfloat16
    with pytest.raises(timm_anysize.SpecError, match=r"over the 512\.0 KiB budget \(TIMM_ANYSIZE_MAX_BYTES\)"):
        timm_anysize.register_variant(unique_name(), base="test_vit", img_size=64)


# --- hostile checkpoints ---------------------------------------------------------------------------------------


def _variant_for(path: Path) -> str:
    return timm_anysize.register_variant(unique_name(), base="test_vit", img_size=64, pretrained={"file": str(path)})


def test_corrupt_npz_names_the_file(tmp_path, make_checkpoint):
    good, _ = make_checkpoint("test_vit", ".npz")
    bad = tmp_path / "cut.npz"
    bad.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(timm_anysize.WeightsError, match=rf"{bad}: not a JAX/big_vision checkpoint"):
        timm.create_model(_variant_for(bad), pretrained=True)


def test_safetensors_header_claiming_absurd_sizes(tmp_path):
    header = b'{"w": {"dtype": "F32", "shape": [100000000000], "data_offsets": [0, 400000000000]}}'
    bad = tmp_path / "huge.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(timm_anysize.WeightsError, match=rf"{bad}: not a readable safetensors file"):
        timm.create_model(_variant_for(bad), pretrained=True)
    liar = tmp_path / "liar.safetensors"
    liar.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(timm_anysize.WeightsError, match=rf"{liar}: not a readable safetensors file"):
        timm.create_model(_variant_for(liar), pretrained=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, make_checkpoint, value):
    _, base = make_checkpoint("test_vit")
    sd = base.state_dict()
    sd["blocks.3.mlp.fc1.weight"][0, 0] = value
    path = tmp_path / "nonfinite.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(
        timm_anysize.WeightsError, match=rf"{path}: tensors with NaN or Inf values: blocks.3.mlp.fc1.weight"
    ):
        timm.create_model(_variant_for(path), pretrained=True)


def test_reading_never_modifies_user_files(tmp_path, make_checkpoint):
    ckpt, _ = make_checkpoint("test_vit", ".pth")
    yaml_path = tmp_path / "v.yaml"
    name = unique_name()
    yaml_path.write_text(
        f"variants:\n  {name}:\n    base: test_vit\n    img_size: 64\n    pretrained: {{file: {ckpt.name}}}\n"
    )
    files = [ckpt, yaml_path]
    before = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}
    listing = sorted(p.name for p in tmp_path.iterdir())
    timm_anysize.register_yaml(yaml_path)
    timm.create_model(name, pretrained=True)
    assert {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


# --- concurrency -----------------------------------------------------------------------------------------------


def test_registering_the_same_yaml_from_many_threads(tmp_path):
    names = [unique_name("thr") for _ in range(3)]
    path = tmp_path / "v.yaml"
    path.write_text(
        "variants:\n"
        + "".join(f"  {n}:\n    base: test_vit\n    img_size: {32 + 16 * i}\n" for i, n in enumerate(names))
    )
    results, errors = [], []
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        try:
            results.append(timm_anysize.register_yaml(path))
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [names] * 8
    assert [timm.create_model(n).pretrained_cfg["input_size"][1] for n in names] == [32, 48, 64]


# --- nothing lost ----------------------------------------------------------------------------------------------


def _fail(*args, **kwargs):
    raise OSError("injected failure")


@pytest.mark.parametrize("step", ["weights", "config", "report", "card", "rename"])
def test_a_failure_at_each_export_write_step_keeps_the_previous_export(tmp_path, monkeypatch, step):
    import huggingface_hub

    register_demo_variants()  # the demo's variants: `import timm_anysize` does not register them
    name = "vit_digits_patch4_24"
    out = timm_anysize.export(name, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename, real_write_text = pathlib.Path.rename, pathlib.Path.write_text
    if step == "weights":
        monkeypatch.setattr(safetensors.torch, "save_file", _fail)
    elif step == "config":
        import json

        real_dump = json.dump
        monkeypatch.setattr(
            json, "dump", lambda *a, **k: _fail() if "config" in str(getattr(a[1], "name", "")) else real_dump(*a, **k)
        )
    elif step == "report":
        monkeypatch.setattr(
            pathlib.Path,
            "write_text",
            lambda self, *a, **k: _fail() if self.name == "anysize_report.json" else real_write_text(self, *a, **k),
        )
    elif step == "card":
        monkeypatch.setattr(huggingface_hub.ModelCard, "save", _fail)
    else:  # the final rename of the new folder into place
        monkeypatch.setattr(
            pathlib.Path, "rename", lambda self, target: _fail() if ".tmp-" in self.name else real_rename(self, target)
        )
    with pytest.raises(OSError, match="injected failure"):
        timm_anysize.export(name, out, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
