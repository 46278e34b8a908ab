"""Calibration machinery (needs the ``[calibrate]`` extra: transformers, tqdm, matplotlib): capture a decoder's KV
cache, fit the PCA and bit plans on it, measure and report. :func:`~.driver.calibrate` is the entry point."""
