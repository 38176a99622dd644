"""Modules that need PyTorch (or transformers), imported on first use, so that a torch-free install runs the rest.

``TORCH_MODULES.export`` etc. are module proxies: the first attribute access imports the module; if PyTorch is
not installed that access raises a one-line ``MoeportError`` saying what to install, instead of every command
failing at start-up (the import is module-level in spirit: one place, named here, not scattered in functions).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from moeport.errors import MoeportError

# What the export extra brings; a missing one of these is the user's install, anything else is a bug.
_EXPORT_DEPENDENCIES = ("torch", "onnxscript", "safetensors")


class LazyModule:
    """A proxy for the module ``name``, imported when an attribute is first read; ``needs`` says for what."""

    def __init__(self, name: str, needs: str):
        self._name = name
        self._needs = needs
        self._module: ModuleType | None = None

    def _load(self) -> ModuleType:
        if self._module is None:
            try:
                self._module = importlib.import_module(self._name)
            except ModuleNotFoundError as exc:
                if (exc.name or "").split(".")[0] not in _EXPORT_DEPENDENCIES:
                    raise
                raise MoeportError(f"{self._needs} needs PyTorch ({exc.name} is not installed): "
                                   "pip install torch==2.13.0 'moeport[export]'") from exc
        return self._module

    def __getattr__(self, attribute: str):
        return getattr(self._load(), attribute)


export = LazyModule("moeport.exporter.export", "exporting a checkpoint")
reference = LazyModule("moeport.exporter.reference", "comparing with a PyTorch checkpoint")
catalog = LazyModule("moeport.samples.catalog", "building the sample models")
demo = LazyModule("moeport.demo", "the demo (it exports the bundled sample)")
