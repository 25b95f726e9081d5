"""Exports that plain timm reloads bit-identically, model cards, atomic writes, and push/pull through the real
huggingface_hub client against a Hub stand-in on 127.0.0.1."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from hub_standin import HubStandIn

import timm_anysize
from conftest import run_python, unique_name
from timm_anysize.apps.digits import DEMO_CONFIG
from timm_anysize.core.atomic import FolderExistsError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def variant(make_checkpoint):
    """A ViT variant with changed img size, patch, channels and a new head, loaded from a tiny checkpoint."""
    path, _ = make_checkpoint("test_vit")
    name = timm_anysize.register_variant(
        unique_name("hub"),
        base="test_vit",
        img_size=64,
        patch_size=8,
        in_chans=1,
        num_classes=5,
        pretrained={"file": str(path)},
        card={"label_names": ["a", "b", "c", "d", "e"], "datasets": ["digits"]},
    )
    return name, path


def test_export_reloads_bit_identically_in_plain_timm(variant, tmp_path):
    name, _ = variant
    model = timm.create_model(name, pretrained=True).eval()
    out = timm_anysize.export(model, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "anysize_report.json",
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_vit"
    assert config["model_args"]["img_size"] == [64, 64] and config["model_args"]["patch_size"] == 8
    assert config["model_args"]["in_chans"] == 1 and config["num_classes"] == 5
    assert config["pretrained_cfg"]["input_size"] == [1, 64, 64] and config["pretrained_cfg"]["mean"] == [0.5]
    assert config["label_names"] == ["a", "b", "c", "d", "e"]
    inputs = {"own": torch.randn(2, 1, 64, 64), "other": torch.randn(2, 1, 48, 88)}
    with torch.no_grad():
        expected = {k: model(x) for k, x in inputs.items()}
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "io.pt")
    out_text = run_python(f"""
        import sys, torch, timm
        m = timm.create_model("local-dir:{out}", pretrained=True).eval()
        io = torch.load("{tmp_path / "io.pt"}", weights_only=True)
        with torch.no_grad():
            for k, x in io["inputs"].items():
                assert torch.equal(m(x), io["expected"][k]), k
        cfg = timm.data.resolve_data_config(model=m)
        assert tuple(cfg["input_size"]) == (1, 64, 64) and tuple(cfg["mean"]) == (0.5,), cfg
        assert "timm_anysize" not in sys.modules
        print("ok")
    """)
    assert out_text.strip() == "ok"


def test_model_card_round_trip(variant, tmp_path):
    from huggingface_hub import ModelCard

    name, _ = variant
    metrics = [timm_anysize.Metric("top-1 accuracy", 91.5, dataset="digits", split="test")]
    out = timm_anysize.export(name, tmp_path / "export", metrics=metrics, repo_id="someone/variant")
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "timm" and data.license == "apache-2.0"
    assert {"timm", "image-classification", "timm-anysize"} <= set(data.tags)
    assert data.datasets == ["digits"] and data.pipeline_tag == "image-classification"
    assert data.base_model is None  # the source was a local file: no Hub id to point at
    (result,) = data.eval_results
    assert (result.metric_name, result.metric_value, result.dataset_split) == ("top-1 accuracy", 91.5, "test")
    text = card.text
    assert "## How this variant was made" in text and 'timm.create_model("hf-hub:someone/variant"' in text
    assert "`pos_embed` | resampled: grid 10x10 -> 8x8" in text
    assert "`patch_embed.proj.weight` | adapted: channels 3 -> 1" in text and "`head.weight` | initialized" in text
    assert "Source geometry: 160x160 px, patch 16x16" in text


def test_card_names_the_base_hub_repo():
    card = timm_anysize.build_model_card(timm.create_model("vit_tiny_patch4_64"))
    assert card.data.base_model == "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert card.data.base_model_relation == "finetune"


def test_export_refuses_to_overwrite_and_is_atomic(variant, tmp_path, monkeypatch):
    import huggingface_hub

    name, _ = variant
    exports = tmp_path / "exports"
    out = timm_anysize.export(name, exports / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FolderExistsError, match="exists and is not empty; pass overwrite=True"):
        timm_anysize.export(name, out)

    def fail(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(huggingface_hub.ModelCard, "save", fail)  # the last write of an export
    with pytest.raises(OSError, match="injected"):
        timm_anysize.export(name, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export is intact
    with pytest.raises(OSError, match="injected"):
        timm_anysize.export(name, exports / "fresh")
    assert sorted(p.name for p in exports.iterdir()) == ["export"]  # no half-written folder or temp left


def test_what_is_shared_names_the_weights_by_file_name_not_by_a_local_path(variant, tmp_path):
    """The card, anysize_report.json and every other exported file name the weights by file name: no trace of the
    folder they sit in, the home folder or the working directory; by name and with file= alike."""
    name, path = variant
    other = tmp_path / "elsewhere" / "other weights.safetensors"  # a space: the path is not cut at it
    other.parent.mkdir()
    other.write_bytes(path.read_bytes())
    for out, file in ((tmp_path / "by-name", None), (tmp_path / "with-file", other)):
        timm_anysize.export(name, out, file=file, repo_id="me/variant")
        weights = Path(file or path).name
        report = json.loads((out / "anysize_report.json").read_text())
        assert report["source"] == f"file {weights}"
        assert f"From `file {weights}`:" in (out / "README.md").read_text()
        local = {str(path.parent), str(other.parent), str(Path.home()), os.getcwd()}
        for exported in out.iterdir():
            data = exported.read_bytes()
            assert not [p for p in local if p.encode() in data], exported.name
    in_memory = timm.create_model(name, pretrained=True)
    assert timm_anysize.adaptation_report(in_memory).source == f"file {path}"  # locally, the full path helps


def test_export_folders_take_the_users_umask(variant, tmp_path):
    name, _ = variant
    model = timm.create_model(name)
    old = os.umask(0o022)
    try:
        for umask in (0o022, 0o027):
            os.umask(umask)
            out = timm_anysize.export(model, tmp_path / f"export-{umask:o}" / "out")
            assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~umask)
            assert oct(out.parent.stat().st_mode & 0o777) == oct(0o777 & ~umask)
            assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o666 & ~umask)}
    finally:
        os.umask(old)


def test_export_refuses_an_existing_folder_before_reading_any_weights(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    name = timm_anysize.register_variant(
        unique_name("hub"), base="test_vit", img_size=32, patch_size=8, pretrained={"file": str(bad)}
    )
    with pytest.raises(timm_anysize.WeightsError):  # the weights are unreadable ...
        timm_anysize.export(name, tmp_path / "fresh")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FolderExistsError) as info:  # ... yet an occupied folder is what is refused
        timm_anysize.export(name, existing)
    assert str(info.value) == f"{existing}: exists and is not empty; pass overwrite=True (--overwrite) to replace it"
    assert [p.name for p in existing.iterdir()] == ["keep.txt"] and not (tmp_path / "fresh").exists()


def test_export_rejects_models_not_built_by_timm_anysize(tmp_path):
    with pytest.raises(timm_anysize.ExportError, match="was not built by timm-anysize"):
        timm_anysize.export(timm.create_model("test_vit"), tmp_path / "x")


def test_push_dry_run_needs_no_network(variant, tmp_path):
    name, path = variant
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "timm_anysize.apps.cli",
            "--quiet",
            "push",
            name,
            "me/repo",
            "--dry-run",
            "--file",
            str(path),
        ],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "HF_ENDPOINT": "http://127.0.0.1:9",
            "HF_HUB_OFFLINE": "0",
            "TIMM_ANYSIZE_CONFIGS": _variant_yaml(name, tmp_path),
        },
    )
    assert proc.returncode == 0, proc.stderr
    assert "dry run: would create repo me/repo" in proc.stdout
    assert "  model.safetensors" in proc.stdout and "library_name: timm" in proc.stdout


@pytest.mark.parametrize("offline", ["0", "1"])
def test_push_dry_run_of_hub_weights_downloads_nothing_and_writes_nothing(tmp_path, offline):
    """A variant whose weights are on the Hub: the dry run asks the Hub for nothing (the stand-in counts every
    request), writes nothing in the working directory or the Hugging Face cache, and says what it would upload."""
    name = unique_name("hub")
    timm_anysize.register_variant(
        name,
        base="test_vit",
        img_size=48,
        patch_size=8,
        in_chans=1,
        pretrained={"hf_hub_id": "org/remote-weights", "img_size": 64, "patch_size": 8, "num_classes": 5},
    )
    configs = _variant_yaml(name, tmp_path)
    cwd, hf_home = tmp_path / "cwd", tmp_path / "hf"
    cwd.mkdir()
    with HubStandIn() as hub:
        proc = subprocess.run(
            [sys.executable, "-m", "timm_anysize", "--quiet", "push", name, "me/repo", "--dry-run"],
            capture_output=True,
            text=True,
            cwd=cwd,
            env={
                **os.environ,
                "HF_ENDPOINT": hub.url,
                "HF_HUB_OFFLINE": offline,
                "HF_HOME": str(hf_home),
                "TIMM_ANYSIZE_CONFIGS": configs,
            },
        )
        assert proc.returncode == 0, proc.stderr
        assert hub.state.requests == []
    lines = proc.stdout.splitlines()
    assert lines[:6] == [
        "dry run: would create repo me/repo and upload:",
        "  README.md",
        "  anysize_report.json",
        "  config.json",
        "  model.safetensors",
        "weights: hf-hub org/remote-weights, not downloaded in a dry run (the card lists the planned steps)",
    ]
    assert "base_model: org/remote-weights" in proc.stdout and 'timm.create_model("hf-hub:me/repo"' in proc.stdout
    assert "From `hf-hub org/remote-weights (not downloaded: dry run)`:" in proc.stdout
    assert "| `pos_embed` | planned (weights not loaded): resample grid 8x8 -> 6x6" in proc.stdout
    assert list(cwd.iterdir()) == [] and not hf_home.exists()


def _variant_yaml(name: str, folder: Path) -> str:
    """A YAML file in ``folder`` with the registered variant, so subprocesses can register it too."""
    spec = timm_anysize.get_variant(name)
    path = folder / f"{name}.yaml"
    data = json.loads(spec.model_dump_json())
    data.pop("name")
    path.write_text(json.dumps({"variants": {name: data}}))  # JSON is YAML
    return str(path)


def test_push_and_pull_through_the_real_client(variant, tmp_path):
    name, _ = variant
    env = {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TIMM_ANYSIZE_CONFIGS": _variant_yaml(name, tmp_path),
        "HF_TOKEN": "test-token",
    }
    with HubStandIn() as hub:
        env["HF_ENDPOINT"] = hub.url
        out = run_python(
            f"""
            import timm_anysize
            r = timm_anysize.push_to_hub("{name}", "org/anysize-test", private=True)
            print(r["commit_url"])
        """,
            env,
        )
        assert out.strip().startswith(f"{hub.url}/org/anysize-test/commit/")
        repo = hub.state.repos["org/anysize-test"]
        assert repo["private"] is True
        assert sorted(repo["files"]) == ["README.md", "anysize_report.json", "config.json", "model.safetensors"]
        assert "timm-anysize" in repo["commits"][0]["user_agent"]
        assert json.loads(repo["files"]["config.json"])["architecture"] == "test_vit"
        assert hub.state.validated_cards[0]["library_name"] == "timm"  # the card passed the Hub's YAML check

        # Pull: plain timm from the Hub, and a new variant whose weights are the pushed repo.
        pull = """
            import timm, torch, timm_anysize
            plain = timm.create_model("hf-hub:org/anysize-test", pretrained=True).eval()
            name = timm_anysize.register_variant(
                "pulled_96", base="test_vit", img_size=96, patch_size=8, in_chans=1, num_classes=5,
                pretrained={"hf_hub_id": "org/anysize-test", "img_size": 64, "patch_size": 8, "in_chans": 1,
                             "num_classes": 5})
            m = timm.create_model(name, pretrained=True).eval()
            report = timm_anysize.adaptation_report(m)
            assert report.source == "hf-hub org/anysize-test", report.source
            assert [e.key for e in report.non_copied()] == ["pos_embed"]
            x = torch.randn(1, 1, 96, 96)
            with torch.no_grad():  # plain timm resamples 8x8 -> 12x12 per call; the variant did it at load
                print(torch.equal(plain(x), m(x)))
        """
        assert run_python(pull, env).strip() == "True"
        assert not hub.state.unknown, hub.state.unknown

    # The stand-in is gone: offline, everything comes from the cache huggingface_hub filled.
    assert run_python(pull, {**env, "HF_HUB_OFFLINE": "1"}).strip() == "True"
    missing = run_python(
        """
        import timm, timm_anysize
        name = timm_anysize.register_variant("pulled_missing", base="test_vit",
                                             pretrained={"hf_hub_id": "org/never-pushed"})
        try:
            timm.create_model(name, pretrained=True)
        except timm_anysize.WeightsError as e:
            print(e)
    """,
        {**env, "HF_HUB_OFFLINE": "1"},
    )
    assert "hf_hub_id 'org/never-pushed'" in missing and "not in the cache" in missing


def test_export_cli_puts_the_demos_numbers_in_the_card(tmp_path):
    from huggingface_hub import ModelCard

    results = tmp_path / "results.json"
    results.write_text(
        json.dumps(
            {
                "rows": [
                    {
                        "variant": "vit_digits_patch8_64",
                        "naive": False,
                        "zero_shot": 97.2,
                        "finetuned": 97.5,
                        "scratch": 13.3,
                    },
                    {
                        "variant": "vit_digits_patch8_64",
                        "naive": True,
                        "zero_shot": 33.6,
                        "finetuned": None,
                        "scratch": None,
                    },
                ]
            }
        )
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "timm_anysize",
            "--quiet",
            "export",
            "-c",
            str(DEMO_CONFIG),  # the demo's variants: registered only where asked for
            "vit_digits_patch8_64",
            str(tmp_path / "out"),
            "--demo-results",
            str(results),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    card = ModelCard.load(tmp_path / "out" / "README.md")
    got = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert got == {
        "zero-shot top-1 accuracy": 97.2,
        "fine-tuned top-1 accuracy": 97.5,
        "from-scratch top-1 accuracy (same budget)": 13.3,
    }


@pytest.fixture
def rgb_variant(make_checkpoint):
    path, _ = make_checkpoint("test_vit")
    return timm_anysize.register_variant(
        unique_name("hf"),
        base="test_vit",
        img_size=[48, 64],
        patch_size=8,
        num_classes=4,
        pretrained={"file": str(path)},
        card={"label_names": ["cat", "dog", "owl", "fox"]},
    )


def _pil_image(mode: str, size=(70, 50)):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, mode="RGB").convert(mode)


def _hf_model(folder):
    """transformers' TimmWrapper for an export, with its weights checked equal to the file's. transformers keeps the
    weights in the safetensors memory map, at addresses of any alignment, where BLAS may pick other kernels (last-bit
    differences); copied into fresh tensors, the same weights must give our logits bit for bit."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification

    hf = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    saved, loaded = load_file(str(folder / "model.safetensors")), hf.timm_model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    mapped = hf
    hf = copy.deepcopy(hf)
    with torch.no_grad():
        for p in hf.parameters():
            p.data = p.data.clone()
    return hf, mapped


def test_export_loads_in_transformers_with_our_logits_and_classifies_in_a_pipeline(rgb_variant, tmp_path):
    """TimmWrapper builds the base architecture from config.json's model_args (it passes num_classes itself):
    identical logits; pipeline() preprocesses with timm's transforms from the exported cfg and gives our scores."""
    from transformers import pipeline

    ours = timm.create_model(rgb_variant, pretrained=True).eval()
    out = timm_anysize.export(ours, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert not {"num_classes", "weight_init"} & set(config["model_args"])  # no loading details in model_args
    hf, mapped = _hf_model(out)
    assert [hf.config.id2label[i] for i in range(4)] == ["cat", "dog", "owl", "fox"]
    with torch.no_grad():
        for size in ((48, 64), (40, 88)):  # its own size, and another (timm's dynamic path, in plain timm)
            x = torch.randn(2, 3, *size)
            assert torch.equal(hf(pixel_values=x).logits, ours(x)), size
            torch.testing.assert_close(mapped(pixel_values=x).logits, ours(x), rtol=1e-5, atol=1e-6)
        image = _pil_image("RGB")
        transform = timm.data.create_transform(**timm.data.resolve_data_config(model=ours))
        probs = ours(transform(image).unsqueeze(0)).softmax(-1)[0]
    result = pipeline("image-classification", model=str(out), top_k=4)(image)
    assert [r["label"] for r in result] == [["cat", "dog", "owl", "fox"][i] for i in probs.argsort(descending=True)]
    for r in result:
        assert r["score"] == pytest.approx(probs[["cat", "dog", "owl", "fox"].index(r["label"])].item(), rel=1e-5)


@pytest.mark.parametrize("in_chans, mode", [(1, "L"), (4, "RGBA")])
def test_transformers_for_other_channel_counts_takes_what_the_card_says(make_checkpoint, tmp_path, in_chans, mode):
    """pipeline() converts every image to RGB (the 3-channel model's case); for 1 or 4 channels the card says to
    call the image processor on an image of the model's mode, which gives the model's channels and our logits."""
    from transformers import AutoImageProcessor

    path, _ = make_checkpoint("test_vit")
    name = timm_anysize.register_variant(
        unique_name("hf"),
        base="test_vit",
        img_size=64,
        patch_size=16,
        in_chans=in_chans,
        pretrained={"file": str(path)},
    )
    ours = timm.create_model(name, pretrained=True).eval()
    out = timm_anysize.export(ours, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert f'model(**processor(image.convert("{mode}"))).logits' in card
    assert "converts every image to RGB" in card
    hf, mapped = _hf_model(out)
    processor = AutoImageProcessor.from_pretrained(str(out))
    image = _pil_image(mode)
    pixels = processor(image)["pixel_values"]
    assert pixels.shape == (1, in_chans, 64, 64)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=ours))
    with torch.no_grad():
        assert torch.equal(hf(pixel_values=pixels).logits, ours(pixels))
        torch.testing.assert_close(mapped(pixel_values=pixels).logits, ours(pixels), rtol=1e-5, atol=1e-6)
        assert torch.equal(pixels, transform(image).unsqueeze(0))  # timm's own preprocessing for the variant
