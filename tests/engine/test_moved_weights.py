"""The buffer swap's invariants (hf_sam.engine.moved_weights): during a step the passes run on a second
buffer and w's own storage is never written, by any operator; the parameters point at w's storage again
after a step, after a dropped ascent and after an error; the copy way, kept where a swap is unsafe, is
chosen automatically; and both ways take exactly the same steps.

"Never written" is checked by a dispatch mode that sees every operator's in-place and ``out=`` writes
and the storages they land in; it is first shown to catch the copy way's snapshot restore."""

from __future__ import annotations

import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hf_sam import MultiStepAscent, SAMConfig
from hf_sam.engine.guarded import copy_where_
from hf_sam.engine.momentum import MomentumPerturbation
from hf_sam.engine.moved_weights import choose_mode


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class StorageWrites(TorchDispatchMode):
    """Records every operator that writes (in place or as ``out=``) into one of the given storages.

    The fused SGD kernel's schema marks its gradients mutable, but it writes them only when given a
    ``grad_scale`` (PyTorch's "conditional gradient store"; checked below): without one, only its
    parameters and momentum buffers count as written."""

    def __init__(self, storages) -> None:
        super().__init__()
        self.storages = set(storages)
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        values = list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args) :]]
        if schema.name == "aten::_fused_sgd_" and kwargs.get("grad_scale") is None:
            values = [values[0], None, values[2]]
        for arg, value in zip(schema.arguments, values, strict=False):
            if arg.alias_info is not None and arg.alias_info.is_write:
                for t in tree_flatten(value)[0]:
                    if isinstance(t, torch.Tensor) and _storage(t) in self.storages:
                        self.hits.append(str(func.overloadpacket))
        return func(*args, **kwargs)


def _engine(params, out_of_place=None, **kwargs) -> MultiStepAscent:
    """``out_of_place``: the first move's way (None: the engine's choice on this device, out of place on the
    CPU; False: the copy into the buffer and the guarded add that accelerators use)."""
    engine = MultiStepAscent(params, **SAMConfig(**kwargs).engine_kwargs())  # options built as the trainer builds them
    engine._moved.out_of_place = out_of_place
    return engine


FIRST_MOVES = [None, False]


def _params():
    torch.manual_seed(0)
    return [torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True), torch.randn(2, 2)]


def _cubic(p: torch.Tensor) -> torch.Tensor:
    return 3 * p.detach() ** 2 + 0.1


def _step(engine, params, k, poison_at=None, fail_at=None, seen=None):
    """One engine step by hand; ``seen`` collects, at every pass, the storages the parameters point at
    and their values."""
    trainable = [p for p in params if p.requires_grad]

    def at_pass():
        if seen is not None:
            seen.append(([_storage(p) for p in trainable], [p.detach().clone() for p in trainable]))

    for p in trainable:
        p.grad = None  # as optimizer.zero_grad() leaves them
    engine.begin()
    try:
        for i in range(1, k + 1):
            at_pass()
            if fail_at == i:
                raise RuntimeError("injected failure in an ascent pass")
            for p in trainable:
                p.grad = _cubic(p) * (float("nan") if poison_at == i else 1.0)
            engine.ascend()
        factor = engine.begin_descent()
        at_pass()
        if fail_at == "descent":
            raise RuntimeError("injected failure in the descent pass")
        for p in trainable:
            g = _cubic(p) * factor
            p.grad = g if p.grad is None else p.grad + g
        engine.end_descent()
    finally:
        engine.restore()


CONFIGS = [
    {"ascent_steps": 1},
    {"ascent_steps": 3},
    {"ascent_steps": 3, "ascent_rule": "projected", "step_mult": 0.8, "adaptive": True},
    {"ascent_steps": 2, "ascent_rule": "accumulated", "descent": "mean"},
    {"ascent_steps": 2, "descent": "xsam", "xsam_alpha": 0.5},
    {"ascent_steps": 2, "descent": "gsam"},
    {"ascent_steps": 1, "descent": "wsam", "wsam_decouple": False},
    {"ascent_steps": 2, "direction": "friendly"},
]


def test_the_fused_sgd_kernel_writes_its_gradients_only_with_a_grad_scale():
    p, g = [torch.randn(50)], [torch.randn(50)]
    before = g[0].clone()
    kwargs = dict(weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=True, is_first_step=False)
    lr = torch.tensor(0.5, dtype=torch.float64)
    torch._fused_sgd_(p, g, [], lr=lr, found_inf=torch.tensor(0.0), **kwargs)
    assert torch.equal(g[0], before)
    torch._fused_sgd_(p, g, [], lr=lr, grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0), **kwargs)
    assert not torch.equal(g[0], before), "with a grad_scale it unscales them in place"


@pytest.mark.parametrize("out_of_place,move", [(None, "aten._foreach_addcmul_"), (False, "aten._fused_sgd_")])
def test_the_write_detector_sees_the_copy_way_move_and_restore(out_of_place, move):
    params = _params()
    engine = _engine(params, out_of_place, ascent_steps=1, rho=0.1, perturbed_weights="copy")
    _step(engine, params, 1)
    with StorageWrites([_storage(p) for p in params[:2]]) as writes:
        _step(engine, params, 1)
    assert "aten._foreach_copy_" in writes.hits and move in writes.hits


def test_the_write_detector_sees_a_fused_sgd_momentum_buffer():
    target, scratch = torch.zeros(5), torch.zeros(5)
    with StorageWrites([_storage(target)]) as writes:
        copy_where_([target], [torch.ones(5)], torch.tensor(True), [scratch])
    assert writes.hits == ["aten._fused_sgd_"] and torch.equal(target, torch.ones(5))


@pytest.mark.parametrize("out_of_place", FIRST_MOVES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_swap_never_writes_w_and_points_back_after_the_step(config, out_of_place):
    params = _params()
    w = [p.detach().clone() for p in params]
    homes = [_storage(p) for p in params[:2]]
    engine = _engine(params, out_of_place, rho=0.1, **config)
    assert engine.perturbed_weights == "swap"
    for _ in range(2):  # the second step reuses the buffers
        seen = []
        with StorageWrites(homes) as writes:
            _step(engine, params, config["ascent_steps"], seen=seen)
        assert writes.hits == [], f"w's storage was written: {writes.hits}"
        assert [_storage(p) for p in params[:2]] == homes, "the parameters point at w's storage again"
        assert all(torch.equal(p, v) for p, v in zip(params, w, strict=True)), "w bit for bit"
        first_pass, *later = seen
        assert first_pass[0] == homes, "the clean pass runs on w itself"
        for storages, values in later:  # every pass at a perturbed point runs on the spare buffers
            assert not set(storages) & set(homes)
            if engine.moved:  # (F-SAM's first step has nothing to move along)
                assert not all(torch.equal(v, x) for v, x in zip(values, w[:2], strict=True)), "the passes moved"


@pytest.mark.parametrize("way", ["swap", "copy"])
@pytest.mark.parametrize("out_of_place", FIRST_MOVES)
@pytest.mark.parametrize("k,poison_at", [(1, 1), (3, 1), (3, 2), (3, 3)])
def test_a_dropped_ascent_descends_at_w_and_points_back(k, poison_at, out_of_place, way):
    params = _params()
    w = [p.detach().clone() for p in params[:2]]
    homes = [_storage(p) for p in params[:2]]
    engine = _engine(params, out_of_place, ascent_steps=k, rho=0.1, descent="mean", perturbed_weights=way)
    _step(engine, params, k)
    seen = []
    with StorageWrites(homes) as writes:
        _step(engine, params, k, poison_at=poison_at, seen=seen)
    assert engine.skipped and (writes.hits == [] or way == "copy")
    descent_values = seen[-1][1]
    assert all(torch.equal(v, x) for v, x in zip(descent_values, w, strict=True)), "the descent is at w"
    assert [_storage(p) for p in params[:2]] == homes
    assert all(torch.equal(p, x) for p, x in zip(params[:2], w, strict=True))
    assert not any(torch.isnan(p).any() for p in engine._moved.buffers), "the buffer was put back at w"
    # the descent's gradient is a plain step's: the dropped ascent's gradients are not in it
    assert all(torch.equal(p.grad, _cubic(x)) for p, x in zip(params[:2], w, strict=True))


@pytest.mark.parametrize("fail_at", [1, 2, "descent"])
def test_an_error_in_a_pass_points_back_at_w(fail_at):
    params = _params()
    w = [p.detach().clone() for p in params[:2]]
    homes = [_storage(p) for p in params[:2]]
    engine = MultiStepAscent(params, ascent_steps=2, rho=0.1)
    with pytest.raises(RuntimeError, match="injected"):
        _step(engine, params, 2, fail_at=fail_at)
    assert [_storage(p) for p in params[:2]] == homes
    assert all(torch.equal(p, x) for p, x in zip(params[:2], w, strict=True))
    _step(engine, params, 2)  # and the engine steps on normally afterwards
    assert all(torch.equal(p, x) for p, x in zip(params[:2], w, strict=True))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_swap_and_copy_take_the_same_steps_bit_for_bit(config):
    # the copy way with the guarded first move is the engine's earlier, reference-checked path: three
    # steps with SGD in between, the first move out of place or not, must all agree bit for bit
    finals = {}
    for mode in ("swap", "copy", "swap-guarded", "copy-guarded"):
        params = _params()
        way, _, guarded = mode.partition("-")
        engine = _engine(params, False if guarded else None, rho=0.1, perturbed_weights=way, **config)
        grads = []
        for _ in range(3):
            _step(engine, params, config["ascent_steps"])
            grads.append([p.grad.clone() for p in params[:2]])
            with torch.no_grad():
                for p in params[:2]:
                    p -= 0.1 * p.grad
                    p.grad = None
        finals[mode] = ([p.detach().clone() for p in params], grads, engine.perturbation_norm)
    w_ref, g_ref, n_ref = finals.pop("copy-guarded")
    for w_way, g_way, n_way in finals.values():
        assert all(torch.equal(a, b) for a, b in zip(w_way, w_ref, strict=True))
        assert all(torch.equal(a, b) for s, c in zip(g_way, g_ref, strict=True) for a, b in zip(s, c, strict=True))
        assert torch.equal(torch.as_tensor(n_way), torch.as_tensor(n_ref))


def test_the_buffers_follow_the_weights_when_they_move():
    # a model cast or moved between steps gets new storage: the spare buffers and w's aliases follow it
    params = _params()
    engine = MultiStepAscent(params, ascent_steps=1, rho=0.1)
    _step(engine, params, 1)
    with torch.no_grad():
        for p in params:
            p.data = p.data.clone() + 1.0
    w = [p.detach().clone() for p in params]
    homes = [_storage(p) for p in params[:2]]
    with StorageWrites(homes) as writes:
        _step(engine, params, 1)
    assert writes.hits == [] and [_storage(p) for p in params[:2]] == homes
    assert all(torch.equal(p, x) for p, x in zip(params, w, strict=True))


def test_momentum_sam_swaps_too():
    params = _params()
    w = [p.detach().clone() for p in params[:2]]
    homes = [_storage(p) for p in params[:2]]
    perturbation = MomentumPerturbation(params, rho=0.1)
    momenta = [torch.ones_like(p) for p in params[:2]]
    with StorageWrites(homes) as writes:
        perturbation.begin(momenta)
        moved = [(p.detach().clone(), _storage(p)) for p in params[:2]]
        perturbation.restore()
    assert writes.hits == []
    norm = float(torch.cat([m.flatten() for m in momenta]).norm())
    for (value, storage), x in zip(moved, w, strict=True):
        assert storage not in homes
        torch.testing.assert_close(value, x - 0.1 / norm, rtol=0, atol=1e-6)
    assert [_storage(p) for p in params[:2]] == homes
    assert all(torch.equal(p, x) for p, x in zip(params[:2], w, strict=True))


def test_auto_copies_where_a_swap_is_unsafe():
    plain = types.SimpleNamespace(sharded=False)
    base = torch.randn(6, requires_grad=True)
    tied = [base, base.detach().view(2, 3).requires_grad_()]  # two tensors, one storage
    assert choose_mode("auto", _params(), plain) == "swap"
    assert choose_mode("auto", tied, plain) == "copy"
    assert choose_mode("auto", _params(), types.SimpleNamespace(sharded=True)) == "copy"  # FSDP2 shards
    assert choose_mode("copy", _params(), plain) == "copy"
    with pytest.raises(ValueError, match="share a storage"):
        choose_mode("swap", tied, plain)
    with pytest.raises(ValueError, match="allowed values"):
        MultiStepAscent(_params(), perturbed_weights="inplace")
    # a frozen tensor tied to a trainable one also counts: the swap would untie it for the passes
    frozen_tie = [base, base.detach().view(6)]
    assert MultiStepAscent(frozen_tie, ascent_steps=1).perturbed_weights == "copy"
