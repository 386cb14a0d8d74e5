"""Registering quant_method "lora_ops" with transformers without importing transformers with lora_ops.

Importing transformers' loading machinery costs about two seconds, which most uses of lora_ops do not
need. So: when transformers' ``modeling_utils`` is already imported, register now; otherwise register right
after it is first imported (a one-shot import hook). Every ``from_pretrained`` imports ``modeling_utils``
first, so a saved ``"lora_ops"`` checkpoint always finds its quantizer."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_TRIGGER = "transformers.modeling_utils"


def _register() -> None:
    from lora_ops.integrations import transformers_quantizer

    transformers_quantizer.register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)  # one shot; the lookup below then finds the real module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if importlib.util.find_spec("transformers") is None:
        return
    if _TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
