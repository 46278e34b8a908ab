"""Tools of the checkout, never installed: offline models and texts (``models``, ``texts``, ``pypi``), calibration
recipes for them (``recipes``), and the main job (``roundtrip``) with its LMCache StorageManager driver (``tiers``)."""
