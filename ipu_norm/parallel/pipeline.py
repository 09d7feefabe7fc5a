"""Run an `ExecutionPlan` on CPU/GPU processes: pipeline stages x data-parallel replicas.

Layout: ``world_size == plan.replicas * plan.num_stages``; rank ``r`` runs stage ``r % S`` of replica ``r // S``
(consecutive ranks form one pipeline, as consecutive IPUs form one replica on a POD).

- Pipelining: ``torch.distributed.pipelining.PipelineStage`` on the stage module built by
  `ipu_norm.parallel.stages.build_stage_module`, driven by ``ScheduleGPipe`` or ``Schedule1F1B``
  (``plan.pipeline_schedule``) over ``plan.gradient_accumulation`` micro-batches. ``scale_grads=True`` divides the
  accumulated gradients by the number of micro-batches, i.e. the update is that of the mean loss — the same
  reduction as PopTorch's ``ReductionType.Mean``.
- Replication without pipelining: ``DistributedDataParallel`` with ``no_sync`` on all but the last micro-batch.
- Replication with pipelining: each stage's gradients are all-reduced (mean) across the replicas of that stage after
  the schedule has run (DDP's hooks do not fit a schedule that interleaves micro-batches).

The same plan therefore trains identically (up to float reduction order) as one process accumulating the same
micro-batches, which tests/test_pipeline_cpu.py checks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ipu_norm.core.plan import ExecutionPlan
from ipu_norm.parallel.stages import build_stage_module

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MicroBatch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits: its stage, its replica, and the ranks it talks to."""

    rank: int
    world_size: int
    num_stages: int
    replicas: int

    @property
    def stage(self) -> int:
        return self.rank % self.num_stages

    @property
    def replica(self) -> int:
        return self.rank // self.num_stages

    def pipeline_ranks(self, replica: int) -> list[int]:
        """Global ranks of the stages of `replica`, in stage order."""
        return [replica * self.num_stages + s for s in range(self.num_stages)]

    def replica_ranks(self, stage: int) -> list[int]:
        """Global ranks running `stage`, one per replica."""
        return [r * self.num_stages + stage for r in range(self.replicas)]

    @classmethod
    def for_plan(cls, plan: ExecutionPlan, rank: int, world_size: int) -> ParallelLayout:
        """Check `world_size` against the plan and build the layout."""
        need = plan.replicas * plan.num_stages
        if world_size != need:
            raise ValueError(
                f"the plan has {plan.replicas} replicas x {plan.num_stages} pipeline stages = {need} processes but the "
                f"job has {world_size}; launch torchrun --nproc_per_node={need} or change execution.replicas / "
                f"pipeline_splits"
            )
        return cls(rank=rank, world_size=world_size, num_stages=plan.num_stages, replicas=plan.replicas)


class ParallelRunner:
    """One training step of `plan` on this rank (see module docstring).

    Args:
        model: the full model (same initial weights on every rank, e.g. same seed); this rank keeps using the
            modules of its own stage only.
        plan: the execution plan (stages, replicas, accumulation, schedule, recompute, precision).
        loss_fn: ``loss_fn(logits, targets)`` -> mean loss of a micro-batch.
        rank, world_size: this process in the default process group (already initialised).
        device: the torch device of this rank.
    """

    def __init__(self, model: nn.Module, plan: ExecutionPlan, loss_fn: LossFn, *, rank: int | None = None,
                 world_size: int | None = None, device: torch.device | str = "cpu") -> None:
        if not dist.is_initialized():
            raise RuntimeError("ParallelRunner needs torch.distributed initialised (torchrun or init_process_group)")
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
        self.plan = plan
        self.layout = ParallelLayout.for_plan(plan, rank, world_size)
        self.device = torch.device(device)
        self.loss_fn = loss_fn
        lay = self.layout
        # Every rank must create every group, in the same order (torch.distributed.new_group contract).
        self.pipe_group = None
        self.replica_group = None
        for r in range(lay.replicas):
            g = dist.new_group(lay.pipeline_ranks(r)) if lay.num_stages > 1 else None
            if r == lay.replica:
                self.pipe_group = g
        for s in range(lay.num_stages):
            g = dist.new_group(lay.replica_ranks(s)) if lay.replicas > 1 else None
            if s == lay.stage:
                self.replica_group = g
        self.module = build_stage_module(model, plan, lay.stage, device_type=self.device.type).to(self.device)
        self.schedule = None
        self.ddp: nn.Module | None = None
        self._model = model
        if lay.num_stages == 1 and lay.replicas > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.module, device_ids=ids, process_group=self.replica_group)

    def _build_schedule(self, example: torch.Tensor) -> None:
        """Create the PipelineStage with static shapes from one micro-batch (runtime shape inference can deadlock
        with gloo), then the GPipe / 1F1B schedule."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        lay, plan = self.layout, self.plan
        # Every rank holds the whole model, so each can trace the activation shapes up to its own stage locally.
        with torch.no_grad():
            x = example.to(self.device)
            for k in range(lay.stage):
                x = build_stage_module(self._model, plan, k, device_type=self.device.type).to(self.device)(x)
        # The example's requires_grad tells the stage whether to send input gradients back: yes after stage 0.
        x = x.detach().requires_grad_(lay.stage > 0)
        # Likewise the example output's requires_grad tells the stage to expect gradients from the next stage.
        out = self.module(x).detach().requires_grad_(True)
        self.module.zero_grad(set_to_none=True)
        stage = PipelineStage(self.module, lay.stage, lay.num_stages, self.device, input_args=(x,),
                              output_args=(out,), group=self.pipe_group)
        cls = ScheduleGPipe if plan.pipeline_schedule == "gpipe" else Schedule1F1B
        # Every stage gets the loss_fn: the schedule only runs backward (on any stage) when one is given.
        self.schedule = cls(stage, n_microbatches=plan.gradient_accumulation, loss_fn=self._stage_loss,
                            scale_grads=True)

    def _stage_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(output.float(), target)

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this rank updates (its stage's)."""
        return list(self.module.parameters())

    @property
    def is_first_stage(self) -> bool:
        return self.layout.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.layout.stage == self.layout.num_stages - 1

    def forward_backward(self, micro_batches: Sequence[MicroBatch]) -> float:
        """Forward and backward over this replica's micro-batches; gradients end up averaged over all micro-batches
        of all replicas (on the stage's parameters). Returns the mean loss of the step over all replicas.

        Every rank of a replica passes the same micro-batches (first stages use the images, last stages the targets).
        """
        n = len(micro_batches)
        if n != self.plan.gradient_accumulation:
            raise ValueError(f"expected {self.plan.gradient_accumulation} micro-batches, got {n}")
        self.module.train()
        loss = torch.zeros((), device=self.device)
        if self.layout.num_stages > 1:
            if self.schedule is None:
                self._build_schedule(micro_batches[0][0])
            kwargs: dict = {}
            losses: list[torch.Tensor] = []
            if self.is_first_stage:
                kwargs["arg_mbs"] = [(x.to(self.device),) for x, _ in micro_batches]
            if self.is_last_stage:
                kwargs["target_mbs"] = [y.to(self.device) for _, y in micro_batches]
                kwargs["losses"] = losses
            self.schedule.step(**kwargs)
            if self.is_last_stage:
                loss = torch.stack([t.detach().float() for t in losses]).mean()
            # Share the loss with the other stages of this pipeline (only the last one computes it).
            src = self.layout.pipeline_ranks(self.layout.replica)[-1]
            dist.broadcast(loss, src=src, group=self.pipe_group)
            if self.replica_group is not None:
                self._allreduce_grads_mean()
        else:
            model = self.ddp or self.module
            for i, (x, y) in enumerate(micro_batches):
                ctx = model.no_sync() if (self.ddp is not None and i < n - 1) else contextlib.nullcontext()
                with ctx:
                    out = model(x.to(self.device))
                    mb_loss = self.loss_fn(out.float(), y.to(self.device))
                    (mb_loss / n).backward()
                loss += mb_loss.detach()
            loss = loss / n
        if self.replica_group is not None:
            dist.all_reduce(loss, group=self.replica_group)
            loss = loss / self.layout.replicas
        return float(loss)

    def _allreduce_grads_mean(self) -> None:
        for p in self.module.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.replica_group)
            p.grad.div_(self.layout.replicas)

    def train_step(self, micro_batches: Sequence[MicroBatch], optimizer: torch.optim.Optimizer) -> float:
        """zero_grad, `forward_backward`, optimizer.step (over this stage's parameters); returns the mean loss."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(micro_batches)
        optimizer.step()
        return loss
