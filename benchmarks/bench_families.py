"""Per-family dynamic-forward benchmark: timm-anysize's any-size model against a timm model built for each size.

See ``benchmarks/family_bench.py`` and BENCHMARKS.md for a recorded run.

    python benchmarks/bench_families.py [--tiny] [--batch N] [--reps N] [--out results.json] [--family swin ...]
"""

import argparse
import json
import sys
from pathlib import Path

from family_bench import run_family_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a smoke run: two tiny models, one size each")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--family", nargs="*", help="only these families")
    parser.add_argument("--out", type=Path, help="write the measurements as JSON")
    a = parser.parse_args()
    results = run_family_bench(tiny=a.tiny, batch=a.batch, reps=a.reps, families=a.family)
    if a.out:
        a.out.write_text(json.dumps(results, indent=2))
    sys.exit(0)
