"""Training stages (reward model, SFT, RL) and what they share: sampling, optimisers, checkpoints, metrics."""
