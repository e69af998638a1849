"""The project's own code, one folder a concern; run each script from the repository root as a module.

    paper/      the table of paper rows (rows.py: flags, LoRA sizes, the paper's counts and FIDs, run
                folder names), their parameter counts (params.py) and the README's tables (readme.py)
    drivers/    one paper row end to end with the upstream's own scripts: edm.py, iddpm.py (steps.py:
                what they share), authors_checkpoint.py (the paper authors' released snapshots)
    scoring/    FID of every snapshot: upstreams.py (each upstream's launcher, snapshots, sampler and
                protocol), score.py, records.py (the score records), fid_steps.py and fid_standin.py (EDM's
                fid.py, or with a stand-in detector), digit_detector.py and fid_digits.py (the mini tables'
                digit classifier in fid.py, and KID), results.py (`make results`)
    figures/    pictures: images.py (grids, pixels), composition.py (composition-weight similarity),
                class_grid.py (Fig. 5), composition_maps.py (Fig. 4, 7), nano_compare.py (Fig. 3)
    checks/     end-to-end checks: kill_check.py with kill_midwrite.py, pristine_check.py,
                vendor_interrupt_check.py
    vendoring/  vendor/: build, export (make patches), audit, run (an upstream command in its tree),
                notebook (the nano-diffusion notebook as a module)
    data/       datasets: downloads with checksums, image folders, synthetic data, the mini tables' MNIST
                digits (mini_digits.py), the checks before training (dataset_check.py)
    bench/      benchmarks

Imports go one way, never back: vendoring and data, then paper, scoring, figures, drivers, checks
(each imports only folders before it; bench imports paper and vendoring). `make` runs scripts as `python -m tools.<concern>.<script>`;
so can you, from the repository root, with the project's environment (`.venv/bin/python`).
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
