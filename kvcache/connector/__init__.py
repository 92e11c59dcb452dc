"""The engine side of the cache: model helpers now, engine adapters (transformers, vLLM) later."""
