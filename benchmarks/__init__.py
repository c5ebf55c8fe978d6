"""Benchmarks of meft_ds against full fine-tuning, LoRA and LoRA + gradient checkpointing (docs/benchmarks.md)."""
