"""Dynamic-size forward and pretrained-loading benchmarks against timm (and Hugging Face), in one process.

See ``benchmarks/anysize_bench.py`` and BENCHMARKS.md for a recorded run.

    python benchmarks/bench_dynamic.py [--tiny] [--reps N] [--no-load] [--out results.json]
"""

import argparse
import sys

from anysize_bench import run_bench

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a smoke run on test_vit")
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions per cell")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--model", nargs="+", help="timm architectures (default ViT-Ti and ViT-S)")
    p.add_argument("--no-load", action="store_true", help="skip the loading benchmark")
    p.add_argument("--no-forward", action="store_true", help="skip the whole-forward table")
    p.add_argument("--out", help="write the measurements as JSON")
    args = p.parse_args()
    run_bench(
        tiny=args.tiny,
        reps=args.reps,
        load=not args.no_load,
        forward=not args.no_forward,
        out=args.out,
        batches=args.batch,
        archs=args.model or None,
    )
    sys.exit(0)
