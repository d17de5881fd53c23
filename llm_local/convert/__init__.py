"""Model conversion: a model source (hub id, HF directory, .gguf file, a file in an
installed package) becomes a CTranslate2 model in the cache. Entry points: api.py."""
