"""How an epoch becomes optimizer steps, and the learning rate along them."""
import itertools
import math


def lr_at(progress, base_lr, warmup, decay=1.0):
    """Linear warmup, then a cosine from base_lr down to base_lr/10 over the last `decay` fraction of
    training, flat at base_lr before it (decay 1: the cosine starts right after the warmup; below 1,
    warmup-stable-decay). `progress` is the fraction of all training samples consumed, so the schedule
    does not depend on the number of processes."""
    if progress < warmup:
        return base_lr * max(progress / warmup, 0.01)
    start = max(warmup, 1 - decay)  # where the cosine begins
    t = max(progress - start, 0.0) / max(1 - start, 1e-8)
    return base_lr / 10 + 0.45 * base_lr * (1 + math.cos(math.pi * min(t, 1.0)))


class MicroBatches:
    """One optimizer step's `size` micro-batches, taken from the loader's iterator only as they are
    used, so its workers go on preparing the next ones while the device computes. Collected up
    front, a step with more micro-batches than workers x prefetch would wait for batches every step."""

    def __init__(self, batches, size):
        self.batches, self.size = batches, size

    def __len__(self):
        return self.size

    def __iter__(self):
        return itertools.islice(self.batches, self.size)


def optimizer_steps(loader, n_batches, accumulation_steps):
    """The epoch's n_batches micro-batches, grouped per optimizer step (MicroBatches: iterate each
    group before taking the next). The last group of an epoch may be shorter: it still closes a
    step, so no gradient leaks into the next epoch."""
    batches = iter(loader)
    for start in range(0, n_batches, accumulation_steps):
        yield MicroBatches(batches, min(accumulation_steps, n_batches - start))


def total_steps(n_samples, global_batch, accumulation_steps, epochs):
    """Optimizer steps in a whole run: per epoch, its global batches grouped as optimizer_steps does."""
    return math.ceil(math.ceil(n_samples / global_batch) / accumulation_steps) * epochs
