"""rlhpc: Slurm-native GRPO post-training. `rl` holds the learning, `hpc` the cluster; this package joins them."""

__version__ = "0.1.0"
