"""Rollout engines: generate responses with log-probs, take new weights, report health, free memory."""
