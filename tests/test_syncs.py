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
from builders import tiny_run


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


def moe_per_expert_reference(moe, x):
    """The routed experts' output as MoEFeedForward computed it before, one nonzero per expert."""
    flat = x.reshape(-1, x.shape[-1])
    probs = moe.gate(flat).float().softmax(-1)
    topk_w, topk_idx = probs.topk(moe.cfg.num_experts_per_tok, dim=-1)
    if moe.cfg.norm_topk_prob:
        topk_w = topk_w / (topk_w.sum(-1, keepdim=True) + 1e-20)
    out = torch.zeros_like(flat)
    for e, expert in enumerate(moe.experts):
        rows, slot = (topk_idx == e).nonzero(as_tuple=True)
        out.index_add_(0, rows, (expert(flat[rows]) * topk_w[rows, slot, None].to(flat.dtype)).to(out.dtype))
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(flat)
    return out.view(x.shape)


# Counted this way, the MoE layer read the device once per routed expert, plus twice for its balance
# loss's one_hot (a range check), before its tokens were sorted by expert: 8 with 6 experts; now once
# (the experts' sizes), whatever the number of experts.
@pytest.mark.parametrize("generation", ["minimind2", "minimind3"])
def test_the_moe_layer_reads_the_device_once_and_routes_as_one_nonzero_per_expert_did(generation):
    from model.model_minimind import MiniMindConfig, MoEFeedForward
    torch.manual_seed(0)
    moe = MoEFeedForward(MiniMindConfig(generation, dim=64, hidden_dim=128, use_moe=True, n_routed_experts=6))
    x = torch.randn(3, 40, 64, requires_grad=True)
    with SyncCounter() as counter:
        out = moe(x)
    assert dict(counter.counts) == {"tolist": 1}
    reference = moe_per_expert_reference(moe, x)
    assert torch.equal(out, reference)
    grads = torch.autograd.grad(out.square().sum(), [x, *moe.parameters()], allow_unused=True)
    ref_grads = torch.autograd.grad(reference.square().sum(), [x, *moe.parameters()], allow_unused=True)
    assert all(g is not None for g in grads[1:])  # every expert's weights, as DDP needs
    assert all(torch.allclose(g, r, atol=1e-6) for g, r in zip(grads, ref_grads))
