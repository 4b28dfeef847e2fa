"""The engine. llama.cpp's bindings are loaded first on purpose: llama.cpp's shared libraries must
be loaded before numpy's. With numpy loaded first, a CUDA build of llama-cpp-python crashed in
llama_model_load_from_file (seen on an H100 machine, Python 3.12, numpy 2.5)."""

from cria.engine import _bindings as _bindings  # first: the import order is the point
