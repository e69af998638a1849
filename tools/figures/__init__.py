"""Pictures: image grids, composition-weight maps, the paper's Fig. 3, 4, 5 and 7."""
