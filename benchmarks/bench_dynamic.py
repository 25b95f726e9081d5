"""Dynamic-size forward and pretrained-loading benchmarks against timm (and Hugging Face), in one process.

Same as ``timm-anysize bench``; see ``timm_anysize/bench.py`` and BENCHMARKS.md for a recorded run.

    python benchmarks/bench_dynamic.py [--tiny] [--reps N] [--no-load] [--out results.json]
"""

import sys

from timm_anysize.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
