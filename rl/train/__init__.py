"""Training backends: log-probs of packed sequences, policy updates, weight export, save and load."""
