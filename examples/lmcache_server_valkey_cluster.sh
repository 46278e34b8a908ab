#!/usr/bin/env bash
# Plain `lmcache server`, KVTC blobs in a Redis/Valkey Cluster shared by every server that points at it (valkey
# tier, cluster mode). Needs: pip install 'lmcache-kvtc[valkey]' (valkey-glide-sync). startup_nodes are seeds: the
# client discovers every master and routes each key to the master of its slot. The plugin loader adapter imports
# lmcache_kvtc (registering the kvtc serde); while the cluster is down (cluster_state is not ok, e.g. a master
# died) stores fail and loads miss at once, and it rebuilds the clients when the cluster is back.
lmcache server \
  --host 127.0.0.1 --port 5555 \
  --l1-size-gb 20 --eviction-policy LRU \
  --l2-adapter '{"type": "plugin", "module_path": "lmcache_kvtc.lmcache.loader", "class_name": "KVTCLoaderAdapter",
                 "adapter_params": {"inner": {"type": "valkey", "cluster_mode": true,
                                              "startup_nodes": "10.0.0.11:6379,10.0.0.12:6379,10.0.0.13:6379",
                                              "num_workers": 8, "request_timeout": 2.0},
                                    "reconnect_seconds": 2.0},
                 "serde": {"type": "kvtc", "calibration": "/opt/kvtc/calibrations", "ratio": 12, "max_workers": 2}}'
