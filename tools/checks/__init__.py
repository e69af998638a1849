"""End-to-end checks: a run killed mid-write resumes (make kill-check); an interrupted make vendor-edm
REBUILD=1 leaves correct trees and the user's files (make vendor-interrupt-check); LoRA snapshots load in
pristine EDM."""
