"""Training: the recipe (every training default decided there), calibration, the one training loop, class-lr.
Uses `head/`, `model/` and `data/`."""
