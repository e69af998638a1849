"""Datasets: downloads with checksums, image folders in improved-diffusion's layout, synthetic data for tests."""
