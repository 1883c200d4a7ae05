"""Analysis tools: statistics of training data and measurements on checkpoints, outside the training loop."""
