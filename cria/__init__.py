"""Cria: an OpenAI-compatible server for local GGUF models, batching continuously on llama.cpp."""

__version__ = "0.1.0"
