"""Ground floor: specs, registry, the Adapter contract, the host and the interpreter. Knows no method."""
