"""Data loading and a lean training loop for classification adapters."""
