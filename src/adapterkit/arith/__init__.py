"""Adapter arithmetic: combine adapters into a new one, convert a mergeable adapter to a LoRA, extract a LoRA from
a fine-tuned model. The math is in ops/ (pure functions); this package builds the resulting adapters."""
