"""The model-level loss benchmark: short LoRA fine-tuning runs, one per (initializer, lr,
seed), on one real model and corpus (``config``, ``model``, ``data``, ``apply``,
``stats_pass``, ``train``, ``run``), and their paired-seed verdict (``verdict``)."""
