"""Measures of segmentations: overlap and distance metrics, anatomical validity, clinical indices, calibration,
and their aggregation (numpy/scipy/scikit-image only, never torch)."""
