"""Offline real models, real text and KV-cache capture used to calibrate and evaluate KVTC."""
