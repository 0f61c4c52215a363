"""The reference GRPO/STEER trainer (one readable loop in :mod:`.loop`).

``train(build_config("arithmetic-tiny", "steer"), "runs/steer")`` runs SFT warm-up and 200 RL
steps of a tiny model on synthetic arithmetic and writes ``metrics.jsonl``, rollouts and
checkpoints; see docs/trainer.md.
"""

from entropy_lens.passk import pass_at_k
from entropy_lens.train.config import (
    PRESETS,
    TrainConfig,
    apply_overrides,
    build_config,
    config_from_dict,
    config_to_dict,
    list_presets,
    parse_set_items,
    validate_config,
)
from entropy_lens.train.loop import TrainingDiverged, load_run_config, rl_step, train
from entropy_lens.train.metrics import (
    METRIC_KEYS,
    check_record,
    read_metrics,
)

__all__ = [
    "METRIC_KEYS",
    "PRESETS",
    "TrainConfig",
    "TrainingDiverged",
    "apply_overrides",
    "build_config",
    "check_record",
    "config_from_dict",
    "config_to_dict",
    "list_presets",
    "load_run_config",
    "parse_set_items",
    "pass_at_k",
    "read_metrics",
    "rl_step",
    "train",
    "validate_config",
]
