"""The calibration driver (the ``[calibrate]`` extra: transformers, tqdm, matplotlib): capture a decoder's KV cache,
fit the PCA (``fitting``), measure the quantizer's rate–distortion curves (``planning``), choose the plan ladder,
and report. :func:`~.driver.calibrate` is the entry point; ``fitting`` and ``planning`` need only torch."""
