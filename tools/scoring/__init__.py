"""FID of every snapshot by the paper's protocol (score.py), each upstream's part of it (upstreams.py), records and results."""
