"""Supervised fine-tuning (LoRA) of the server's models: rows, trainer, and the job runner."""
