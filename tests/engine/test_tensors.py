"""Sums over the trainable tensors (hf_sam.engine.tensors) against float64 arithmetic done by hand."""

import pytest
import torch

from hf_sam.engine.tensors import dot64, global_dot, per_tensor_dots


def _pairs(dtype):
    torch.manual_seed(0)
    shapes = [(300, 70), (5,), (3, 4, 5), ()]
    a = [torch.randn(s).to(dtype) for s in shapes]
    b = [torch.randn(s).to(dtype) for s in shapes]
    a[0] = a[0].t()  # a transposed view: the products pair elements by index, not by memory order
    b[0] = b[0].t().contiguous()
    return a, b


def _exact(x, y) -> float:
    return sum(float(p) for p in (x.double() * y.double()).flatten())  # every exact product, a Python sum


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dots_are_summed_in_float64_within_one_rounding_of_each_product(dtype):
    a, b = _pairs(dtype)
    for x, y in zip(a, b, strict=True):
        got = dot64(x, y)
        assert got.dtype == torch.float64
        bound = 2e-16 if dtype == torch.float64 else 2**-24  # one float32 rounding per product, relative
        scale = float((x.double() * y.double()).abs().sum())
        assert abs(float(got) - _exact(x, y)) <= bound * scale + 1e-12 * scale
    total = sum(_exact(x, y) for x, y in zip(a, b, strict=True))
    everything = sum(float((x.double() * y.double()).abs().sum()) for x, y in zip(a, b, strict=True))
    assert float(global_dot(a, b)) == pytest.approx(total, abs=2**-24 * everything + 1e-12)
    per = per_tensor_dots(a, b)
    assert per.shape == (len(a),) and per.dtype == torch.float64
    for got, x, y in zip(per, a, b, strict=True):
        scale = float((x.double() * y.double()).abs().sum())
        assert float(got) == pytest.approx(_exact(x, y), abs=2**-24 * scale + 1e-12)


def test_a_float32_dot_keeps_tiny_products_beside_a_large_one():
    # 1 + many tiny products: a running float32 sum would drop every tiny one, a float64 sum keeps them
    x = torch.cat([torch.ones(1), torch.full((100_000,), 1e-4)])
    y = torch.cat([torch.ones(1), torch.full((100_000,), 1e-4)])
    want = 1.0 + 100_000 * float(torch.tensor(1e-4)) ** 2
    assert float(dot64(x, y)) == pytest.approx(want, rel=1e-7)
