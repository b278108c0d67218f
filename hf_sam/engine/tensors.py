"""Global norms and local views of parameters that may be FSDP2 shards (``DTensor``).

The engine does all its arithmetic on plain tensors: a DTensor shard is replaced by its local
tensor (a view of the same storage, so in-place updates reach the parameter), and every norm or
dot product adds the squares of all shards with one all-reduce over the shards' process group, so
it is the same number one process holding the whole model would compute. Plain tensors next to
shards are replicated (the same on every rank) and are counted once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = Shard = None


def is_shard(t: Tensor | None) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local tensor of a DTensor (same storage), or the tensor itself."""
    return t._local_tensor if is_shard(t) else t


class ShardLayout:
    """Which of a fixed list of parameters are sharded, and over which process group.

    ``partition_group``: the tensors are plain tensors, each rank's disjoint part of the whole (DeepSpeed
    ZeRO's partitions, an empty tensor where a rank owns nothing of a parameter): all count as shards over
    that group.
    """

    def __init__(self, params: Sequence[Tensor], partition_group: dist.ProcessGroup | None = None) -> None:
        if partition_group is not None:
            self.sharded, self.group, self._is_shard = True, partition_group, [True] * len(params)
            return
        shards = [p for p in params if is_shard(p)]
        self.sharded = bool(shards)
        self.group = None
        self._is_shard = [is_shard(p) for p in params]
        if not shards:
            return
        meshes = {id(p.device_mesh) for p in shards}
        mesh = shards[0].device_mesh
        if len(meshes) > 1 or mesh.ndim != 1:
            raise NotImplementedError(
                "MultiStepAscent supports DTensor parameters sharded over one 1-D device mesh (FSDP2's "
                "fully_shard); HSDP and several meshes are not supported yet."
            )
        for p in shards:
            if any(not isinstance(placement, Shard) for placement in p.placements):
                raise NotImplementedError(f"DTensor parameters placed as {p.placements}: only Shard is supported.")
        self.group = mesh.get_group()

    def locals(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        return [local(t) for t in tensors] if self.sharded else list(tensors)

    def sum_of_squares(self, tensors: Sequence[Tensor], flags: Sequence[bool], dtype=None) -> Tensor:
        """Sum of squares over all ranks of ``tensors`` (local views; ``flags``: which are shards)."""
        sharded = [t for t, f in zip(tensors, flags, strict=True) if f]
        plain = [t for t, f in zip(tensors, flags, strict=True) if not f]
        total = _squares(sharded, dtype)
        if self.sharded:
            dist.all_reduce(total, group=self.group)
        return total + _squares(plain, dtype).to(total.device)

    def flags(self, indices: Sequence[int] | None = None) -> list[bool] | None:
        """Which tensors are shards (None without shards: nothing to tell apart, nothing to build per step)."""
        if not self.sharded:
            return None
        return self._is_shard if indices is None else [self._is_shard[j] for j in indices]


def _squares(tensors: Sequence[Tensor], dtype=None) -> Tensor:
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    per_tensor = torch._foreach_norm(tensors, 2, dtype=dtype) if dtype else torch._foreach_norm(tensors, 2)
    norms = torch.stack(per_tensor).double()
    return (norms * norms).sum()


def global_norm(tensors: Sequence[Tensor], layout: ShardLayout | None = None, flags=None, dtype=None) -> Tensor:
    """Euclidean norm of local views of ``tensors`` over all ranks, as a 0-d float64 tensor."""
    if layout is None or not layout.sharded:
        if not tensors:
            return torch.zeros((), dtype=torch.float64)
        per_tensor = torch._foreach_norm(tensors, 2, dtype=dtype) if dtype else torch._foreach_norm(tensors, 2)
        return torch.linalg.vector_norm(torch.stack(per_tensor).double())
    return layout.sum_of_squares(tensors, flags, dtype).sqrt()


def dot64(x: Tensor, y: Tensor) -> Tensor:
    """<x, y> summed in float64: the products in float32 at least (one rounding each, 6e-8 relative, where
    float64 copies of both would cost five more passes over them), the sum in float64."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    return torch.sum(x * y, dtype=torch.float64)


def global_dot(a: Sequence[Tensor], b: Sequence[Tensor], layout: ShardLayout | None = None, flags=None) -> Tensor:
    """<a, b> over all ranks, summed in float64 (:func:`dot64`; a kernel per tensor)."""
    parts = [dot64(x, y) for x, y in zip(a, b, strict=True)]
    if layout is None or not layout.sharded:
        return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64)
    sharded = sum((v for v, f in zip(parts, flags, strict=True) if f), torch.zeros((), dtype=torch.float64))
    dist.all_reduce(sharded, group=layout.group)
    return sharded + sum((v for v, f in zip(parts, flags, strict=True) if not f), torch.zeros((), dtype=torch.float64))


def grad_like(param: Tensor, local_grad: Tensor) -> Tensor:
    """Wrap a local gradient buffer as the parameter's gradient type (a DTensor for a shard)."""
    if not is_shard(param):
        return local_grad
    return DTensor.from_local(
        local_grad, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def per_tensor_dots(a: Sequence[Tensor], b: Sequence[Tensor], layout: ShardLayout | None = None, flags=None) -> Tensor:
    """<a_j, b_j> for every tensor j, in float64 over all ranks: a 1-d tensor (one all-reduce for shards)."""
    dots = torch.stack([dot64(x, y) for x, y in zip(a, b, strict=True)])
    if layout is None or not layout.sharded:
        return dots
    mask = torch.tensor(flags, device=dots.device)
    sharded = torch.where(mask, dots, torch.zeros_like(dots))
    dist.all_reduce(sharded, group=layout.group)
    return torch.where(mask, sharded, dots)
