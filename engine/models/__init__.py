"""Models in plain PyTorch whose state dicts mirror the official checkpoints key for key."""
