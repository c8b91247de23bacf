"""torchrun / DDP / FSDP plumbing: process group from the environment (gloo on the CPU, NCCL on CUDA), the student in
DistributedDataParallel, an epoch-seeded sampler that shards like torch's DistributedSampler and can start
mid-epoch (for resuming), and FSDP (torch.distributed.fsdp.fully_shard, "FSDP2"): sharding per transformer block,
mixed-precision policies, full (unsharded) state dicts gathered for checkpoints and sharded again on loading, and
gradient norms summed over every rank's shard."""
import datetime
import math
import os
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["init_distributed", "is_distributed", "get_rank", "get_world_size", "is_main_process", "wrap_ddp",
           "ShardedSampler", "barrier", "cleanup_distributed", "init_single_process_group", "FSDP_MIXED_PRECISIONS",
           "fsdp_mixed_precision_dtype", "shard_model", "is_sharded", "local_part", "full_state_dict",
           "load_full_state_dict", "full_optimizer_state_dict", "load_full_optimizer_state_dict",
           "global_grad_norms", "broadcast_from_rank0"]


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
    missing = [name for name in ("RANK",) if name not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set: start the processes with "
                           f"torchrun (torchrun --nproc_per_node={world} -m dinokernels ...), which sets RANK, "
                           f"LOCAL_RANK, MASTER_ADDR and MASTER_PORT")
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=os.environ.get("DINOKERNELS_INIT_METHOD",
                                                                                  "env://"),
                            rank=int(os.environ["RANK"]), world_size=world,
                            timeout=datetime.timedelta(minutes=30))
    return True


def init_single_process_group(device: str) -> None:
    """A process group of one (rank 0 of 1, an in-memory store): what FSDP needs to run in a process started
    without torchrun. Sharding over one rank keeps whole tensors; the mixed-precision policy still applies."""
    if is_distributed():
        return
    if not dist.is_available():
        raise RuntimeError("--fsdp needs torch.distributed, which this torch build lacks")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda") and ":" in device:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def cleanup_distributed() -> None:
    """Ends the process group. Every rank first waits at a barrier: a rank that tears its gloo connections down
    while another still works (saving the final checkpoint) can abort at exit, failing a finished run."""
    if is_distributed():
        if dist.get_world_size() > 1:
            dist.barrier()
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


def broadcast_from_rank0(module: nn.Module) -> None:
    """Every rank's parameters and buffers become rank 0's (what DDP does when it wraps a model)."""
    if is_distributed():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)


# ---- FSDP (torch.distributed.fsdp.fully_shard) ----

FSDP_MIXED_PRECISIONS = ("auto", "none", "bf16", "fp16")
_MESHES: Dict[Tuple[str, int], Any] = {}


def fsdp_mixed_precision_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """The dtype FSDP gathers parameters in and computes with: None (float32 throughout) for "none", and for
    "auto" on the CPU; bfloat16 for "bf16", and for "auto" on CUDA; float16 for "fp16" (the trainer then scales
    the loss). The sharded parameters, the optimiser state, the EMA teacher and the gradient reduction stay
    float32."""
    if mode not in FSDP_MIXED_PRECISIONS:
        raise ValueError(f"fsdp_mixed_precision must be one of {', '.join(FSDP_MIXED_PRECISIONS)}, got {mode!r}")
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "none"
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def _fsdp_api():
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError as e:  # torch < 2.6 has no public fully_shard
        raise RuntimeError(f"--fsdp needs torch.distributed.fsdp.fully_shard (torch ≥ 2.6); this is torch "
                           f"{torch.__version__} ({e})") from None
    return init_device_mesh, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


def _mesh(device: torch.device):
    """The 1-D mesh of every rank, made once per device type (FSDP would otherwise pick the accelerator even
    for a CPU run on a machine that has one)."""
    init_device_mesh = _fsdp_api()[0]
    key = (device.type, get_world_size())
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device.type, (get_world_size(),))
    return _MESHES[key]


def _transformer_blocks(module: nn.Module) -> List[nn.Module]:
    """The blocks of every `blocks` ModuleList inside `module`, chunked layouts (blocks.{chunk}.{i}) flattened
    and their nn.Identity padding skipped."""
    found: List[nn.Module] = []
    for name, sub in module.named_modules():
        if name.split(".")[-1] != "blocks" or not isinstance(sub, nn.ModuleList):
            continue
        for child in sub:
            children = list(child) if isinstance(child, nn.ModuleList) else [child]
            found += [c for c in children if not isinstance(c, nn.Identity) and any(True for _ in c.parameters())]
    return found


def shard_model(module: nn.Module, device: torch.device, param_dtype: Optional[torch.dtype], *,
                reshard_after_forward: bool, forward_methods: Sequence[str] = ("forward_features",)) -> nn.Module:
    """fully_shard (FSDP2) on each transformer block of `module` and then on `module` itself (which takes the rest:
    embeddings, final norm, heads), as the official DINOv2 shards per block. Parameters become DTensors holding
    this rank's shard (float32); with `param_dtype` they are gathered and computed in that dtype, gradients are
    reduced in float32 and `module`'s outputs are returned as float32. `reshard_after_forward` False keeps the
    gathered parameters from forward to backward (FSDP1's SHARD_GRAD_OP, the official setting for the student);
    True frees them after each forward (for a teacher, which has no backward). Methods other than forward that
    are called from outside (forward_features) get FSDP's gathering hooks too. Returns `module`, sharded in
    place; every rank must call this on the same model."""
    _, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method = _fsdp_api()
    if not is_distributed():
        raise RuntimeError("shard_model needs a process group (init_distributed or init_single_process_group)")
    mesh = _mesh(device)
    inner = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    outer = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                 output_dtype=torch.float32 if param_dtype is not None else None)
    for block in _transformer_blocks(module):
        fully_shard(block, mesh=mesh, mp_policy=inner, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, mp_policy=outer, reshard_after_forward=reshard_after_forward)
    for name in forward_methods:
        if callable(getattr(module, name, None)):
            register_fsdp_forward_method(module, name)
    # FSDP warns once per output that is a view (the ViT's x_norm_clstoken = normed[:, 0]) because an in-place op on
    # it would skip the gradient hook; the training code only reads these outputs.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return module


def is_sharded(tensor: Any) -> bool:
    """True for a DTensor (an FSDP-sharded parameter, its gradient or its optimiser state)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def local_part(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: in-place changes reach the DTensor), else the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def _gathered(value: Any, keep: bool) -> Any:
    """A state entry made whole: a DTensor is all-gathered (a collective); on the rank that keeps it, tensors go
    to the CPU."""
    if is_sharded(value):
        value = value.full_tensor()
    if not keep:
        return None
    return value.detach().cpu() if isinstance(value, Tensor) else value


def full_state_dict(module: nn.Module) -> Dict[str, Any]:
    """module.state_dict() with every sharded entry gathered whole, the same keys and shapes as the unsharded
    model's: on rank 0 on the CPU, on other ranks an empty dict (the gathered copies are dropped at once). A
    collective when anything is sharded: every rank must call it. A module with nothing sharded returns its plain
    state_dict()."""
    state = module.state_dict()
    if not any(is_sharded(v) for v in state.values()):
        return state
    keep = get_rank() == 0
    out = {}
    for key, value in state.items():
        value = _gathered(value, keep)
        if keep:
            out[key] = value
    return out


def _shard_like(full: Tensor, like: Tensor, name: str) -> Tensor:
    """This rank's shard of `full` laid out as the DTensor `like` (each rank slices its own copy: no
    communication)."""
    from torch.distributed.tensor import distribute_tensor

    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"{name}: the checkpoint holds shape {tuple(full.shape)}, the model {tuple(like.shape)}")
    local = like.to_local()
    return distribute_tensor(full.detach().to(device=local.device, dtype=like.dtype), like.device_mesh,
                             like.placements, src_data_rank=None)


def load_full_state_dict(module: nn.Module, state: Dict[str, Any], strict: bool = True):
    """module.load_state_dict(state) for a full (unsharded) state dict, also when `module` is sharded: each
    sharded entry takes this rank's shard of the full tensor. Missing or unexpected keys and shape mismatches are
    reported as by load_state_dict."""
    current = module.state_dict()
    if not any(is_sharded(v) for v in current.values()):
        return module.load_state_dict(state, strict=strict)
    converted = {}
    for key, value in state.items():
        like = current.get(key)
        converted[key] = _shard_like(value, like, key) if like is not None and is_sharded(like) else value
    return module.load_state_dict(converted, strict=strict)


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """optimizer.state_dict() with sharded state (AdamW's moments of sharded parameters) gathered whole: the
    format of the same optimiser over unsharded parameters, so that either kind of run resumes from it. Rank 0
    gets the tensors (on the CPU), other ranks empty state. A collective when anything is sharded."""
    state = optimizer.state_dict()
    if not any(is_sharded(v) for entry in state["state"].values() for v in entry.values()):
        return state
    keep = get_rank() == 0
    gathered: Dict[int, Dict[str, Any]] = {}
    for index, entry in state["state"].items():  # the same order on every rank
        values = {name: _gathered(value, keep) for name, value in entry.items()}
        if keep:
            gathered[index] = values
    return {"state": gathered, "param_groups": state["param_groups"]}


def load_full_optimizer_state_dict(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """optimizer.load_state_dict(state) for a full state dict (full_optimizer_state_dict's, or a plain run's),
    also when the optimiser's parameters are sharded: state tensors shaped like their sharded parameter take this
    rank's shard."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(is_sharded(p) for p in params):
        optimizer.load_state_dict(state)
        return
    saved = sum(len(g["params"]) for g in state.get("param_groups", []))
    if saved != len(params):
        raise ValueError(f"the optimiser state holds {saved} parameters, this model's optimiser {len(params)}")
    converted: Dict[Any, Dict[str, Any]] = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        converted[index] = {
            name: (_shard_like(value, param, f"optimizer state {name} of parameter {index}")
                   if is_sharded(param) and isinstance(value, Tensor) and value.dim() > 0 else value)
            for name, value in entry.items()}
    optimizer.load_state_dict({"state": converted, "param_groups": state["param_groups"]})


@torch.no_grad()
def global_grad_norms(groups: Sequence[Sequence[Tensor]]) -> Tensor:
    """(len(groups),) float32: the L2 norm of each group of gradients taken over the whole tensors — every rank's
    local sum of squares, added up by one all-reduce when any gradient is sharded (then every rank must call
    this). Plain tensors give the usual norm; an empty group gives 0."""
    flat = [g for group in groups for g in group]
    if not flat:
        return torch.zeros(len(groups))
    device = local_part(flat[0]).device
    sums = torch.stack([
        torch.stack([local_part(g).detach().float().pow(2).sum() for g in group]).sum() if group
        else torch.zeros((), device=device) for group in groups])
    sharded = [is_sharded(g) for g in flat]
    if any(sharded):
        if not all(sharded):  # a replicated gradient would be counted once per rank
            raise ValueError("global_grad_norms: the gradients must be all sharded or all plain, got a mixture")
        dist.all_reduce(sums)
    return sums.sqrt()
