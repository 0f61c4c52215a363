"""`entropy-lens` with one rank's shard step broken, for tests/test_dist.py (run under torchrun).

``DIST_HOOK_RANK``: the rank to break; ``DIST_HOOK_MODE``: ``raise`` (a RuntimeError, i.e. a
bug) or ``hang`` (never returns). The other ranks run the command unchanged.
"""

import os
import sys
import time

import entropy_lens.pipelines.analyze as an
from entropy_lens_cli.app import main

if os.environ.get("RANK") == os.environ["DIST_HOOK_RANK"]:
    def broken(*args, **kwargs):
        if os.environ["DIST_HOOK_MODE"] == "hang":
            time.sleep(3600)
        raise RuntimeError("injected failure")

    an.shard_frame = broken

sys.argv[0] = "entropy-lens"
main()
