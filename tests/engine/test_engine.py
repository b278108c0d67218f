"""The perturbation engine alone (no Trainer): a plain PyTorch loop, and property tests of the
perturbation against a per-tensor reference written here."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import set_seed

from hf_sam import MultiStepAscent, SAMConfig
from hf_sam.engine.rules import ProjectedRule

from ..reference_sam import flatten, sam_gradient
from ..tiny import TinyNet, batch_of, make_data


@pytest.mark.parametrize("rule", ["normalized", "projected", "accumulated"])
@pytest.mark.parametrize("descent", ["last", "mean"])
def test_plain_loop_step_matches_reference(rule, descent):
    set_seed(0)
    model = TinyNet()
    x, y = batch_of(make_data(6))
    config = SAMConfig(ascent_steps=3, rho=0.3, ascent_rule=rule, descent=descent, adaptive=True)
    engine = MultiStepAscent(model.parameters(), **config.engine_kwargs())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    clean = engine.step(lambda: model(x, y)["loss"])
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    want = sam_gradient(flatten(before), shapes, x, y, 3, 0.3, rule=rule, descent=descent, adaptive=True)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        assert float(clean) == pytest.approx(float(torch.nn.functional.cross_entropy(model(x)["logits"], y)))


# ------------------------------------------------------------------ property tests
def _reference_perturbation(weights, grads_fn, k, rho, rule, step_mult, adaptive, eta):
    """Per-tensor float64 loop: the displacement d_k for gradients given by grads_fn(point)."""
    w = [t.double() for t in weights]
    t = [x.abs() + eta if adaptive else torch.ones_like(x) for x in w]
    a = {"normalized": rho / k, "projected": rho * step_mult, "accumulated": rho}[rule]
    d = [torch.zeros_like(x) for x in w]
    for _ in range(k):
        g = [gi.double() for gi in grads_fn([wi + di for wi, di in zip(w, d, strict=True)])]
        u = [ti * gi for ti, gi in zip(t, g, strict=True)]
        norm = math.sqrt(sum(float((ui**2).sum()) for ui in u))
        if not math.isfinite(norm):
            return [torch.zeros_like(x) for x in w], True
        if norm > 0:
            d = [di + a * ti * ui / norm for di, ti, ui in zip(d, t, u, strict=True)]
        if rule == "projected":
            size = math.sqrt(sum(float(((di / ti) ** 2).sum()) for di, ti in zip(d, t, strict=True)))
            if size > rho:
                d = [di * (rho / size) for di in d]
    return d, False


shapes = st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5)


@st.composite
def problems(draw):
    dims = draw(shapes)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    # float32 norms sum float32 squares: gradients beyond their range (1e20, 1e-20) drop the ascent or are a zero
    # gradient by design (test_no_host_sync.test_the_ascent_norm_has_no_mode); within it, every magnitude
    extreme = 1e20 if dtype == torch.float64 else 1e15
    scale = draw(st.sampled_from([1 / extreme, 1e-6, 1.0, 1e6, extreme]))
    zero = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=g, dtype=dtype) for s in dims]
    # gradients of a fixed quadratic-plus-linear field, scaled, so they change along the ascent
    coef = [torch.randn(s, generator=g, dtype=dtype) * scale for s in dims]
    curvature = [torch.rand(s, generator=g, dtype=dtype) * scale for s in dims]
    if zero:
        coef = [c * 0 for c in coef]
        curvature = [c * 0 for c in curvature]
    return weights, coef, curvature, dtype


def _grads(coef, curvature):
    return lambda point: [c + h * p.to(c.dtype) for c, h, p in zip(coef, curvature, point, strict=True)]


EXAMPLES = 150


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    problem=problems(),
    k=st.integers(1, 4),
    rule=st.sampled_from(["normalized", "projected", "accumulated"]),
    adaptive=st.booleans(),
    rho=st.sampled_from([1e-3, 0.05, 1.0]),
    step_mult=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_perturbation_properties(problem, k, rule, adaptive, rho, step_mult):
    weights, coef, curvature, dtype = problem
    if rule != "projected":
        step_mult = 1.0
    params = [w.clone().requires_grad_(True) for w in weights]
    original = [w.clone() for w in weights]
    engine = MultiStepAscent(
        params,
        ascent_steps=k,
        rho=rho,
        ascent_rule=ProjectedRule(step_mult) if rule == "projected" else rule,
        adaptive=adaptive,
        adaptive_eta=0.01,
    )
    grads = _grads(coef, curvature)
    engine.begin()
    for _ in range(k):
        for p, g in zip(params, grads([p.detach() for p in params]), strict=True):
            p.grad = g.clone()
        if not engine.ascend():
            break
    d = [(p.detach() - w).double() for p, w in zip(params, original, strict=True)]
    want, _ = _reference_perturbation(original, grads, k, rho, rule, step_mult, adaptive, 0.01)
    assert all(torch.isfinite(x).all() for x in d)
    scale_t = [w.double().abs() + 0.01 if adaptive else torch.ones_like(w, dtype=torch.float64) for w in original]
    size = math.sqrt(sum(float(((x / t) ** 2).sum()) for x, t in zip(d, scale_t, strict=True)))
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    # w + d is stored in the weights' dtype: each element may round by one ulp of |w|
    eps = torch.finfo(dtype).eps
    rounding = (
        2
        * eps
        * math.sqrt(
            sum(float(((w.double().abs() + 1e-30) / t).pow(2).sum()) for w, t in zip(original, scale_t, strict=True))
        )
    )
    if rule in ("normalized", "projected"):
        assert size <= rho * (1 + tol) + rounding
    else:
        assert size <= k * rho * (1 + tol) + rounding
    # the foreach path agrees with the per-tensor reference (relative to the ball's size)
    worst = math.sqrt(sum(float(((x - y) / t).pow(2).sum()) for x, y, t in zip(d, want, scale_t, strict=True)))
    assert worst <= rho * k * 10 * tol + 4 * rounding
    engine.restore()
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, original, strict=True)), "restore is bit-exact"


@settings(max_examples=60, deadline=None, derandomize=True)
@given(problem=problems(), rho=st.sampled_from([1e-3, 0.05, 1.0]), adaptive=st.booleans())
def test_one_step_is_the_same_for_every_rule(problem, rho, adaptive):
    weights, coef, curvature, _ = problem
    results = []
    for rule in ("normalized", "projected", "accumulated"):
        params = [w.clone().requires_grad_(True) for w in weights]
        engine = MultiStepAscent(params, ascent_steps=1, rho=rho, ascent_rule=rule, adaptive=adaptive)
        engine.begin()
        for p, g in zip(params, _grads(coef, curvature)(weights), strict=True):
            p.grad = g.clone()
        engine.ascend()
        results.append([p.detach().clone() for p in params])
        engine.restore()
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7 * rho)


def test_zero_gradient_does_not_move_or_divide():
    params = [torch.ones(3, requires_grad=True)]
    engine = MultiStepAscent(params, ascent_steps=2, rho=0.1, ascent_rule="projected")
    engine.begin()
    for _ in range(2):
        params[0].grad = torch.zeros(3)
        assert engine.ascend()
    assert torch.equal(params[0].detach(), torch.ones(3))
    assert engine.zero_gradient and not engine.moved and float(engine.perturbation_norm) == 0.0
    engine.restore()


def test_protocol_errors_are_clear():
    params = [torch.ones(2, requires_grad=True)]
    engine = MultiStepAscent(params, ascent_steps=1)
    with pytest.raises(RuntimeError, match="outside"):
        engine.ascend()
    engine.begin()
    with pytest.raises(RuntimeError, match="twice"):
        engine.begin()
    params[0].grad = torch.ones(2)
    engine.ascend()
    params[0].grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="more than"):
        engine.ascend()
    engine.restore()
    with pytest.raises(ValueError, match="no trainable"):
        MultiStepAscent([torch.ones(2)], ascent_steps=1)


@pytest.mark.parametrize("rule", ["normalized", "projected"])
def test_a_tensor_without_gradient_in_a_pass_keeps_none(rule):
    # A tensor that a later pass does not reach (say an MoE expert that gets no tokens once
    # the weights move) takes no step there and ends with grad None, as the stock step leaves
    # it, so the optimizer skips it.
    a = torch.tensor([1.0, -2.0], requires_grad=True)
    b = torch.tensor([0.5], requires_grad=True)
    engine = MultiStepAscent([a, b], ascent_steps=2, rho=0.1, ascent_rule=rule)
    engine.begin()
    ((a**2).sum() + (b**2).sum()).backward()  # pass 1 reaches a and b
    assert engine.ascend()
    a_after_one, b_after_one = a.detach().clone(), b.detach().clone()
    (a**2).sum().backward()  # pass 2 reaches only a: b takes no step
    assert engine.ascend()
    assert b.grad is None
    if rule == "normalized":  # (projected may pull b back into the ball)
        assert torch.equal(b.detach(), b_after_one)
        # step 2 is rho/k along a's gradient alone: b's stale zero buffer must not count
        step = a.detach() - a_after_one
        torch.testing.assert_close(step.norm(), torch.tensor(0.05))
    engine.begin_descent()
    (a**3).sum().backward()  # the descent reaches only a
    descent_point = a.detach().clone()
    engine.restore()
    assert b.grad is None
    assert torch.equal(a.grad, 3 * descent_point**2)
    assert not torch.equal(a_after_one, descent_point)


class _CountOps(TorchDispatchMode):
    """Counts the aten calls made from Python (a foreach call counts once, like its launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _ops_per_phase(n_tensors: int, **engine_kwargs) -> dict[str, list[str]]:
    torch.manual_seed(0)
    params = [torch.randn(5, requires_grad=True) for _ in range(n_tensors)]
    grads = [[torch.randn(5) for _ in params] for _ in range(3)]
    engine = MultiStepAscent(params, ascent_steps=3, rho=0.05, **engine_kwargs)
    phases: dict[str, list[str]] = {}
    for _step in range(2):  # the second step reuses the weight copy: count that one
        for p in params:
            p.grad = torch.randn(5)  # a gradient already accumulated (gradient accumulation)
        with _CountOps() as counter:
            engine.begin()
        phases["begin"] = counter.ops
        for i in range(3):
            for p, g in zip(params, grads[i], strict=True):
                p.grad = g.clone()
            with _CountOps() as counter:
                assert engine.ascend()
            phases[f"ascend_{i + 1}"] = counter.ops
        with _CountOps() as counter:
            engine.begin_descent()
            engine.restore()
        phases["descent"] = counter.ops
    return phases


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {"ascent_rule": "normalized"},
        {"ascent_rule": "projected"},  # step_mult 1
        {"ascent_rule": "accumulated", "descent": "mean"},
        {"ascent_rule": "projected", "adaptive": True},
    ],
)
def test_ops_per_ascent_step_do_not_grow_with_the_number_of_tensors(engine_kwargs):
    # foreach kernels: the same calls (and so, on a GPU, about the same launches) for 3 or 60
    # parameter tensors; a per-tensor Python loop would show up here as 20 times more calls
    few, many = _ops_per_phase(3, **engine_kwargs), _ops_per_phase(60, **engine_kwargs)
    assert few == many
    # about 15 of them are 0-d kernels: the skip, the step size and the projection decided on the device
    assert all(len(ops) <= 40 for ops in many.values()), many


@pytest.mark.parametrize("rule", ["normalized", "projected", "accumulated"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_perturbation_norm_is_the_norm_of_the_descent_point(rule, adaptive, k):
    # measured from the weights at the descent point, in float64, in the rule's norm
    torch.manual_seed(1)
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    w = [p.detach().clone() for p in params]
    engine = MultiStepAscent(params, ascent_steps=k, rho=0.2, ascent_rule=rule, adaptive=adaptive)
    engine.begin()
    for _ in range(k):
        sum((p**3).sum() for p in params).backward()
        assert engine.ascend()
    at_descent = [p.detach().double().clone() for p in params]
    engine.begin_descent()
    engine.restore()
    scale = [(x.double().abs() + 0.01) if adaptive else torch.ones_like(x, dtype=torch.float64) for x in w]
    want = math.sqrt(
        sum(float((((a - x.double()) / t) ** 2).sum()) for a, x, t in zip(at_descent, w, scale, strict=True))
    )
    assert float(engine.perturbation_norm) == pytest.approx(want, rel=1e-5)
    assert all(torch.equal(p.detach(), x) for p, x in zip(params, w, strict=True))
