"""For every test and doctest (``--doctest-modules`` runs ``timm_anysize/``'s examples; tests/conftest.py has the
suite's fixtures): the working directory, ``tempfile``'s folder and ``$TMPDIR`` (for subprocesses) are a folder of
the test's own. A relative path, a ``tempfile.mkdtemp()`` in a docstring example or a temporary file a subprocess
makes never lands in the checkout or the system's temporary folder, so parallel workers and repeated runs never
share a path. Under pytest-xdist each worker also keeps to its share of the cores."""

from __future__ import annotations

import os
import tempfile

import pytest

if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and not os.environ.get("OMP_NUM_THREADS"):
    # Under pytest-xdist (-n N), each worker takes its share of the cores, its subprocesses too (OMP_NUM_THREADS):
    # torch's default (every core in each of the N workers) oversubscribes them and runs slower.
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    import torch

    torch.set_num_threads(_threads)


@pytest.fixture(scope="session", autouse=True)
def _hypothesis_storage_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Hypothesis keeps caches (and, unless a test says ``database=None``, examples) in ``./.hypothesis``, fixed
    when it is imported (in the checkout): a folder of this session's instead."""
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:
        return
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))


@pytest.fixture(autouse=True)
def _own_working_and_temporary_folder(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    tempfile.gettempdir()  # cache the system's folder first: pytest's own base folder stays where it is
    folder = tmp_path_factory.mktemp("cwd")
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.chdir(folder)
