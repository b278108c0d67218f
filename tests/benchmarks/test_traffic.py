"""benchmarks/traffic.py counts bytes from the dispatched operators: checked on operators whose traffic is
known by hand, then on the engine's k = 1 step, whose traffic docs/performance.md states. The copy way: snapshot
(read w, write the copy), norm (read g), move (read w and g, write w), restore (read the copy, write w) =
8 passes. The swap way: norm (read g), move out of place (read w and g, write the spare buffer), and no
snapshot or restore copy = 4 passes."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from traffic_counter import TrafficCounter  # noqa: E402

from hf_sam import MultiStepAscent  # noqa: E402
from hf_sam.engine.guarded import add_scaled_unless_, copy_where_  # noqa: E402


def test_counter_on_operators_of_known_traffic():
    a, b = [torch.ones(10), torch.ones(6)], [torch.ones(10), torch.ones(6)]
    size = 16 * 4  # bytes of one list
    with TrafficCounter() as c:
        torch._foreach_copy_(a, b)  # read b, write a (the destination is not read)
    assert (c.read, c.written, c.ops) == (size, size, 1)
    with TrafficCounter() as c:
        torch._foreach_add_(a, b)  # read a and b, write a
    assert (c.read, c.written) == (2 * size, size)
    with TrafficCounter() as c:
        out = torch._foreach_norm(a)  # read a, write two scalars
    assert (c.read, c.written) == (size, 2 * 4) and len(out) == 2
    # a guarded add (the fused kernel) reads a and b and writes a, or, told to skip, touches neither: only
    # its few scalars (the flag, the step size) are left, far below one list
    lr = torch.tensor(0.5, dtype=torch.float64)
    with TrafficCounter() as c:
        add_scaled_unless_(a, b, lr, torch.tensor(False))
    assert c.read >= 2 * size and c.written >= size and c.read + c.written < 4 * size
    with TrafficCounter() as c:
        add_scaled_unless_(a, b, lr, torch.tensor(True))
    assert c.read + c.written < size
    # an out-of-place kernel reads its inputs, not its out= destination
    scales, out = [torch.tensor(0.5), torch.tensor(0.5)], [torch.empty(10), torch.empty(6)]
    with TrafficCounter() as c:
        torch.ops.aten._foreach_addcmul.Scalar_out(a, b, scales, 1, out=out)
    assert c.read < 2 * size + 64 and c.read >= 2 * size and c.written == size
    # the guarded copy writes its targets (and its scratch), or, told to skip, touches nothing
    scratch = [torch.ones(10), torch.ones(6)]
    with TrafficCounter() as c:
        copy_where_(a, b, torch.tensor(True), scratch)
    assert 3 * size <= c.read < 4 * size and 2 * size <= c.written < 2 * size + 32  # (+ the flag)
    with TrafficCounter() as c:
        copy_where_(a, b, torch.tensor(False), scratch)
    assert c.read + c.written < size


@pytest.mark.parametrize("way,phases", [("copy", (2, 4, 2)), ("swap", (0, 4, 0))])
def test_the_engine_step_passes_over_the_weights_at_k1(way, phases):
    torch.manual_seed(0)
    weights = [torch.randn(300, 300, requires_grad=True), torch.randn(300, requires_grad=True)]
    one_pass = sum(w.numel() * w.element_size() for w in weights)
    engine = MultiStepAscent(weights, ascent_steps=1, rho=0.05, perturbed_weights=way)
    loss = lambda: (weights[0].sum(1) * weights[1]).square().sum()  # noqa: E731
    engine.step(loss)  # the first step reviews the norms' precision (one read): count the next
    counted = {}
    for name in ("begin", "ascend", "begin_descent", "end_descent", "restore"):
        method = getattr(engine, name)

        def counting(*args, _method=method, _name=name, **kwargs):
            with TrafficCounter() as c:
                result = _method(*args, **kwargs)
            counted[_name] = (c.read + c.written) / one_pass
            return result

        setattr(engine, name, counting)
    engine.step(loss)
    # small scalar tensors (norms, flags, the step size) add bytes far below one pass
    begin, ascend, restore = phases
    assert round(counted["begin"], 2) == begin and round(counted["restore"], 2) == restore
    assert round(counted["ascend"], 2) == ascend
    assert round(sum(counted.values()), 2) == sum(phases)
