"""entropy_lens: entropy-dynamics analysis for RL with verifiable rewards (RLVR) on language models."""

__version__ = "0.1.0"
