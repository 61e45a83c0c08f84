"""Source tensors kept on the scoring device between candidates.

A search merges the same source tensors again for every candidate, only with other parameters. Read
from the memory-mapped checkpoints each time, every candidate on a GPU worker copies every source
tensor from host to device first: for a 7B model and three sources, tens of GB per candidate. Kept on
the device once (``ResidentSources``), a candidate is merged on the device from device memory and
written into the resident model in place. A memory check decides: the sources are kept only if they
fit in a share of the device's free memory (the rest is for the resident model's activations while
scoring); otherwise the merge reads the checkpoints as before (the fallback, with a note why).

On a CPU the checkpoints' memory-mapped tensors are kept as they are (no copy): the page cache is the
residency there, and the merge only skips re-opening each tensor.
"""

from __future__ import annotations

import os

import torch

from evomerge.merge.plan import MergePlan, TensorRef

#: The share of the device's free memory the sources may take (on a GPU; a CPU copies nothing).
DEFAULT_SHARE = 0.5


def free_bytes(device: torch.device) -> int:
    """Memory free on ``device`` now (CUDA: the driver's figure; CPU: free physical pages, page cache not counted)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class ResidentSources:
    """A ``TensorSource`` (``merge/engine.py``) serving source tensors from ``device`` memory; each is
    read from its checkpoint once. ``admit(plan)`` loads what a plan reads, if it fits the budget."""

    def __init__(self, device: torch.device | str, *, budget_bytes: int | None = None):
        self.device = torch.device(device)
        if budget_bytes is None:  # on a CPU nothing is copied (mapped tensors are kept): no limit
            budget_bytes = int(DEFAULT_SHARE * free_bytes(self.device)) if self.device.type != "cpu" else 2**62
        self.budget_bytes = budget_bytes
        self.tensors: dict[TensorRef, torch.Tensor] = {}
        self.refused: str | None = None
        """Why the last ``admit`` said no (None when it said yes)."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def admit(self, plan: MergePlan) -> bool:
        """Make every tensor the plan reads resident, unless they would exceed the budget (then nothing
        new is loaded, ``refused`` says why, and the caller reads the checkpoints instead)."""
        refs = {ref for job in plan.jobs for ref in (*job.inputs, *((job.base,) if job.base is not None else ()))}
        new = [ref for ref in sorted(refs) if ref not in self.tensors]
        stored = {ref: plan.checkpoints[ref[0]].get(ref[1]) for ref in new}  # mapped, not read yet
        need = self.nbytes + sum(t.numel() * t.element_size() for t in stored.values())
        if need > self.budget_bytes:
            self.refused = (
                f"the sources take {need / 2**30:.2f} GiB, over the {self.budget_bytes / 2**30:.2f} GiB allowed on "
                f"{self.device} ({DEFAULT_SHARE:.0%} of its free memory); merging from the checkpoints instead"
            )
            return False
        loaded: list[TensorRef] = []
        try:
            for ref, tensor in stored.items():
                self.tensors[ref] = tensor if self.device.type == "cpu" else tensor.to(self.device, copy=True)
                loaded.append(ref)
        except torch.OutOfMemoryError:  # free memory shrank since the budget was set: none of this plan's
            for ref in loaded:
                del self.tensors[ref]
            self.refused = (
                f"the sources did not fit on {self.device} after all (out of memory); merging from the checkpoints"
            )
            return False
        self.refused = None
        return True

    def __call__(self, ref: TensorRef) -> torch.Tensor:
        return self.tensors[ref]
