#!/usr/bin/env bash
# Plain `lmcache server`, KVTC blobs in Redis (resp tier). The plugin loader adapter imports lmcache_kvtc
# (registering the kvtc serde) and rebuilds the Redis connection after an outage.
lmcache server \
  --host 127.0.0.1 --port 5555 \
  --l1-size-gb 20 --eviction-policy LRU \
  --l2-adapter '{"type": "plugin", "module_path": "lmcache_kvtc.lmcache.loader", "class_name": "KVTCLoaderAdapter",
                 "adapter_params": {"inner": {"type": "resp", "host": "127.0.0.1", "port": 6379},
                                    "reconnect_seconds": 2.0},
                 "serde": {"type": "kvtc", "calibration": "/opt/kvtc/calibrations", "ratio": 12, "max_workers": 2}}'
