"""Repair after removal: compensation and reconstruction of the layers that read pruned channels."""
