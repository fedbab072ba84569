"""``python -m icecache_ray.figures``: every figure under docs/figures/ from docs/results/."""

import sys

from icecache_ray.figures.build import main

sys.exit(main())
