"""End-to-end checks: a run killed mid-write resumes (make kill-check); LoRA snapshots load in pristine EDM."""
