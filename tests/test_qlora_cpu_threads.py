"""The CPU matmul kernels run one thread below a work threshold (csrc/kernels/cpu/qlora_cpu.cpp,
worth_threads) and OpenMP threads above it: results must not depend on the thread count on either side."""

from __future__ import annotations

import pytest
import torch
from qlora_utils import make_problem

from lora_ops import _native
from lora_ops.ops import qlora as qlora_ops


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])  # 0: the 6x16 kernel folds the LoRA term into its reduction
@pytest.mark.parametrize("m_shape, n, k", [((2,), 64, 64), ((3,), 512, 640), ((70,), 96, 128), ((300,), 256, 192),
                                           ((300,), 40, 320)])
def test_forward_and_backward_do_not_depend_on_threads(m_shape, n, k, dropout_p, rng):
    wq, x, A, B, b = make_problem(m_shape, n, k, 8, torch.float32, "cpu", generator=rng)
    dy = torch.randn(*m_shape, n, generator=rng)
    seed = qlora_ops.make_rng(int(torch.randint(0, 2**40, (1,), generator=rng)))
    threads = torch.get_num_threads()
    results = []
    try:
        for nt in (1, max(2, threads)):
            torch.set_num_threads(nt)
            xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
            y = qlora_ops.qlora_linear(xs, wq, As, Bs, 0.5, b, dropout_p, seed)
            y.backward(dy)
            results.append((y.detach(), xs.grad, As.grad, Bs.grad))
    finally:
        torch.set_num_threads(threads)
    for one, many, what in zip(*results, ("y", "dx", "dA", "dB")):
        assert torch.equal(one, many), what


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemm_rows_do_not_depend_on_row_blocking(dtype, rng):
    # The kGemm path converts x in M-blocks (256..1024 rows); every output element is computed the same
    # way whichever block and row part its row falls in: one call over 1100 rows equals four calls over
    # slices of it (with the LoRA term folded into the reduction, forward and dx).
    # (M·N·K below 2^24: the tiers whose tables send large M to the slab path leave it on the kGemm path)
    wq, x, A, B, _ = make_problem((1100,), 48, 300, 8, dtype, "cpu", bias=False, generator=rng)
    s = torch.randn(1100, 8, generator=rng)
    dy = torch.randn(1100, 48, generator=rng).to(dtype)
    cuts = [0, 300, 557, 1024, 1100]
    for transpose in (False, True):
        assert _native.cpu_matmul_path(1100, 48, 300, str(dtype)[6:], transpose) == "gemm"
    for a, w, transpose in ((x, B, False), (dy, A.t(), True)):
        whole = qlora_ops.qlora_matmul(a, wq, transpose, s, w, 0.5)
        parts = torch.cat([qlora_ops.qlora_matmul(a[i:j], wq, transpose, s[i:j], w, 0.5)
                           for i, j in zip(cuts, cuts[1:])])
        assert not torch.isnan(whole).any()
        assert torch.equal(whole, parts), "dx" if transpose else "forward"
