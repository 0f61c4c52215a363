"""entropy_lens: entropy-dynamics analysis for RL with verifiable rewards (RLVR) on language models.

The public names below load on first use (``import entropy_lens`` stays light; torch and
transformers are imported by the modules that need them). A walk through the tree is in
``docs/architecture.md``; every formula, with its source, is in ``docs/science.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name → the module that defines it.
_EXPORTS = {
    # data
    "TokenBatch": "entropy_lens.tokens",
    "load_rollouts": "entropy_lens.io.rollouts",
    "load_prompts": "entropy_lens.io.datasets",
    "InputError": "entropy_lens.io.tables",
    # the math
    "logit_stats": "entropy_lens.logits",
    "compute_advantages": "entropy_lens.advantages",
    "closed_form_columns": "entropy_lens.estimators",
    "effective_coefficient": "entropy_lens.estimators",
    "score_estimator": "entropy_lens.scoring",
    "quadrant_table": "entropy_lens.scoring",
    "fit_entropy_accuracy": "entropy_lens.scoring",
    # methods
    "list_methods": "entropy_lens.methods",
    "get_method": "entropy_lens.methods",
    "apply_method": "entropy_lens.methods",
    "method_loss": "entropy_lens.methods",
    # models
    "load_model": "entropy_lens.model.load",
    "response_stats": "entropy_lens.model.forward",
    "jvp_prediction": "entropy_lens.model.jvp",
    # pipelines
    "prepare": "entropy_lens.pipelines.prepare",
    "sample_rollouts": "entropy_lens.pipelines.sample",
    "AnalyzeSettings": "entropy_lens.pipelines.analyze",
    "run_analyze": "entropy_lens.pipelines.analyze",
    "ValidateSettings": "entropy_lens.pipelines.validate",
    "run_validate": "entropy_lens.pipelines.validate",
    "compare_methods": "entropy_lens.pipelines.compare",
    "measure_methods": "entropy_lens.pipelines.compare",
    # trainer, figures, report
    "build_config": "entropy_lens.train",
    "load_run": "entropy_lens.plots",
    "build_plots": "entropy_lens.plots",
    "build_report": "entropy_lens.report",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'entropy_lens' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
