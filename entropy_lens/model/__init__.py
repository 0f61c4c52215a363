"""The model side: loading checkpoints (:mod:`~entropy_lens.model.load`), the forward passes over
response tokens (:mod:`~entropy_lens.model.forward`), generation (:mod:`~entropy_lens.model.generate`),
the one-step update (:mod:`~entropy_lens.model.update`) and the JVP along it
(:mod:`~entropy_lens.model.jvp`)."""
