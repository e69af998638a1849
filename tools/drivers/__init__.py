"""Paper-row drivers: train, score and show one row with the upstream's own scripts (make edm-*, make iddpm-*)."""
