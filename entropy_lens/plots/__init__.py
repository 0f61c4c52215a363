"""Paper-style figures of entropy dynamics (matplotlib, Agg; no I/O inside the figure builders).

Layers, kept apart:

1. **Loading** (:mod:`entropy_lens.plots.runs`, the only file reading): :func:`load_run` reads one run
   folder into a :class:`Run`; a malformed file raises ``ValueError`` with one line naming it.
2. **Plotted numbers**: ``*_data`` functions turn frames into the tidy table a figure draws (the
   CSV written next to each PNG) — :mod:`.tokens`, :mod:`.compare`, :mod:`.training`.
3. **Figure builders**: ``*_figure(data) -> matplotlib.figure.Figure``, pure functions of that
   table; every Figure is created on its own Agg canvas (no pyplot state, no window, the global
   backend is left alone; :mod:`.style`).
4. **The registry** (:mod:`.registry`, figures registered in :mod:`.catalog` with ``@figure``):
   each figure's needs, caption and the claim it checks. :func:`build_plots` loops over it and
   returns the :class:`Plot` objects plus a note for each figure it had to skip;
   :func:`save_plots` writes them (:mod:`.output`).
"""

from __future__ import annotations

from entropy_lens.plots import catalog as _catalog  # noqa: F401  (registers the figures)
from entropy_lens.plots.compare import (
    compare_dh_data,
    compare_dh_figure,
    factor_matrix_data,
    factor_matrix_figure,
    steer_weight_omega_data,
    steer_weight_omega_figure,
    weight_dist_data,
    weight_dist_figure,
)
from entropy_lens.plots.frames import add_labels, check_columns
from entropy_lens.plots.output import figure_png, save_plots, save_run_figures
from entropy_lens.plots.registry import (
    NEEDS,
    FigureSpec,
    Plot,
    build_plots,
    figure,
    get_figure,
    list_figures,
    unregister_figure,
)
from entropy_lens.plots.runs import (
    RUN_FILES,
    Run,
    lambda_min_of,
    load_run,
    metrics_frames,
    read_metrics,
    setting_label,
)
from entropy_lens.plots.style import (
    ESTIMATOR_LABELS,
    MAX_POINTS,
    QUADRANT_COLORS,
    QUADRANT_LABELS,
    method_colors,
)
from entropy_lens.plots.tokens import (
    TOKEN_COLUMNS,
    dh_scatter_data,
    dh_scatter_figure,
    dh_vs_prob_data,
    dh_vs_prob_figure,
    predicted_columns,
    quadrants_data,
    quadrants_figure,
)
from entropy_lens.plots.training import (
    WEIGHT_STATS,
    acc_vs_entropy_data,
    acc_vs_entropy_figure,
    accuracy_column,
    fit_entropy_accuracy,
    lambda_sensitivity_data,
    lambda_sensitivity_figure,
    pass_at_k_data,
    pass_at_k_figure,
    seed_band_data,
    steps_figure,
    weight_steps_data,
    weight_steps_figure,
)

#: Figure names, in the order they are built (also the PNG / CSV file stems).
FIGURES = tuple(list_figures())

__all__ = [
    "ESTIMATOR_LABELS",
    "FIGURES",
    "MAX_POINTS",
    "NEEDS",
    "QUADRANT_COLORS",
    "QUADRANT_LABELS",
    "RUN_FILES",
    "TOKEN_COLUMNS",
    "WEIGHT_STATS",
    "FigureSpec",
    "Plot",
    "Run",
    "acc_vs_entropy_data",
    "acc_vs_entropy_figure",
    "accuracy_column",
    "add_labels",
    "build_plots",
    "check_columns",
    "compare_dh_data",
    "compare_dh_figure",
    "dh_scatter_data",
    "dh_scatter_figure",
    "dh_vs_prob_data",
    "dh_vs_prob_figure",
    "factor_matrix_data",
    "factor_matrix_figure",
    "figure",
    "figure_png",
    "fit_entropy_accuracy",
    "get_figure",
    "lambda_min_of",
    "lambda_sensitivity_data",
    "lambda_sensitivity_figure",
    "list_figures",
    "load_run",
    "method_colors",
    "metrics_frames",
    "pass_at_k_data",
    "pass_at_k_figure",
    "predicted_columns",
    "quadrants_data",
    "quadrants_figure",
    "read_metrics",
    "save_plots",
    "save_run_figures",
    "seed_band_data",
    "setting_label",
    "steer_weight_omega_data",
    "steer_weight_omega_figure",
    "steps_figure",
    "unregister_figure",
    "weight_dist_data",
    "weight_dist_figure",
    "weight_steps_data",
    "weight_steps_figure",
]
