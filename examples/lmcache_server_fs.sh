#!/usr/bin/env bash
# LMCache MP server, KVTC blobs on local disk (fs tier). Needs: pip install lmcache-kvtc (lmcache==0.5.6).
# kvtc-lmcache-server = `lmcache server` with the kvtc serde registered first (same arguments).
kvtc-lmcache-server \
  --host 127.0.0.1 --port 5555 \
  --l1-size-gb 20 --eviction-policy LRU \
  --l2-adapter '{"type": "fs", "base_path": "/var/lib/lmcache/l2",
                 "serde": {"type": "kvtc", "calibration": "/opt/kvtc/calibrations", "ratio": 12, "max_workers": 2}}'
