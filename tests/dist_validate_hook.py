"""`entropy-lens` with one function broken on one rank, for tests/test_dist_validate.py (run under
torchrun).

``DIST_HOOK_RANK``: the rank to break; ``DIST_HOOK_TARGET``: ``module:function`` to replace by one
that raises ``ValueError("injected failure")`` (bad input: exit 2) when ``DIST_HOOK_MODE`` is
``value``, else ``RuntimeError`` (a bug: exit 1). The other ranks run the command unchanged.
"""

import importlib
import os
import sys

from entropy_lens_cli.app import main

if os.environ.get("RANK") == os.environ["DIST_HOOK_RANK"]:
    module, name = os.environ["DIST_HOOK_TARGET"].split(":")

    def broken(*args, **kwargs):
        if os.environ.get("DIST_HOOK_MODE") == "value":
            raise ValueError("injected failure")
        raise RuntimeError("injected failure")

    setattr(importlib.import_module(module), name, broken)

sys.argv[0] = "entropy-lens"
main()
