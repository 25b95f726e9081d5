"""Import time: ``import timm`` against ``import timm, timm_anysize``, each in a fresh interpreter.

Each run is a new ``python -c`` process that times its own imports (the interpreter's start is the same for both
and left out): wall time (``time.perf_counter``) and the process's CPU time (``time.process_time``; on a shared
machine the wall time also counts the waits for a core, the CPU time barely does). The kinds of run are interleaved
(order rotated every round) so machine load drifts over all alike; the medians over the runs and what
``timm_anysize`` adds to ``timm`` are printed (it is imported after ``timm`` in its runs). ``--other PATH`` adds a
third kind: the ``timm_anysize`` of another checkout (put first on ``PYTHONPATH``; e.g. ``git archive HEAD`` unpacked,
with ``configs/`` copied into its ``timm_anysize/``). Modules load from bytecode, as an installed package does: the
children write it to a temporary ``PYTHONPYCACHEPREFIX`` (never into the checkout; ``PYTHONDONTWRITEBYTECODE`` is
lifted for them) in one untimed warm-up run of each kind. See BENCHMARKS.md for a recorded run.

    python benchmarks/bench_import.py [--runs N] [--other PATH] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Optional

# What the children run: they print their wall and CPU seconds.
_TIMED = (
    "import time; w, c = time.perf_counter(), time.process_time(); {imports}; "
    "print(time.perf_counter() - w, time.process_time() - c)"
)
TIMM = _TIMED.format(imports="import timm")
TIMM_ANYSIZE = _TIMED.format(imports="import timm; import timm_anysize")


def time_import(
    code: str, pycache: Optional[str] = None, pythonpath: Optional[str] = None, python: str = sys.executable
) -> tuple[float, float]:
    """(wall, CPU) seconds the imports of ``code`` take in a fresh interpreter, as the child measures them.

    Args:
        code: What the child runs; it prints the two numbers last.
        pycache: A ``PYTHONPYCACHEPREFIX`` for the child's bytecode (None: the environment's own setting).
        pythonpath: Put first on the child's ``PYTHONPATH`` (another checkout's package).
        python: The interpreter.

    Example:
        >>> wall, cpu = time_import(_TIMED.format(imports="import json"))
        >>> 0 <= cpu and 0 < wall < 5
        True
    """
    env = dict(os.environ)
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    out = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=tempfile.gettempdir()
    ).stdout  # not the checkout: its package comes from the install
    wall, cpu = out.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def bench_import(runs: int = 10, other: Optional[str] = None) -> dict:
    """Run each kind ``runs`` times, interleaved; returns the (wall, CPU) times, their medians, and what importing
    timm_anysize adds to timm's median (seconds).

    Example:
        >>> r = bench_import(runs=1)
        >>> sorted(r["median_s"]), len(r["added_s"]["timm_anysize"])
        (['timm', 'timm_anysize'], 2)
    """
    kinds = {"timm": (TIMM, None), "timm_anysize": (TIMM_ANYSIZE, None)}
    if other:
        kinds[f"timm_anysize of {other}"] = (TIMM_ANYSIZE, other)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    order = list(kinds)
    with tempfile.TemporaryDirectory() as pycache:
        for code, path in kinds.values():  # untimed: compiles the bytecode once
            time_import(code, pycache, path)
        for r in range(runs):
            for kind in order[r % len(order) :] + order[: r % len(order)]:
                times[kind].append(time_import(kinds[kind][0], pycache, kinds[kind][1]))
    median = {k: tuple(statistics.median(t[i] for t in v) for i in (0, 1)) for k, v in times.items()}
    added = {k: tuple(m[i] - median["timm"][i] for i in (0, 1)) for k, m in median.items() if k != "timm"}
    return {"runs": runs, "times_s": times, "median_s": median, "added_s": added}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of each kind (default 10)")
    parser.add_argument("--other", help="also time the timm_anysize of this checkout (first on PYTHONPATH)")
    parser.add_argument("--out", help="write the times as JSON")
    args = parser.parse_args(argv)
    result = bench_import(args.runs, args.other)
    print(f"{'median of ' + str(args.runs) + ' runs each, interleaved':<52} {'wall s':>8} {'CPU s':>8}")
    for kind, (wall, cpu) in result["median_s"].items():
        print(f"{'import timm' + ('' if kind == 'timm' else ', ' + kind):<52} {wall:8.2f} {cpu:8.2f}")
    for kind, (wall, cpu) in result["added_s"].items():
        print(f"{kind + ' adds':<52} {wall:8.2f} {cpu:8.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
