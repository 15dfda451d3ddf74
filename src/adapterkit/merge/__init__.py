"""Merging adapters into base weights and back."""
