"""Resumable, distributed, length-grouped batch order.

The order of an epoch is a function of (seed, epoch) only: one global permutation, cut into
global batches of batch_size * world_size samples, each rank taking its own slice. Resuming
therefore only needs the number of samples already consumed, and it works even when the number
of processes changed (2 GPUs -> 1): the same global order continues at the same sample.
"""
import math

import numpy as np


class ResumableBatchSampler:
    def __init__(self, lengths, batch_size, seed=0, shuffle=True, group_by_length=True, rank=0, world_size=1,
                 megabatch_mult=32, accumulation_steps=1):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.accumulation_steps = accumulation_steps
        self.shuffle, self.group_by_length = shuffle, group_by_length
        self.rank, self.world_size, self.megabatch_mult = rank, world_size, megabatch_mult
        self.epoch, self.skip_samples = 0, 0

    def set_epoch(self, epoch, skip_samples=0):
        """Call before each epoch; skip_samples > 0 resumes mid-epoch (a multiple of global batches)."""
        self.epoch, self.skip_samples = epoch, skip_samples

    @property
    def global_batch(self):
        return self.batch_size * self.world_size

    def epoch_order(self):
        """Every index exactly once, in this epoch's order: an int64 array (numbers, not Python
        objects, so a 3M-sample epoch costs 24 MB)."""
        n = len(self.lengths)
        if not self.shuffle:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        if self.group_by_length:
            # LLaVA-style megabatches: sort each random chunk by length so a batch holds similar
            # lengths and pads little. Then shuffle the batches themselves: left sorted, every
            # megabatch would sweep from long samples to short ones, and in a dataset where length
            # goes with content (question wording, caption detail) that periodic drift hurts learning.
            # The unit is an optimizer step's samples, so batch 2 x 2 accumulation steps sees the
            # same order as batch 4.
            step = self.global_batch * self.accumulation_steps
            size = step * self.megabatch_mult
            lengths = np.asarray(self.lengths)
            order = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                                    for chunk in np.split(order, range(size, n, size))])
            n_full = n // step  # a short last step stays last, so every other step is full
            body = order[:n_full * step].reshape(n_full, step)[rng.permutation(n_full)]
            order = np.concatenate([body.reshape(-1), order[n_full * step:]])
        return order

    def __iter__(self):
        order = self.epoch_order()[self.skip_samples:]
        for s in range(0, len(order), self.global_batch):
            chunk = order[s:s + self.global_batch].tolist()
            # The last global batch may be short: split it evenly so every rank steps together.
            per_rank = math.ceil(len(chunk) / self.world_size)
            mine = chunk[self.rank * per_rank:(self.rank + 1) * per_rank]
            yield mine  # may be empty on a tail rank: it then steps on an unsupervised dummy (no hang)

    def __len__(self):
        return math.ceil((len(self.lengths) - self.skip_samples) / self.global_batch)
