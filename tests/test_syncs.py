"""Host-device sync points in one training step, counted at the dispatcher on CPU: the ops that
make a CUDA host wait for the device (a tensor read as a Python number, a boolean-mask gather whose
size the host must learn). On CPU nothing waits, but the same ops are dispatched.

Reads of the loader's host batch (no sync on a GPU) would be counted too; `.tolist()` reads
without dispatching, so it is counted where it is called. What a CPU count cannot see: whether a
host-to-device copy blocks (the step copies pinned batches with non_blocking=True)."""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import trainer.loop
import trainer.schedule
from test_trainer_units import tiny_run


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __enter__(self):
        tolist, counts = torch.Tensor.tolist, self.counts

        def counted_tolist(tensor):
            counts["tolist"] += 1
            return tolist(tensor)
        self.restore = lambda: setattr(torch.Tensor, "tolist", tolist)
        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        self.restore()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "nonzero", "item") or (
                name == "index" and any(getattr(t, "dtype", None) == torch.bool for t in args[1])):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


# One read per optimizer step, whatever the accumulation: whether the update was applied. Counted
# this way, the step read 10 times at accumulation 1 and 18 at 2 before the loss stayed on the
# device, then 8 and 14 (placeholder counts, boolean gathers, the norm's finiteness, host batch reads).
@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_training_step_reads_the_device_once(tower_dir, tmp_path, accumulation):
    run = tiny_run(tower_dir, tmp_path, accumulation_steps=accumulation)
    steps = trainer.schedule.optimizer_steps(run.loader, len(run.sampler), accumulation)
    trainer.loop.train_step(run, 0, next(steps), 0)  # the first step: lazy initialisations happen here
    micro_batches = list(next(steps))  # fetched first: the loader's work (collate, on the CPU) is not counted
    with SyncCounter() as counter:
        step = trainer.loop.train_step(run, 0, micro_batches, 0)
    print(f"syncs in one step at accumulation {accumulation}: {sum(counter.counts.values())} {dict(counter.counts)}")
    assert step.applied and step.loss > 1
    assert sum(counter.counts.values()) == 1
