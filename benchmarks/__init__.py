"""Speed and memory harnesses; every ratio is against baselines measured in the same process."""
