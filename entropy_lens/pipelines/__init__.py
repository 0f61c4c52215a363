"""What each command does, as library calls that return values (no printing, no writing).

- :mod:`~entropy_lens.pipelines.prepare`: rollouts → tokenized, packed batch with behaviour
  log-probs, rewards and groups (once, for every pipeline below);
- :mod:`~entropy_lens.pipelines.sample`: real rollouts from a model on a prompt dataset;
- :mod:`~entropy_lens.pipelines.analyze`: per-token statistics and every closed-form estimator
  of a checkpoint (resumable shards);
- :mod:`~entropy_lens.pipelines.validate`: the estimators against the measured ΔH of one real
  optimizer step, with the parameter-space JVP;
- :mod:`~entropy_lens.pipelines.compare`: every intervention method on the same tokens, predicted
  (:func:`~entropy_lens.pipelines.compare.compare_methods`) and measured
  (:func:`~entropy_lens.pipelines.compare.measure_methods`).
"""
