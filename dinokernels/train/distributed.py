"""torchrun / DDP plumbing: process group from the environment (gloo on the CPU, NCCL on CUDA), the student in
DistributedDataParallel, and an epoch-seeded sampler that shards like torch's DistributedSampler and can start
mid-epoch (for resuming)."""
import datetime
import math
import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["init_distributed", "is_distributed", "get_rank", "get_world_size", "is_main_process", "wrap_ddp",
           "ShardedSampler", "barrier", "cleanup_distributed"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_distributed(device: str) -> bool:
    """Joins the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT) when WORLD_SIZE > 1: backend NCCL for a CUDA device, gloo otherwise. On CUDA each process takes
    the device LOCAL_RANK. Returns True when distributed (also when the group was already initialised by the
    caller); without those variables, a single process."""
    if is_distributed():
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return False
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=os.environ.get("DINOKERNELS_INIT_METHOD",
                                                                                  "env://"),
                            rank=int(os.environ["RANK"]), world_size=world,
                            timeout=datetime.timedelta(minutes=30))
    return True


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def local_device(device: str) -> torch.device:
    """The device this process trains on: with CUDA under torchrun, cuda:LOCAL_RANK."""
    if device.startswith("cuda") and is_distributed() and ":" not in device:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the student when distributed (device_ids on CUDA), else the model."""
    if not is_distributed():
        return model
    if device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    return nn.parallel.DistributedDataParallel(model)


class ShardedSampler(torch.utils.data.Sampler):
    """torch.utils.data.DistributedSampler(shuffle=True, drop_last=False) index for index — the permutation of
    epoch e is torch.randperm(n, generator=manual_seed(seed + e)), padded by repetition to a multiple of the world
    size, rank r taking positions r, r + W, … — plus `set_start(i)`, which skips the first i indices of this rank's
    shard (resuming inside an epoch). Works without a process group (rank 0 of 1)."""

    def __init__(self, dataset_len: int, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0):
        self.n = int(dataset_len)
        self.num_replicas = get_world_size() if num_replicas is None else int(num_replicas)
        self.rank = get_rank() if rank is None else int(rank)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.start = 0
        self.num_samples = math.ceil(self.n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def indices(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        padding = self.total_size - len(order)
        if padding > 0:
            order += (order * math.ceil(padding / len(order)))[:padding]
        return order[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start
