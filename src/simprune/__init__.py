"""simprune: similarity-based structural filter pruning for convolutional networks."""
__version__ = "0.1.0"
