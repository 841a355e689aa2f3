"""The training loss as the exact mean over the kept tokens of a whole optimizer step.

One optimizer step sees ``world_size`` ranks times ``k`` (``accumulate_grad_batches``) micro-batches,
each keeping a different number of tokens. The correct gradient is that of

    sum over every rank r and micro-batch i of nll_sum[r, i]  /  N,   N = sum of kept[r, i]

No single micro-batch knows ``N``. So each micro-batch backprops its NLL *sum*, scaled by a
constant ``s`` that is the same on every rank and micro-batch of the step, and the gradients are
corrected once, in ``on_before_optimizer_step`` (after the last backward, before clipping):

    backprop[r, i] = nll_sum[r, i] * world_size / s
    Lightning divides it by k; DDP / FSDP average gradients over world_size, so
    grad = sum_{r,i} d nll_sum[r, i] / (s * k)
    grad *= s * k / N        N: the kept count summed over micro-batches, all-reduced once per step

which leaves exactly the gradient of the global mean. Everything stays on the device: the count is
a device tensor all-reduced without a host read, the correction a device-side multiply.

The weighted selection rules (``cggr.selection.strategy`` importance / infobatch / noise_excluded)
pass their ``normaliser`` as ``kept`` and a weighted NLL sum: ``N`` is then the step's summed
normaliser, for the unbiased rules the trainable-token count, which does not depend on the draw.

``s`` only keeps the backpropagated values near the size of a mean loss (fp16 loss scaling
overflows on raw sums): it is the previous step's kept tokens per micro-batch, rounded to a power of
two so that multiplying and dividing by it is exact and the result does not depend on it. A step
whose micro-batches keep no token at all gets zero gradients (``N`` clamped to 1), never NaN.

The same all-reduce carries the NLL sums, so :attr:`KeptTokenNormalizer.step_loss` is the value whose
gradient was taken, ``sum nll_sum / N`` over the whole step (what the module logs as ``train/loss``),
and any other per-rank sums the caller passes (the module's routing metrics): one collective per step.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (in place, returned); the identity without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def release_process_groups() -> None:
    """Destroy this process's process groups (the default one and every group made from it), if any,
    while the interpreter is still whole. Left to the interpreter's exit, Gloo's worker threads can
    outlive it and abort the process ("terminate called without an active exception", exit -6) after
    a run that finished: seen once on a 2-process CPU run here; pytorch/pytorch#179291 describes the
    cause. Every rank calls it at the same point (a finished or jointly stopped run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def unshared(state: dict, nested: tuple[str, ...] = ()) -> dict:
    """An unpickled object's state with its plain tensors (and those of the dicts named in
    ``nested``) copied into this process's own memory; every other value, container types included,
    as it was. torch.multiprocessing passes a CPU tensor by sharing its memory with the process that
    pickled it; Lightning's ``ddp_spawn`` on CPU copies the module's parameters and buffers back out,
    but not the other tensors it holds, so a worker's in-place update of a running sum reached the
    main process and the other worker (the held-out sums of one ``trainer.validate`` were the next
    one's starting values)."""
    def own(value):
        return value.clone() if type(value) is torch.Tensor else value

    out = {k: own(v) for k, v in state.items()}
    for key in nested:
        if isinstance(out.get(key), dict):
            out[key] = type(out[key])((k, own(v)) for k, v in out[key].items())
    return out


class KeptTokenNormalizer:
    """Turns per-micro-batch NLL sums into the gradient of the step's global kept-token mean.

    Use :meth:`loss` on each micro-batch's ``(nll_sum, kept)`` and backprop what it returns; call
    :meth:`correct_gradients` once per optimizer step, after the last backward and before clipping.
    Not an ``nn.Module`` and nothing to checkpoint: results do not depend on the scale.
    """

    def __init__(self) -> None:
        self.count: torch.Tensor | None = None  # kept tokens of this step's micro-batches on this rank
        self.nll: torch.Tensor | None = None  # their NLL sums on this rank (0-d fp64 device tensor)
        self.scale: torch.Tensor | None = None  # s, a power of two >= 1 (0-d fp32 device tensor)
        self.step_loss: torch.Tensor | None = None
        """The last corrected step's loss: its NLL sums over all ranks and micro-batches / ``N`` (0-d
        fp32 device tensor; 0 for a step that kept nothing), set by :meth:`correct_gradients`."""
        self.step_extra: torch.Tensor | None = None
        """The last corrected step's ``extra`` summed over all ranks (fp64 device tensor), or None."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(unshared(state))  # running sums of this process's own (see unshared)

    def _ensure(self, device: torch.device) -> None:
        if self.count is None or self.count.device != device:
            self.count = torch.zeros((), dtype=torch.long, device=device)
            self.nll = torch.zeros((), dtype=torch.float64, device=device)
            self.scale = torch.ones((), dtype=torch.float32, device=device)

    def loss(self, nll_sum: torch.Tensor, kept: torch.Tensor, world_size: int = 1) -> torch.Tensor:
        """The value to backprop for one micro-batch: ``nll_sum * world_size / s`` (no sync).

        ``kept``: the micro-batch's share of the denominator (its kept count, or a rule's normaliser)."""
        self._ensure(nll_sum.device)
        self.count += kept.to(torch.long)
        self.nll += nll_sum.detach().double()
        return nll_sum * (float(world_size) / self.scale)

    @torch.no_grad()
    def correct_gradients(self, params: Iterable[torch.nn.Parameter], accumulate: int,
                          extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Multiply every gradient by ``s * k / N`` and start the next step; returns ``N`` (device).

        ``N`` is all-reduced here, once per optimizer step: every rank must call this (Lightning
        calls ``on_before_optimizer_step`` on all ranks). Without a pending micro-batch, a no-op.
        ``extra``: a 1-d device tensor of this rank's sums, the same length on every rank, summed
        over the ranks in the same all-reduce into :attr:`step_extra`.
        """
        if self.count is None:
            return None
        # one all-reduce for every sum; counts are exact in fp64 up to 2^53 tokens
        sums = [self.count.double().reshape(1), self.nll.reshape(1)]
        if extra is not None:
            sums.append(extra.to(device=self.nll.device, dtype=torch.float64).reshape(-1))
        reduced = all_reduce_sum(torch.cat(sums))
        count, nll = reduced[0], reduced[1]
        self.step_extra = None if extra is None else reduced[2:]
        total = count.round().long()
        factor = (self.scale.double() * accumulate / count.clamp(min=1)).float()
        scale_gradients(params, factor)
        self.step_loss = (nll / count.clamp(min=1)).float()
        per_micro = (count / accumulate).clamp(min=1.0)
        self.scale = torch.exp2(torch.round(torch.log2(per_micro))).float()
        self.count.zero_()
        self.nll.zero_()
        return total


def scale_gradients(params: Iterable[torch.nn.Parameter], factor: torch.Tensor) -> None:
    """Every gradient times ``factor`` (a 0-d device tensor): one multi-tensor kernel per (device,
    dtype) group of plain tensors, not one launch per parameter (272 of them per step at SmolLM2's
    size, seen in the H200 profile); sharded DTensor gradients one by one."""
    from torch.distributed.tensor import DTensor

    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            g.mul_(factor.to(device=g.device, dtype=g.dtype))
        else:
            groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, dtype), grads in groups.items():
        torch._foreach_mul_(grads, factor.to(device=device, dtype=dtype))


# ---- FSDP ------------------------------------------------------------------------------------
# The router shares the model's modules, so sharding must leave every shared module reachable and
# gathered whenever the router runs. Both paths below wrap each decoder block once as its own unit
# (the router calls the very same block objects, so each call gathers and frees its weights) and
# leave embeddings, final norm and LM head to the root unit, which is gathered for the whole of
# training_step / validation_step, where the router and the fused head+loss read them.


def block_classes(model: torch.nn.Module) -> set[type]:
    """The decoder block classes of ``model``: the unit FSDP wraps (one unit per block)."""
    from .routing.router import find_blocks, find_decoder

    _, blocks = find_blocks(find_decoder(model))
    return {type(b) for b in blocks}


def shard_fsdp2(module: torch.nn.Module, model: torch.nn.Module, mesh) -> bool:
    """Apply FSDP2 (``fully_shard``) to ``module`` (the LightningModule holding ``model``).

    One unit per decoder block, then the root: ``module`` itself, whose gather/free hooks are
    registered on ``training_step`` and ``validation_step`` (Lightning's ModelParallelStrategy
    calls them directly, not through ``forward``; without this the router's embedding lookup
    meets sharded weights). A 2-D mesh (Lightning's ``(data_parallel, tensor_parallel)``, by
    default nodes x devices per node) is used as HSDP: replicated across its first dimension,
    sharded across its second. No tensor parallelism is applied. Returns False when ``module``
    was sharded already (Lightning calls ``configure_model`` again for validate after fit).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    from .routing.router import find_blocks, find_decoder

    if isinstance(module, FSDPModule):
        return False
    if mesh.ndim == 2 and mesh.size(0) == 1:
        mesh = mesh[mesh.mesh_dim_names[1]] if mesh.mesh_dim_names else mesh
    if mesh.ndim > 2:
        raise ValueError(f"FSDP2 sharding supports a 1-D or 2-D device mesh, got {mesh.ndim}-D: {mesh}")
    _, blocks = find_blocks(find_decoder(model))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    for name in ("training_step", "validation_step"):
        register_fsdp_forward_method(module, name)
    return True
