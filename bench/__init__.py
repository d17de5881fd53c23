"""The benchmark suite: `python -m bench` (or `make bench`) runs every scenario side by side.

Scenarios, all on the same converted SmolLM2 model and the same prompts, greedy:

- ``ct2-stream``: in-process CTranslate2, one stream (`generate_tokens`, one thread);
- ``ct2-batch``: in-process `generate_batch` on two single-thread workers (the ceiling);
- ``grpc``: the real server (`llm-local serve`) through the official grpcio client;
- ``llama.cpp``: llama.cpp's own server on the same GGUF (the peer), when built;
- ``transformers``: transformers `generate` in float32 (the reference);
- ``gateway``: the open loop shaped like the gateway (capacity at SLO);
- ``call-turns``, ``structured``, ``lora``: studies of one feature on and off (llama_cpp;
  structured output on transformers too),
  in process (bench/studies.py).

Pure parts (statistics, ratios, targets, rendering) live apart from the parts that
start processes and measure, so they can be unit-tested without timings.
"""
