"""Ground floor: pure tensor functions with no module state."""
