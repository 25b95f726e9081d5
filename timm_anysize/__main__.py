"""``python -m timm_anysize ...`` (and ``torchrun -m timm_anysize run ...``): the same as ``timm-anysize``."""

import sys

from timm_anysize.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
