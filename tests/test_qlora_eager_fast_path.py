"""The eager fast path of qlora_linear (lora_ops.ops.qlora._QLoRALinearEager) against the autograd
registered with torch.library (what torch.compile traces): the same outputs and gradients bit for bit,
the registered path still the one in compiled graphs, and the layers' per-call weight arguments
(read from the buffers, nothing cached) following every change of the base."""

from __future__ import annotations

import pytest
import torch
from qlora_utils import DEVICES, dense_weight, make_problem

from lora_ops import reference
from lora_ops.nn import QLoRALinear
from lora_ops.ops import qlora as qlora_ops

bf16 = torch.bfloat16


def _run(x, wq, A, B, b, scale, p, rng, dy, fast: bool):
    qlora_ops.EAGER_FAST_PATH = fast
    try:
        x, A, B = (t.detach().clone().requires_grad_() for t in (x, A, B))
        y = qlora_ops.qlora_linear(x, wq, A, B, scale, b, p, rng)
        y.backward(dy)
        return y.detach(), x.grad, A.grad, B.grad, type(y.grad_fn).__name__
    finally:
        qlora_ops.EAGER_FAST_PATH = True


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype, adapter_dtype, double_quant, bias, p",
    [
        (torch.float32, torch.float32, True, False, 0.0),
        (torch.float32, torch.float32, False, True, 0.25),
        (bf16, torch.float32, True, True, 0.1),
        (bf16, bf16, False, False, 0.0),
    ],
)
def test_fast_path_equals_registered_autograd_bit_for_bit(device, dtype, adapter_dtype, double_quant, bias, p, rng):
    wq, x, A, B, b = make_problem((3, 5), 48, 64, 8, dtype, device, adapter_dtype, 64, double_quant, bias, generator=rng)
    dy = torch.randn(3, 5, 48, generator=rng).to(dtype).to(device)
    seed = qlora_ops.make_rng(int(torch.randint(0, 2**40, (1,), generator=rng)))
    fast = _run(x, wq, A, B, b, 0.75, p, seed, dy, fast=True)
    registered = _run(x, wq, A, B, b, 0.75, p, seed, dy, fast=False)
    assert fast[-1] == "_QLoRALinearEagerBackward" and "Eager" not in registered[-1]  # two paths ran
    for f, r, what in zip(fast[:-1], registered[:-1], ("y", "dx", "dA", "dB")):
        assert f.dtype == r.dtype and torch.equal(f, r), what
    # and both are the layer: the float64 oracle (loose: NF4 rounding in the compute dtype)
    w = dense_weight(wq, dtype).to(device)
    ref, _ = reference.qlora_linear(x, w, A, B, 0.75, b, p, int(seed[0]), int(seed[1]))
    grads = reference.qlora_linear_backward(dy, x, w, A, B, 0.75, p, int(seed[0]), int(seed[1]))
    for got, want in zip(fast[:4], (ref, *grads)):
        assert (got.double() - want).abs().max() <= 0.02 * want.abs().max()


def test_default_dropout_rng_is_the_same_draw_on_both_paths(rng):
    """rng=None with dropout: the fast path draws with make_rng, the registered path through the
    draw_dropout_rng op; one torch.manual_seed gives both the same mask."""
    wq, x, A, B, _ = make_problem((6,), 32, 64, 4, torch.float32, "cpu", generator=rng)
    dy = torch.randn(6, 32, generator=rng)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    torch.manual_seed(seed)
    fast = _run(x, wq, A, B, None, 2.0, 0.5, None, dy, fast=True)
    torch.manual_seed(seed)
    registered = _run(x, wq, A, B, None, 2.0, 0.5, None, dy, fast=False)
    for f, r in zip(fast[:-1], registered[:-1]):
        assert torch.equal(f, r)
    torch.manual_seed(seed + 1)
    other = _run(x, wq, A, B, None, 2.0, 0.5, None, dy, fast=True)
    assert not torch.equal(other[0], fast[0])  # the mask does follow the generator


@pytest.mark.parametrize("needs", ["x", "A", "B", "AB", "none"])
def test_fast_path_partial_gradients(needs, rng):
    wq, x, A, B, _ = make_problem((4,), 32, 64, 4, torch.float32, "cpu", generator=rng)
    dy = torch.randn(4, 32, generator=rng)
    grads = {}
    for fast in (True, False):
        qlora_ops.EAGER_FAST_PATH = fast
        try:
            xs, As, Bs = (t.detach().clone().requires_grad_(name in needs) for t, name in ((x, "x"), (A, "A"), (B, "B")))
            y = qlora_ops.qlora_linear(xs, wq, As, Bs, 0.5)
            if needs == "none":
                assert y.grad_fn is None and not y.requires_grad
                grads[fast] = [y]
                continue
            y.backward(dy)
            grads[fast] = [y.detach()] + [t.grad for t in (xs, As, Bs)]
        finally:
            qlora_ops.EAGER_FAST_PATH = True
    for f, r in zip(grads[True], grads[False]):
        assert (f is None) == (r is None) and (f is None or torch.equal(f, r))


def test_fast_path_without_grad_mode_matches(rng):
    wq, x, A, B, b = make_problem((4,), 32, 64, 4, torch.float32, "cpu", generator=rng)
    A.requires_grad_()
    with torch.no_grad():
        y = qlora_ops.qlora_linear(x, wq, A, B, 0.5, b)
    assert y.grad_fn is None
    with torch.inference_mode():
        y_inf = qlora_ops.qlora_linear(x, wq, A, B, 0.5, b)
    qlora_ops.EAGER_FAST_PATH = False
    try:
        with torch.no_grad():
            y_reg = qlora_ops.qlora_linear(x, wq, A, B, 0.5, b)
    finally:
        qlora_ops.EAGER_FAST_PATH = True
    assert torch.equal(y, y_reg) and torch.equal(y_inf, y_reg)


def _layer(rng, dropout=0.0):
    lin = torch.nn.Linear(64, 40, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 64, generator=rng) * 0.2)
        lin.bias.copy_(torch.randn(40, generator=rng))
    layer = QLoRALinear.from_linear(lin, r=8, alpha=16, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(40, 8, generator=rng))
    return layer


def test_compiled_module_traces_the_registered_op_and_equals_eager_bit_for_bit(rng):
    layer = _layer(rng)
    x = torch.randn(2, 7, 64, generator=rng)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def run(fn):
        layer.zero_grad()
        xs = x.clone().requires_grad_()
        y = fn(xs)
        y.square().sum().backward()
        return y.detach(), xs.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()

    eager = run(layer)
    compiled = run(torch.compile(layer, fullgraph=True, backend=backend))
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("lora_ops.qlora_linear" in t for t in targets), targets  # the registered op, not the Function
    assert not any("Eager" in t for t in targets)
    for e, c, what in zip(eager, compiled, ("y", "dx", "dA", "dB")):
        assert torch.equal(c, e), what


# ---- the layers' weight arguments follow the base (nothing cached) -------------------------------------
def _same_as_fresh(layer, x):
    """layer(x) equals a freshly built layer over the same state (bit for bit)."""
    fresh = QLoRALinear(layer.in_features, layer.out_features, layer.r, layer.lora_alpha, bias=layer.bias is not None,
                        double_quant=layer.weight_absmax.dtype == torch.uint8, base_dtype=layer.base_dtype)
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        return torch.equal(layer(x), fresh(x))


def test_layer_sees_load_state_dict_in_place_updates_and_to(rng):
    layer, other = _layer(rng), _layer(rng)
    x = torch.randn(5, 64, generator=rng)
    with torch.no_grad():
        y0 = layer(x)
    layer.load_state_dict(other.state_dict())  # copies into the existing buffers
    with torch.no_grad():
        assert torch.equal(layer(x), other(x)) and not torch.equal(layer(x), y0)
    with torch.no_grad():
        layer.weight_packed.copy_(layer.weight_packed.flip(0))  # an in-place update of the codes
        layer.weight_absmax.copy_(layer.weight_absmax.roll(1))
    assert _same_as_fresh(layer, x)
    with torch.no_grad():
        assert not torch.equal(layer(x), other(x))
    layer.load_state_dict(other.state_dict(), assign=True)  # replaces the buffer objects
    with torch.no_grad():
        assert torch.equal(layer(x), other(x))
    layer.weight_absmax.data = layer.weight_absmax.data.roll(3)  # .data swapped under the same object
    assert _same_as_fresh(layer, x)
    layer.to(torch.float64)  # adapters follow, the base keeps its format dtypes
    assert layer.weight_absmax.dtype == torch.uint8 and layer.lora_A.weight.dtype == torch.float64
    with torch.no_grad():
        y64 = layer(x.double())
    assert y64.dtype == torch.float64 and torch.isfinite(y64).all()


def test_layer_sees_a_replaced_base(rng):
    layer = _layer(rng)
    x = torch.randn(5, 64, generator=rng)
    layer.eval()
    with torch.no_grad():
        y = layer(x)
        new, _ = layer.merge_to_nf4(inplace=True)
        assert torch.equal(layer(x), qlora_ops.qlora_matmul(x, new, bias=layer.bias))
        layer.unmerge()
        assert torch.equal(layer(x), y)
