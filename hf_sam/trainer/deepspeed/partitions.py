"""Each rank's own part of the weights and gradients under DeepSpeed ZeRO: the tensors SAM works on.

ZeRO-1/2 keep the forward's parameters whole on every rank (views into one flat buffer per parameter
group) and split the fp32 master and, after a backward at an accumulation boundary, the reduced gradient
into one partition per rank; ZeRO-3 also splits the parameters (``param.ds_tensor``) and gathers them
for each forward. SAM takes the same split: for every trainable parameter, the rank's part of it in the
storage the forward is built from (an empty tensor where the rank owns none of it), with its gradient
from the rank's own gradient partition. The engine sums every norm and dot product over the ranks
(``MultiStepAscent(partition_group=...)``), so the perturbation is the one a process holding the whole
model would take, and SAM's snapshot, gradients and state are partition-sized.

After the engine has moved the parts, :meth:`refresh` makes the forward see them the way ZeRO does after
its own step: ZeRO-1/2 all-gather the flat buffers from every rank's partition; ZeRO-3 releases its
parameters and re-gathers the persistent ones (small parameters kept whole), the others being gathered
from the partitions at each forward anyway. The fp32 master of ZeRO-1/2 is never written; under ZeRO-3
with fp32 parameters the partition is the master itself, back at w bit for bit before the optimizer step.

ZeRO-0 partitions nothing: its parts are the parameters and their all-reduced gradients.

Each parts object holds ``parts`` (the tensors the engine perturbs, its ``params``) and ``owners`` (the model
parameter each part belongs to), in the same order.

The internals used (checked on DeepSpeed 0.19.8): ZeRO-1/2's ``_hp_mapping`` (each parameter's fragment
in the rank's partition), ``parallel_partitioned_bit16_groups`` and ``all_gather_dp_groups``; ZeRO-3's
``ds_tensor``, its local gradient API and ``persistent_parameters``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _part(view: Tensor) -> nn.Parameter:
    """A Parameter aliasing ``view``'s storage: what the engine perturbs in place (it keeps only tensors
    that require grad; nothing differentiates through it)."""
    return nn.Parameter(view, requires_grad=True)


class ReplicatedParts:
    """ZeRO-0: every rank holds the whole parameters and, after a boundary backward, the all-reduced
    gradient in ``p.grad``."""

    group = None

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.owners = params
        self.parts = params

    def read_grads(self) -> list[Tensor | None]:
        return [None if p.grad is None else p.grad.detach().clone() for p in self.owners]

    def write_grads(self, grads: list[Tensor | None]) -> None:
        for p, g in zip(self.owners, grads, strict=True):
            if g is not None:
                p.grad = g

    def refresh(self) -> None:
        pass

    def check(self) -> None:
        pass


class Zero12Parts:
    """ZeRO-1/2: each parameter's fragment in this rank's partition of the forward's flat buffer."""

    def __init__(self, optimizer: Any, params: list[nn.Parameter]) -> None:
        groups = optimizer.real_dp_process_group
        if any(g is not groups[0] for g in groups):
            raise NotImplementedError("SAM under ZeRO-1/2 needs one data-parallel group for all parameter groups.")
        self.optimizer = optimizer
        self.owners = params
        self.group = groups[0]
        rank = dist.get_rank(group=self.group)
        self._views: list[Tensor] = []
        for p in params:
            if not hasattr(p, "_hp_mapping"):
                raise ValueError("SAM under ZeRO-1/2: a trainable parameter is not in DeepSpeed's optimizer.")
            mapping = p._hp_mapping
            if mapping is None:  # all of it in other ranks' partitions
                self._views.append(p.new_empty(0))
                continue
            partition = optimizer.parallel_partitioned_bit16_groups[mapping.param_group_index][rank]
            address = mapping.hp_fragment_address
            self._views.append(partition.narrow(0, address.start, address.numel))
        self.parts = [_part(v) for v in self._views]

    def _grad_fragment(self, p: nn.Parameter) -> Tensor:
        mapping = p._hp_mapping
        fragment = mapping.get_lp_grad_fragment(p._index_in_param_group).view(-1)
        if fragment.numel() == p.numel() and mapping.lp_fragment_address.numel != p.numel():
            address = mapping.lp_fragment_address  # a whole-parameter buffer (bf16 optimizer): our part of it
            fragment = fragment.narrow(0, address.start, address.numel)
        return fragment

    def read_grads(self) -> list[Tensor | None]:
        return [
            part.new_empty(0) if p._hp_mapping is None else self._grad_fragment(p).to(part.dtype, copy=True)
            for p, part in zip(self.owners, self.parts, strict=True)
        ]

    def write_grads(self, grads: list[Tensor | None]) -> None:
        for p, g in zip(self.owners, grads, strict=True):
            if p._hp_mapping is not None and g is not None:
                fragment = self._grad_fragment(p)
                fragment.copy_(g.view(-1))

    @torch.no_grad()
    def refresh(self) -> None:
        from deepspeed.runtime.utils import all_gather_dp_groups

        opt = self.optimizer
        all_gather_dp_groups(
            groups_flat=opt.bit16_groups_flat,
            partitioned_param_groups=opt.parallel_partitioned_bit16_groups,
            dp_process_group=opt.real_dp_process_group,
            start_alignment_factor=opt.nccl_start_alignment_factor,
            allgather_bucket_size=opt.allgather_bucket_size,
        )

    def check(self) -> None:
        """The parts still alias the partitions DeepSpeed all-gathers (it never reallocates them)."""
        for part, view in zip(self.parts, self._views, strict=True):
            if part.numel() and part.data_ptr() != view.data_ptr():
                raise RuntimeError("DeepSpeed moved its ZeRO-1/2 partitions: SAM's parts no longer alias them.")


class Zero3Parts:
    """ZeRO-3: each parameter's own partition (``ds_tensor``), without the last rank's padding."""

    def __init__(self, optimizer: Any, params: list[nn.Parameter]) -> None:
        self.optimizer = optimizer
        self.owners = params
        self.group = params[0].ds_process_group
        self._sizes: list[int] = []
        for p in params:
            if not hasattr(p, "ds_tensor"):
                raise ValueError("SAM under ZeRO-3: a trainable parameter is not partitioned by DeepSpeed.")
            if p.ds_process_group is not self.group:
                raise NotImplementedError("SAM under ZeRO-3 needs one data-parallel group for all parameters.")
            size = p.ds_tensor.ds_numel
            self._sizes.append(max(0, min(size, p.ds_numel - dist.get_rank(group=self.group) * size)))
        self.parts = [_part(p.ds_tensor.data.narrow(0, 0, n)) for p, n in zip(params, self._sizes, strict=True)]

    def read_grads(self) -> list[Tensor | None]:
        grads = []
        for p, n in zip(self.owners, self._sizes, strict=True):
            g = self.optimizer.get_local_fp32_grad_for_param(p)
            grads.append(g.view(-1).narrow(0, 0, n).to(torch.float32, copy=True))
        return grads

    def write_grads(self, grads: list[Tensor | None]) -> None:
        for p, g in zip(self.owners, grads, strict=True):
            if g is None:
                continue
            padded = torch.zeros(p.ds_tensor.numel(), dtype=g.dtype, device=g.device)
            padded[: g.numel()] = g.view(-1)
            self.optimizer.set_local_grad_for_param(padded, p)

    @torch.no_grad()
    def refresh(self) -> None:
        opt = self.optimizer
        opt._partition_all_parameters()  # as its step does: every parameter back to its partition
        if opt.persistent_parameters:
            opt.persistent_parameters[0].all_gather(opt.persistent_parameters)

    def check(self) -> None:
        for part, p in zip(self.parts, self.owners, strict=True):
            if part.numel() and part.data_ptr() != p.ds_tensor.data_ptr():
                raise RuntimeError("DeepSpeed moved its ZeRO-3 partitions: SAM's parts no longer alias them.")


ZeroParts = ReplicatedParts | Zero12Parts | Zero3Parts


def zero_parts(ds_engine: Any, params: list[nn.Parameter], stage: int) -> ZeroParts:
    """This rank's parts of the trainable ``params`` under ZeRO ``stage``."""
    params = [p for p in params if p.requires_grad]
    if stage == 0:
        return ReplicatedParts(params)
    if stage in (1, 2):
        return Zero12Parts(ds_engine.optimizer, params)
    return Zero3Parts(ds_engine.optimizer, params)
