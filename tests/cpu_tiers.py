"""The CPU kernels' SIMD tiers (csrc/kernels/cpu/cpu_isa.h) and the environment caps that force each one in
a fresh process (read once at library load). Tests parametrized with ``tier_params()`` run every tier this
CPU can run and skip, naming it, each tier it cannot; the session's summary lists those
(conftest.py: pytest_terminal_summary)."""

from __future__ import annotations

import pytest

from lora_ops import _native

TIERS = _native.CPU_TIERS  # lowest first
# The environment that caps a process at each tier (on a CPU that has it).
TIER_ENV = {"portable": {"LORA_OPS_NO_AVX2": "1"}, "avx2": {"LORA_OPS_NO_AVX512": "1"},
            "avx512": {"LORA_OPS_NO_AVX512_BF16": "1"}, "avx512_bf16": {}}
SUPPORTED = _native.CPU_SIMD_SUPPORTED


def runnable(tier: str) -> bool:
    return TIERS.index(tier) <= TIERS.index(SUPPORTED)


def not_runnable() -> list[str]:
    return [t for t in TIERS if not runnable(t)]


def tier_params(tiers=TIERS) -> list:
    """pytest params (id = tier name) of the tiers' environments; a tier this CPU lacks is skipped."""
    return [pytest.param(TIER_ENV[t], id=t, marks=pytest.mark.skipif(
        not runnable(t), reason=f"this CPU cannot run the {t} tier (it has up to {SUPPORTED})")) for t in tiers]


def lower_tiers() -> tuple[str, ...]:
    """Every tier below the top one (the test process itself runs the CPU's own tier)."""
    return TIERS[:-1]
