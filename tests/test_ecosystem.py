"""Fitting the ecosystem: the launcher (also under torchrun with DDP), data pipelines, the JSON Schema, CLI output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import timm
import torch
import yaml
from PIL import Image

import timm_anysize
from conftest import run_torchrun, unique_name
from timm_anysize.apps.digits import DEMO_CONFIG
from timm_anysize.registry import _shipped_config_files
from timm_anysize.schema import SCHEMA_FILE, yaml_json_schema, yaml_reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "timm_anysize", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


# --- JSON Schema -----------------------------------------------------------------------------------------------


def test_shipped_schema_and_reference_are_in_sync():
    assert json.loads((ROOT / "configs" / SCHEMA_FILE).read_text()) == yaml_json_schema()
    assert (ROOT / "docs" / "yaml-reference.md").read_text() == yaml_reference_markdown()
    out = cli("schema")
    assert json.loads(out.stdout) == yaml_json_schema()


@pytest.mark.parametrize("path", [*_shipped_config_files(), DEMO_CONFIG], ids=lambda p: p.name)
def test_shipped_configs_validate_against_the_schema(path):
    schema = os.path.relpath(ROOT / "configs" / SCHEMA_FILE, path.parent)  # the demo's file sits in configs/demo/
    assert path.read_text().splitlines()[0] == f"# yaml-language-server: $schema={schema}"
    jsonschema.Draft202012Validator(yaml_json_schema()).validate(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize(
    "variant",
    [
        {"base": "x", "img_sise": 64},
        {"base": "x", "img_size": "64"},
        {"base": "x", "img_size": [64, 64, 3]},
        {"img_size": 64},
        {"base": "x", "adapt": {"patch_embed": {"method": "lanczos"}}},
    ],
)
def test_schema_rejects_what_the_loader_rejects(variant):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(yaml_json_schema()).validate({"variants": {"v": variant}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(yaml_json_schema()).validate({"variants": {"Bad.Name": {"base": "x"}}})


# --- launcher --------------------------------------------------------------------------------------------------

SCRIPT = """
import argparse, sys, timm
p = argparse.ArgumentParser()
p.add_argument("--model")
p.add_argument("--fail", action="store_true")
a = p.parse_args()
m = timm.create_model(a.model)
print("created", a.model, tuple(m.pretrained_cfg["input_size"]), sys.argv[0].endswith("script.py"))
if a.fail:
    raise RuntimeError("the script's own error")
sys.exit(3)
"""


@pytest.fixture
def script_and_config(tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT)
    name = unique_name("launch")
    (tmp_path / "v.yaml").write_text(f"variants:\n  {name}:\n    base: test_vit\n    img_size: 48\n    in_chans: 2\n")
    return tmp_path, name


@pytest.mark.parametrize("entry", [["-m", "timm_anysize"], ["-m", "timm_anysize.apps.cli"]])
def test_launcher_runs_an_unmodified_script_with_variants_registered(script_and_config, entry):
    tmp, name = script_and_config
    proc = subprocess.run(
        [sys.executable, *entry, "run", "--config", str(tmp / "v.yaml"), str(tmp / "script.py"), "--model", name],
        capture_output=True,
        text=True,
        cwd=tmp,
    )
    assert proc.stdout.strip() == f"created {name} (2, 48, 48) True"
    assert proc.returncode == 3  # the script's exit status
    failed = subprocess.run(
        [
            sys.executable,
            *entry,
            "run",
            "--config",
            str(tmp / "v.yaml"),
            str(tmp / "script.py"),
            "--model",
            name,
            "--fail",
        ],
        capture_output=True,
        text=True,
        cwd=tmp,
    )
    assert (
        failed.returncode == 1
        and "Traceback" in failed.stderr
        and "RuntimeError: the script's own error" in failed.stderr
    )


def test_launcher_console_script_and_env_configs(script_and_config):
    tmp, name = script_and_config
    exe = shutil.which("timm-anysize", path=str(Path(sys.executable).parent))
    proc = subprocess.run(
        [exe, "run", str(tmp / "script.py"), "--model", name],
        capture_output=True,
        text=True,
        env={**os.environ, "TIMM_ANYSIZE_CONFIGS": str(tmp / "v.yaml")},
    )
    assert proc.stdout.strip() == f"created {name} (2, 48, 48) True"


DDP_SCRIPT = """
import json, os, sys, timm, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = timm.create_model(sys.argv[1], pretrained=True)
ddp = DDP(model)
opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
g = torch.Generator().manual_seed(100 + rank)
data = [(torch.randn(4, 1, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)),
        (torch.randn(4, 1, 48, 40, generator=g), torch.randint(0, 10, (4,), generator=g))]
losses = []
for step in range(12):  # two fixed batches of two sizes, alternating: the loss must fall
    x, y = data[step % 2]
    loss = torch.nn.functional.cross_entropy(ddp(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    losses.append(loss.item())
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(world)]
dist.all_gather(gathered, flat)
if rank == 0:
    same = all(torch.equal(gathered[0], t) for t in gathered[1:])
    with open(sys.argv[2], "w") as f:
        json.dump({"same": same, "losses": losses, "world": world}, f)
dist.barrier()
dist.destroy_process_group()
os._exit(0)  # gloo can abort at interpreter shutdown (see tests/test_flexi.py); the work is done and written
"""


def test_torchrun_ddp_through_the_launcher(tmp_path):
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    out = tmp_path / "result.json"
    # the demo's variants: registered only where asked for
    run_torchrun(
        "-m", "timm_anysize", "run", "-c", str(DEMO_CONFIG), str(tmp_path / "ddp.py"), "vit_digits_patch4_32", str(out)
    )
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["same"] is True
    losses = result["losses"]
    assert sum(losses[-2:]) < sum(losses[:2])  # training on two input sizes made progress


# --- data pipeline ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_chans, mode", [(1, "L"), (3, "RGB"), (4, "RGBA")])
def test_timm_transforms_feed_the_variant(in_chans, mode):
    name = timm_anysize.register_variant(unique_name("data"), base="test_vit", img_size=[48, 64], in_chans=in_chans)
    model = timm.create_model(name).eval()
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg["input_size"] == (in_chans, 48, 64) and len(cfg["mean"]) == len(cfg["std"]) == in_chans
    transform = timm.data.create_transform(**cfg)
    image = Image.fromarray((torch.rand(90, 120, len(mode)) * 255).byte().squeeze(-1).numpy(), mode=mode)
    x = transform(image)
    assert tuple(x.shape) == (in_chans, 48, 64)
    with torch.no_grad():
        assert model(x.unsqueeze(0)).shape == (1, 1000)


# --- CLI output ------------------------------------------------------------------------------------------------


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants:\n  x_bad:\n    base: test_vit\n    img_sise: 3\n")
    proc = cli("check", str(bad))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    proc = cli("show", "nope_nope")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    proc = cli("--debug", "show", "nope_nope")
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_quiet_silences_progress(tmp_path):
    # in tmp_path: the export reads the demo's results from ./anysize-demo/ by default
    demo = ("-c", str(DEMO_CONFIG))  # the demo's variants: registered only where asked for
    loud = cli("export", *demo, "vit_digits_patch4_24", str(tmp_path / "a"), cwd=str(tmp_path))
    quiet = cli("--quiet", "export", *demo, "vit_digits_patch4_24", str(tmp_path / "b"), cwd=str(tmp_path))
    assert loud.returncode == quiet.returncode == 0
    assert "pos_embed resampled" in loud.stderr and quiet.stderr == ""
