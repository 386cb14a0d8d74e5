"""Dropout masks follow torch's default generator: the same torch.manual_seed gives the same masks
in eager mode and under torch.compile (Inductor lowers torch.randint to its own Philox stream, so a
seed drawn inline in a compiled forward would differ)."""

from __future__ import annotations

import torch

from lora_ops import QLoRALinear, make_rng
from lora_ops.ops.qlora import draw_dropout_rng


def test_draw_is_make_rng_from_the_default_generator_also_compiled():
    torch.manual_seed(7)
    expected = [make_rng(), make_rng()]
    torch.manual_seed(7)
    assert all(torch.equal(draw_dropout_rng(), e) for e in expected)
    compiled = torch.compile(lambda: draw_dropout_rng(), fullgraph=True, backend="inductor")
    torch.manual_seed(7)
    assert all(torch.equal(compiled(), e) for e in expected)  # two calls: two draws, not one cached


def test_qlora_linear_module_eager_equals_inductor_with_dropout():
    layer = QLoRALinear.from_linear(torch.nn.Linear(64, 48), r=4, alpha=8, dropout=0.3)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(10, 64, requires_grad=True)

    def run(fn):
        torch.manual_seed(99)
        x.grad = None
        layer.zero_grad()
        ys = [fn(x) for _ in range(2)]  # two steps: the generator advances between them
        sum(y.square().sum() for y in ys).backward()
        return [y.detach() for y in ys] + [x.grad.clone(), layer.lora_A.weight.grad.clone()]

    eager = run(layer)
    assert not torch.equal(eager[0], eager[1])  # a fresh mask per call
    compiled = run(torch.compile(layer, fullgraph=True, backend="inductor"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
