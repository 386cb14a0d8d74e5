"""bitsandbytes for the compatibility tests: optional on a developer machine, REQUIRED under CI
(CI=true), where a missing bitsandbytes must fail the run instead of silently skipping the tests."""

import importlib
import os

import pytest


def import_bnb():
    if os.environ.get("CI"):
        return importlib.import_module("bitsandbytes")
    return pytest.importorskip("bitsandbytes")


def no_bnb_cpu_repack(model):
    """Keeps bitsandbytes' lossy CPU inference path off a witness model: on an avx512_bf16 CPU,
    bnb 0.50's Linear4bit.forward in eval mode without grad repacks the weight with bf16-rounded absmax
    (and crashes unless N % 32 == 0 and K % blocksize == 0), so its outputs are no longer the checkpoint's.
    Returns ``model``."""
    bnb = import_bnb()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def spec_absmax(quant_state):
    """The float32 absmax of a bitsandbytes QuantState decoded by the spec oracle (reference.py): the
    nested (double-quant) form when present, else a copy of the plain one."""
    from lora_ops import reference

    qs = quant_state
    return reference.nested_absmax(qs.absmax, qs.state2.absmax, qs.offset) if qs.nested else qs.absmax.clone()
