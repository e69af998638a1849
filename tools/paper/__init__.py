"""The table of paper rows (rows.py), their parameter counts (params.py) and the README's tables written from it (readme.py)."""
