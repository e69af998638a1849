"""Benchmarks: LoRA overheads measured as ratios, side by side in one run."""
