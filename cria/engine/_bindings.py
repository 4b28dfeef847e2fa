"""llama-cpp-python's ctypes bindings, without the rest of the package.

`import llama_cpp` runs the package's __init__, which also imports its high-level API (`Llama`,
chat formats, grammars, caches, jinja2...): ~10 MiB resident and ~80 modules that Cria never
uses. Only `llama_cpp.llama_cpp` (the bindings, which load the shared libraries) is needed, so
the package is entered here through a bare module standing in for it. If something imported the
real package first, that one is used.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types


def _load() -> types.ModuleType:
    package = sys.modules.get("llama_cpp")
    if package is None:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("llama-cpp-python is not installed")
        package = types.ModuleType("llama_cpp")
        package.__path__ = list(spec.submodule_search_locations)
        package.__file__ = spec.origin
        package.__spec__ = spec
        sys.modules["llama_cpp"] = package
        try:
            bindings = importlib.import_module("llama_cpp.llama_cpp")
        except BaseException:
            del sys.modules["llama_cpp"]
            raise
        # `import llama_cpp` elsewhere in this process still finds the low-level names.
        package.__dict__.update({k: v for k, v in vars(bindings).items() if not k.startswith("_")})
        try:
            package.__version__ = importlib.metadata.version("llama-cpp-python")  # type: ignore[attr-defined]
        except importlib.metadata.PackageNotFoundError:
            package.__version__ = "unknown"  # type: ignore[attr-defined]
    return package  # the real package re-exports every low-level name too


llama_cpp = _load()
