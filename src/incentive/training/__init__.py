"""Training stages (SFT, RL) and what they share: sampling, optimisers, checkpoints, metrics."""
