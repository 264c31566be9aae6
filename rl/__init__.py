"""Everything about learning: config, data, rollout, rewards, advantages and losses, training, checkpoints."""
