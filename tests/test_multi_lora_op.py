"""multi_lora_linear (per-row adapters over one NF4 base) against the float64 reference, row by row:
odd N and K, mixed ranks 1..256 in one pool, empty slots, base-only rows, every dtype; errors; compile."""

from __future__ import annotations

import pytest
import torch
from qlora_utils import assert_close_rule, dense_weight, run_script_in_fresh_process

from lora_ops import reference
from lora_ops.nf4 import quantize_nf4
from lora_ops.ops.multi_lora import multi_lora_linear, multi_lora_linear_args
from lora_ops.ops.qlora import qlora_linear


def make_pool(n, k, ranks, r_max, adapter_dtype, generator):
    """Pool tensors with each slot's rank rows random and the rows beyond its rank random too (the kernel
    must not read them: they would change the result)."""
    C = len(ranks)
    A = torch.randn(C, r_max, k, generator=generator) / k**0.5
    Bt = torch.randn(C, r_max, n, generator=generator)
    scales = torch.rand(C, generator=generator) * 2 + 0.25
    adapters = {}
    for c, r in enumerate(ranks):
        if r > 0:
            adapters[c] = (A[c, :r].to(adapter_dtype), Bt[c, :r].t().to(adapter_dtype), float(scales[c]))
    pool = (A.to(adapter_dtype), Bt.to(adapter_dtype), scales, torch.tensor(ranks, dtype=torch.int32))
    return pool, adapters


def make_layer(n, k, m_shape, dtype, blocksize, generator, bias=True):
    block_scale = torch.exp(0.7 * torch.randn(n, -(-k // blocksize), generator=generator))
    w = torch.randn(n, k, generator=generator) * 0.5 * block_scale.repeat_interleave(blocksize, dim=1)[:, :k]
    wq = quantize_nf4(w, blocksize, True)
    x = torch.randn(*m_shape, k, generator=generator).to(dtype)
    b = torch.randn(n, generator=generator).to(dtype) if bias else None
    return wq, x, b


def plain_torch(x, wd, adapters, ids, bias):
    """A plain PyTorch per-row implementation in x's dtype (PEFT-like: LoRA in the adapter dtype)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    y = x2 @ wd.to(x.dtype).t()
    if bias is not None:
        y = y + bias.to(x.dtype)
    for m, c in enumerate(ids.reshape(-1).tolist()):
        if c in adapters:
            A, B, s = adapters[c]
            y[m] = y[m] + ((x2[m : m + 1].to(A.dtype) @ A.t()) @ B.t() * s).to(x.dtype)[0]
    return y.reshape(*x.shape[:-1], wd.shape[0])


def check(n, k, m_shape, ranks, dtype, adapter_dtype, blocksize, rng, bias=True):
    r_max = max(max(ranks), 1)
    wq, x, b = make_layer(n, k, m_shape, dtype, blocksize, rng, bias)
    pool, adapters = make_pool(n, k, ranks, r_max, adapter_dtype, rng)
    C = len(ranks)
    ids = torch.randint(-1, C, m_shape, generator=rng, dtype=torch.int64)
    y = multi_lora_linear(x, wq, *pool, ids, b)
    wd = dense_weight(wq, dtype)
    ref = reference.multi_lora_linear(x, wd, adapters, ids, b)
    plain = plain_torch(x, wd, adapters, ids, b)
    assert y.dtype == dtype and y.shape == (*m_shape, n)
    assert_close_rule(y, ref, plain, dtype, f"multi_lora_linear {m_shape} N={n} K={k} ranks={ranks} {dtype}")
    return y


DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m_shape", [(1,), (5,), (3, 7), (40,)])
def test_mixed_ranks_odd_shapes(dtype, m_shape, rng):
    # ranks 1..256 in one pool with empty slots (0); odd N and K (K not a multiple of the blocksize)
    ranks = [1, 0, 256, 17, 3, 0, 64, 8]
    check(97, 131, m_shape, ranks, dtype, torch.float32, 64, rng)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapters_in_x_dtype(dtype, rng):
    check(65, 257, (9,), [16, 5, 0, 33], dtype, dtype, 32, rng, bias=False)


@pytest.mark.parametrize("m", [1, 8, 32, 64])
def test_decode_and_slab_sizes(m, rng):
    # 512 x 1024 bf16: row-dot fused for M <= 16, the slab GEMM from M = 32 (M·N·K >= 2^24) on AVX-512
    check(512, 1024, (m,), [16] * 12 + [0, 0, 8, 48], torch.bfloat16, torch.float32, 64, rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_x(dtype, rng):
    # x with a column stride of 2 (a strided view), rows of two adapters and the base
    wq, _, b = make_layer(70, 96, (6,), dtype, 32, rng)
    pool, adapters = make_pool(70, 96, [5, 12], 12, torch.float32, rng)
    xs = torch.randn(6, 2 * 96, generator=rng).to(dtype)[:, ::2]
    ids = torch.tensor([0, 1, -1, 1, 0, 0])
    y = multi_lora_linear(xs, wq, *pool, ids, b)
    wd = dense_weight(wq, dtype)
    ref = reference.multi_lora_linear(xs, wd, adapters, ids, b)
    assert_close_rule(y, ref, plain_torch(xs, wd, adapters, ids, b), dtype, "strided x")


def test_all_rows_base_only_equals_base(rng):
    wq, x, b = make_layer(64, 128, (6,), torch.bfloat16, 64, rng)
    pool, _ = make_pool(64, 128, [4, 0, 9], 16, torch.float32, rng)
    ids = torch.tensor([-1, 1, -1, 1, 1, -1])  # the base alone, or an empty slot
    y = multi_lora_linear(x, wq, *pool, ids, b)
    base = torch.ops.lora_ops.qlora_matmul(x, *wq.op_args(), False, None, None, 1.0, b, 0.0, None)
    assert torch.equal(y, base)


def test_one_adapter_for_all_rows_is_the_single_adapter_op(rng):
    wq, x, b = make_layer(96, 192, (2, 5), torch.bfloat16, 64, rng)
    pool, adapters = make_pool(96, 192, [16, 7, 32], 32, torch.float32, rng)
    y = multi_lora_linear(x, wq, *pool, torch.full((2, 5), 1), b)
    A, B, scale = adapters[1]
    assert torch.equal(y, qlora_linear(x, wq, A, B, scale, b))


def test_row_results_do_not_depend_on_other_rows_adapters(rng):
    # The same rows with other rows' adapters changed (same M, so the same base path): bit-identical.
    wq, x, b = make_layer(96, 192, (12,), torch.bfloat16, 64, rng)
    pool, _ = make_pool(96, 192, [16, 7, 32, 1], 32, torch.float32, rng)
    ids = torch.randint(0, 4, (12,), generator=rng)
    y1 = multi_lora_linear(x, wq, *pool, ids, b)
    ids2 = ids.clone()
    ids2[::2] = torch.randint(-1, 4, (6,), generator=rng)
    y2 = multi_lora_linear(x, wq, *pool, ids2, b)
    assert torch.equal(y1[1::2], y2[1::2])
    assert not torch.equal(y1, multi_lora_linear(x, wq, *pool, torch.full_like(ids, -1), b))


def test_torch_compile_matches_eager(rng):
    wq, x, b = make_layer(80, 160, (4, 3), torch.bfloat16, 64, rng)
    pool, _ = make_pool(80, 160, [8, 0, 16], 16, torch.float32, rng)
    ids = torch.randint(-1, 3, (4, 3), generator=rng)
    w, w_meta = wq.op_args()

    def f(x, ids):
        return multi_lora_linear_args(x, w, w_meta, *pool, ids, b) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, ids), f(x, ids))


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    wq = quantize_nf4(torch.randn(24, 64), 64, False)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(2, 5, 64))
        ids = mode.from_tensor(torch.zeros(2, 5, dtype=torch.int64))
        y = multi_lora_linear(x, wq, torch.zeros(3, 4, 64), torch.zeros(3, 4, 24), torch.ones(3),
                              torch.ones(3, dtype=torch.int32), ids)
    assert y.shape == (2, 5, 24) and y.dtype == torch.float32


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(ids=torch.tensor([0, 3])), "adapter_ids\\[1\\] = 3 is not a slot"),
        (dict(ids=torch.tensor([0, -2])), "adapter_ids\\[1\\] = -2"),
        (dict(ids=torch.tensor([0, 1, 2])), "one id per row"),
        (dict(ids=torch.tensor([0, 1], dtype=torch.int32)), "adapter_ids must be int64"),
        (dict(ranks=torch.tensor([4, 9, 0], dtype=torch.int32)), "ranks\\[1\\] = 9 is outside 0..r_max = 8"),
        (dict(ranks=torch.tensor([4, 1, 0])), "ranks must be int32"),
        (dict(A=torch.randn(3, 8, 31)), "A must be the pool \\[capacity, r_max, K\\] with K = 32"),
        (dict(Bt=torch.randn(3, 16, 16)), "Bt must be the pool"),
        (dict(A=torch.randn(3, 8, 32, dtype=torch.float64)), "A must have x's dtype"),
        (dict(scales=torch.tensor([1.0, float("nan"), 1.0])), "scales\\[1\\] = nan is not finite"),
        (dict(x=torch.randn(2, 32, dtype=torch.float64)), "x must be float32, float16 or bfloat16"),
        (dict(x=torch.randn(2, 33)), "x has 33 features"),
    ],
)
def test_bad_inputs_named(change, message):
    wq = quantize_nf4(torch.randn(16, 32), 32, False)
    args = dict(x=torch.randn(2, 32), A=torch.randn(3, 8, 32), Bt=torch.randn(3, 8, 16), scales=torch.ones(3),
                ranks=torch.tensor([4, 8, 0], dtype=torch.int32), ids=torch.tensor([0, 1]))
    args.update(change)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        multi_lora_linear(args["x"], wq, args["A"], args["Bt"], args["scales"], args["ranks"], args["ids"])


_PORTABLE_SCRIPT = """
import sys, torch
sys.path.insert(0, "tests")
from test_multi_lora_op import check
g = torch.Generator().manual_seed(int(sys.argv[1]))
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    check(97, 131, (7,), [1, 0, 256, 17, 3], dtype, torch.float32, 64, g)
    check(33, 64, (20,), [5, 2], dtype, dtype, 64, g)
print("ok")
"""


@pytest.mark.parametrize("env", [{"LORA_OPS_NO_AVX512": "1"}, {"LORA_OPS_NO_AVX2": "1"}])
def test_lower_simd_levels(env, rng):
    seed = int(torch.randint(1, 2**31 - 1, (1,), generator=rng))
    env = dict(env, LORA_OPS_POISON_OUTPUTS="1")
    run_script_in_fresh_process(_PORTABLE_SCRIPT, [str(seed)], env, timeout=300)
