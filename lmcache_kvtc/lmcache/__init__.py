"""LMCache 0.5.6 integration of KVTC; importing it registers the ``kvtc`` serde.

Kept apart from the core package so ``lmcache_kvtc`` itself imports without LMCache.
"""

from .serde import SERDE_TYPE, register

register()

__all__ = ["SERDE_TYPE", "register"]
