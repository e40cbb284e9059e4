"""The training processes: one, torchrun's (DDP) or the deepspeed launcher's. Cluster is this
process's place among them and the few collectives the loop uses; the random streams are seeded
per rank, and saved in resume files as tensors and plain lists."""
import dataclasses
import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Cluster:
    """This process's place among the training processes, and the collectives the loop uses
    (no-ops for a single process)."""
    rank: int = 0
    world: int = 1
    device: str = "cpu"  # under DDP/DeepSpeed on CUDA: this process's cuda:LOCAL_RANK

    @property
    def is_main(self):
        return self.rank == 0

    def sum(self, tensor):
        """`tensor` summed over all processes (in place)."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def total(self, n):
        """The int `n` summed over all processes, read back (a wait for the GPU's queue under NCCL).
        One process never touches the device: `n` itself."""
        if self.world == 1:
            return int(n)
        return int(self.sum(torch.full((), n, dtype=torch.float64, device=self.device)))  # a fill, not a host copy

    def gather(self, obj):
        """Every process's `obj`, in rank order."""
        if self.world == 1:
            return [obj]
        objs = [None] * self.world
        dist.all_gather_object(objs, obj)
        return objs

    def close(self):
        """Leave together: nobody exits (and makes torchrun stop the others) before rank 0 has saved."""
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()


def setup_distributed(cfg):
    """torchrun and the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
    (the latter also passes --local_rank). Without them this is one process, with no process group,
    except under --deepspeed, which needs one: then it is a group of one on a free local port."""
    if cfg.local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(cfg.local_rank))
    if cfg.deepspeed and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if int(os.environ.get("WORLD_SIZE", 1)) == 1 and not cfg.deepspeed:
        return Cluster(0, 1, cfg.device)
    device = cfg.device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Cluster(dist.get_rank(), dist.get_world_size(), device)


# Random streams: seeded per rank, and saved in resume files as tensors and plain lists.

def seed_all(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state():
    """This process's RNG streams as tensors and plain lists, so that a resume file loads with
    torch.load(weights_only=True), which refuses numpy arrays and other pickled objects."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": [version, list(internal), gauss_next],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(states, rank, world, seed):
    """Restore this rank's RNG streams; after a world-size change, fresh per-rank streams instead."""
    if len(states) != world:
        seed_all(seed + rank)
        return
    state = states[rank]
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
