"""bitsandbytes for the compatibility tests: optional on a developer machine, REQUIRED under CI
(CI=true), where a missing bitsandbytes must fail the run instead of silently skipping the tests."""

import importlib
import os

import pytest


def import_bnb():
    if os.environ.get("CI"):
        return importlib.import_module("bitsandbytes")
    return pytest.importorskip("bitsandbytes")
