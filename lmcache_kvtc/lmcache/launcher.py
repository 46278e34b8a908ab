"""``kvtc-lmcache-server``: ``lmcache server`` with the ``kvtc`` serde registered first.

LMCache resolves ``"serde": {"type": "kvtc"}`` while it builds the L2 adapters at server start,
and it imports no third-party module by itself. This command imports the package (which
registers the serde) and then hands the very same arguments to LMCache's own CLI::

    kvtc-lmcache-server --l1-size-gb 20 --eviction-policy LRU \\
        --l2-adapter '{"type":"fs","base_path":"/data/l2","serde":{"type":"kvtc","calibration":"/opt/kvtc/m"}}'

(``kvtc-lmcache-server server ...`` is accepted too.) vLLM's ``lmcache.mp.autostart`` spawns
``python -m lmcache.v1.multiprocess.http_server`` instead; use the plugin loader adapter there.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .serde import register


def main(argv: Sequence[str] | None = None) -> None:
    """Register kvtc, then run ``lmcache server <argv>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["server"]:
        args = args[1:]
    register()
    from lmcache.cli.main import main as lmcache_main

    lmcache_main(["server", *args])


if __name__ == "__main__":
    main()
