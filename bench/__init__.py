"""loram-bench: the harness that measures loram_ref initializers per layer shape and per model."""
