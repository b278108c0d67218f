"""The device-decided updates (hf_sam/guarded.py) against plain per-tensor arithmetic."""

import pytest
import torch

from hf_sam.engine.guarded import add_scaled_unless_, copy_where_, reset_where_, uniform


def _cases():
    torch.manual_seed(0)
    transposed = torch.randn(3, 4).t()  # not contiguous: the fused kernel would pair it wrongly
    return [
        torch.randn(5),
        torch.randn(2, 3, dtype=torch.float64),
        torch.randn(4, dtype=torch.bfloat16),
        transposed,
        torch.randn(2, 2, 3, 3).to(memory_format=torch.channels_last),
    ]


@pytest.mark.parametrize("scale", [0.5, 1e-3, 1e37])
def test_add_scaled_matches_per_tensor_arithmetic(scale):
    targets = _cases()
    sources = [torch.randn(t.shape, dtype=t.dtype) for t in targets]  # contiguous, whatever the target
    want = [(t.double() + scale * s.double()).to(t.dtype) for t, s in zip(targets, sources, strict=True)]
    add_scaled_unless_(targets, sources, torch.tensor(scale, dtype=torch.float64), torch.tensor(False))
    for got, expected in zip(targets, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-2 if got.dtype == torch.bfloat16 else 1e-6, atol=0)


def test_a_skipped_update_writes_nothing_even_from_nan_sources():
    targets = _cases()
    before = [t.clone() for t in targets]
    sources = [torch.full(t.shape, float("nan"), dtype=t.dtype) for t in targets]
    add_scaled_unless_(targets, sources, torch.tensor(float("inf"), dtype=torch.float64), torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(targets, before, strict=True))


@pytest.mark.parametrize("flag", [False, True])
def test_reset_where_is_exact_both_ways(flag):
    targets = _cases()
    sources = [torch.randn(t.shape, dtype=t.dtype) for t in targets]
    want = [(s if flag else t).clone() for t, s in zip(targets, sources, strict=True)]
    reset_where_(targets, sources, torch.tensor(flag))
    assert all(torch.equal(a, b) for a, b in zip(targets, want, strict=True))


def test_uniform_targets_with_a_non_contiguous_source_take_the_safe_path():
    torch.manual_seed(1)
    targets = [torch.randn(4, 3), torch.randn(3, 4)]
    assert uniform(targets)
    sources = [torch.randn(3, 4).t(), torch.randn(3, 4)]  # the first is a transposed view
    want = [t + 0.25 * s for t, s in zip(targets, sources, strict=True)]
    add_scaled_unless_(targets, sources, torch.tensor(0.25, dtype=torch.float64), torch.tensor(False), True)
    for got, expected in zip(targets, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("flag", [False, True])
def test_copy_where_is_exact_both_ways_even_over_non_finite_targets(flag):
    targets = _cases()
    for t in targets:  # what a dropped out-of-place move leaves: w + 0 * inf
        t[(0,) * t.dim()] = float("nan")
        t[(-1,) * t.dim()] = float("inf")
    sources = [torch.randn(t.shape, dtype=t.dtype) for t in targets]
    scratch = [torch.randn(t.shape, dtype=t.dtype) for t in targets]
    scratch[0][0] = float("inf")  # a non-finite gradient as the scratch: it stays what it was
    scratch[0][1] = -0.0
    want_targets = [(s if flag else t).clone() for t, s in zip(targets, sources, strict=True)]
    want_scratch = [x.clone() for x in scratch]
    copy_where_(targets, sources, torch.tensor(flag), scratch)
    for got, want in zip(targets, want_targets, strict=True):
        assert torch.equal(got, want) if flag else torch.equal(got.nan_to_num(), want.nan_to_num())
    assert all(torch.equal(a, b) for a, b in zip(scratch, want_scratch, strict=True)), "the scratch keeps its values"
    if not flag:  # nothing written at all: even a zero's sign stays
        assert torch.signbit(scratch[0][1])
