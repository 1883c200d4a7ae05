"""CPU kernels of our own, compiled on first use into the cache; each has a pure-PyTorch fallback."""
