"""``python -m icecache_ray COMMAND [options]``: the ``icecache-ray`` command (:mod:`icecache_ray.cli`)."""

import sys

from icecache_ray.cli import main

sys.exit(main())
