"""The project's own code, grouped by concern; run each script from the repository root as a module.

    vendoring/  fetch, patch and overlay the upstreams into vendor/ (build), write patches back
                (export), show what changes (audit), turn the nano-diffusion notebook into a module
    data/       datasets: download and verify, image folders for improved-diffusion, synthetic data
    paper/      the table of paper rows (rows.py) and what reads it: the row drivers, parameter counts,
                the nano-diffusion comparison
    bench/      benchmarks
    images.py   image grids and pixel conversions shared by every tool
    composition.py
                how alike LoRA composition weights are between conditions, and their heatmaps, shared
                by paper/composition_maps.py and nano diffusion's nano_metrics.py

`make` runs them as `python -m tools.<concern>.<script>`; so can you, from the repository root, with
the project's environment (`.venv/bin/python`, where `make setup` installs this package).
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
