"""Shared fixtures: tiny timm checkpoints written to tmp folders (no downloads, ever)."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (it reads the variable once): the suite never reaches the network.
os.environ["HF_HUB_OFFLINE"] = "1"

import itertools  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path
from typing import Any, Callable

import anysize_tiny_models  # noqa: F401,E402  (registers the rows' TinyModel.base entrypoints with timm)
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from timm_anysize.core.family import Family

_counter = itertools.count()

# tests/conformance/ holds the plugin for timm's own test_models.py, run in a subprocess by
# tests/test_timm_conformance.py on variants derived from the family rows; nothing there is a test of this suite.
collect_ignore = ["conformance"]


def run_python(code: str, env: dict | None = None) -> str:
    """Run ``code`` in a fresh interpreter (outside the repo, so the installed package is what runs); its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def run_torchrun(*args: str, timeout: float = 240) -> None:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` (one thread per rank), in a process group of its own so a
    hang cannot leave workers behind; fails with the tail of its stderr."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None, "torchrun is not installed beside this interpreter"
    proc = subprocess.Popen(
        [torchrun, "--standalone", "--nproc_per_node", "2", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        raise
    assert proc.returncode == 0, stderr[-3000:]


def tiny_arch(fam: Family) -> str:
    """The timm model a row's tiny setup builds: its smaller ``TinyModel.base`` where it has one, else its example."""
    return fam.tiny.base or fam.example


def unique_name(prefix: str = "t") -> str:
    """A variant name no other test registers (names are process-global timm registrations: unique per worker)."""
    return f"{prefix}_{os.getpid()}_{next(_counter)}"


@pytest.fixture(autouse=True)
def _seed_torch(request: pytest.FixtureRequest) -> None:
    """torch's generator starts from a seed of the test's own, whatever ran before it in this worker (as
    pytest-randomly does for ``random`` and numpy: its ``--randomly-seed``, printed in the header, plus the test id)."""
    seed = request.config.getoption("randomly_seed", 0)
    torch.manual_seed((int(seed) + zlib.crc32(request.node.nodeid.encode())) % 2**63)


def _torch_global_state() -> dict[str, Any]:
    """The process-wide settings that decide which kernels run (and so the last bits of an output)."""
    return {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "default_dtype": torch.get_default_dtype(),
        "grad_enabled": torch.is_grad_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "mkldnn": torch.backends.mkldnn.enabled,
        "timm_fused_attn": timm.layers.use_fused_attn(),
        "timm_fused_attn_experimental": timm.layers.use_fused_attn(experimental=True),
        # not torch's, but process-wide all the same: a test that leaves Ctrl-C ignored breaks a later one that sends it
        "sigint_handler": signal.getsignal(signal.SIGINT),
    }


@pytest.fixture(autouse=True)
def _torch_global_state_is_restored(request: pytest.FixtureRequest):
    """A test that changes a global torch or timm setting restores it: the next test in the worker (any order, any
    worker) computes with the same kernels, so bit-identity checks hold whatever ran before them."""
    before = _torch_global_state()
    yield
    after = _torch_global_state()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"{request.node.nodeid} changed global torch state and did not restore it: {changed}"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A few RGB PNGs of odd sizes in two class folders (timm's ImageDataset layout)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 52), (64, 48), (33, 70), (80, 80)]):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> str:
    """A folder for one test module's checkpoints (tests/script_fx.py writes each family's once)."""
    return str(tmp_path_factory.mktemp("ckpt"))


def save_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """Save ``model``'s weights in the format named by ``path``'s suffix."""
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    elif path.suffix == ".npz":
        from jax_npz import save_vit_as_jax_npz

        save_vit_as_jax_npz(model, str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> Callable[..., tuple[Path, torch.nn.Module]]:
    """Build a seeded base model and save it: ``make_checkpoint('test_vit', '.safetensors', **kwargs)``."""

    def make(base: str = "test_vit", suffix: str = ".safetensors", seed: int = 0, **kwargs: Any):
        torch.manual_seed(seed)
        model = timm.create_model(base, **kwargs).eval()
        with torch.no_grad():  # non-trivial values everywhere (timm inits some tensors to zeros/ones)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
            saved = model.state_dict()
            for name, b in model.named_buffers():  # batch-norm statistics, as after training (not index buffers)
                if name in saved and (b.is_floating_point() or name.endswith("num_batches_tracked")):
                    b.add_(torch.rand_like(b) * 0.1 if b.is_floating_point() else 3)
        path = save_checkpoint(model, tmp_path / f"{base}_{seed}_{next(_counter)}{suffix}")
        return path, model

    return make


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-long", action="store_true", help="run the config fuzzer with 3,000+ examples")
