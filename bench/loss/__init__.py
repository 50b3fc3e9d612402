"""The loss benchmark: short LoRA fine-tuning runs, one per initializer, on one model and corpus."""
