"""torch's FSDP2 (`fully_shard`) on CPU processes with gloo, without accelerate or transformers: the ground floor.

```bash
torchrun --standalone --nproc_per_node 2 tests/scripts/fully_shard_gloo.py OUT.pt
```

A two-layer MLP, each layer and the root sharded with `fully_shard`, takes 3 SGD steps on its process's half of a
batch; the same model unsharded takes the same steps on the whole batch in every process. Rank 0 saves both final
state dicts (the sharded one gathered with `full_tensor`) and the shard shapes to OUT.pt.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor


def make_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def exit_without_teardown() -> None:
    """End the process once every result is written. After `fully_shard` on gloo, a thread torch leaves joinable
    aborts the interpreter's exit now and then ("terminate called without an active exception", about 1 run in 15
    here, after `destroy_process_group` has returned on both ranks): skip the C++ teardown instead."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))

    reference = make_model()
    train(reference, x, y)

    sharded = make_model()
    for layer in (sharded[0], sharded[2]):
        fully_shard(layer)
    fully_shard(sharded)
    # The mean-squared error of equal halves averages to that of the whole batch, as FSDP averages the gradients
    train(sharded, x.chunk(world_size)[rank], y.chunk(world_size)[rank])
    state = {name: value.full_tensor() for name, value in sharded.state_dict().items()}  # a collective: every rank
    if rank == 0:
        torch.save(
            {
                "world_size": world_size,
                "all_dtensors": all(isinstance(p, DTensor) for p in sharded.parameters()),
                "local_shapes": {name: tuple(p.to_local().shape) for name, p in sharded.named_parameters()},
                "sharded": state,
                "reference": reference.state_dict(),
            },
            out,
        )
    dist.barrier()
    dist.destroy_process_group()
    exit_without_teardown()


if __name__ == "__main__":
    main(sys.argv[1])
