"""The paper's rows (rows.py) and the tools that read them: drivers, parameter counts, comparisons."""
