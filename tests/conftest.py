"""Shared test setup: output poisoning for every kernel, device parametrization, fresh seeds."""

import os

# Must be set before lora_ops._C is loaded: every kernel output starts as 0xFF bytes (NaN), so an
# element a kernel forgets to write fails the comparison.
os.environ.setdefault("LORA_OPS_POISON_OUTPUTS", "1")

import signal  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU"))]


# LORA_OPS_TEST_TIMEOUT=S fails a test whose call runs longer than S seconds (scripts/gpu_check.sh sets it,
# so one hung test cannot eat the step's time; a hang inside a C call ends only with the step's own limit).
_TEST_TIMEOUT = float(os.environ.get("LORA_OPS_TEST_TIMEOUT", "0") or 0)
if _TEST_TIMEOUT > 0:

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(item):
        def expire(signum, frame):
            raise TimeoutError(f"{item.nodeid}: over LORA_OPS_TEST_TIMEOUT={_TEST_TIMEOUT:g} s")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, _TEST_TIMEOUT)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


@pytest.fixture(params=DEVICES)
def device(request):
    """Runs a test on the CPU, and again on CUDA when a GPU is present."""
    return request.param


@pytest.fixture
def rng(request):
    """A generator seeded freshly per test from the OS; the seed is printed on failure."""
    seed = int(os.environ.get("LORA_OPS_TEST_SEED", 0)) or int.from_bytes(os.urandom(4), "little")
    print(f"rng seed {seed} (rerun with LORA_OPS_TEST_SEED={seed})")  # shown by pytest on failure
    return torch.Generator().manual_seed(seed)


def randn(*shape, generator, dtype=torch.float32, device="cpu", scale=1.0):
    """Non-zero random normal data (never all-zero) made on the CPU for reproducibility."""
    t = torch.randn(*shape, generator=generator, dtype=torch.float32) * scale
    return t.to(dtype).to(device)


def _simulate_bnb_cpu_repack() -> None:
    """LORA_OPS_TEST_BNB_REPACK=1: every bitsandbytes Linear4bit built in this run behaves as on an
    avx512_bf16 CPU, where its eval-mode no-grad forward repacks the weight (bf16 absmax). CI sets it for
    a second pass over the bitsandbytes-facing tests on any CPU, so a test that trusts bnb's repacked
    path fails on every machine, not only on the Intel Xeon that takes it for real."""
    try:
        import bitsandbytes.nn.modules as bnb_modules
    except ImportError:
        return
    bnb_modules.has_avx512bf16 = lambda: True  # read by Linear4bit.__init__ (support_avx512bf16_for_cpu)


if os.environ.get("LORA_OPS_TEST_BNB_REPACK") == "1":
    _simulate_bnb_cpu_repack()


def pytest_terminal_summary(terminalreporter):
    # Which CPU SIMD tiers this machine could not force and test (tests/cpu_tiers.py): their tests skipped.
    try:
        import cpu_tiers
    except Exception:  # noqa: BLE001 - the extension failed to load: other errors say so
        return
    missing = cpu_tiers.not_runnable()
    terminalreporter.write_line(f"lora_ops CPU tiers: this CPU runs up to {cpu_tiers.SUPPORTED}; "
                                + (f"not tested here (the CPU lacks them): {', '.join(missing)}" if missing
                                   else "every tier (" + ", ".join(cpu_tiers.TIERS) + ") forced and tested"))
