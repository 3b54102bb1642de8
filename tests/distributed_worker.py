"""What a spawned test process runs: kept apart from the test modules, so that a child
imports torch and datamanip's reductions only."""

import os

import torch

from datamanip import distributed
from datamanip.manipulations.base import linear_normalise, softmax_normalise


def reductions(rank: int, world: int, port: int, out: str) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        w = torch.rand(7, generator=torch.Generator().manual_seed(0)) - 0.3  # some below 0
        mine = distributed.shard(torch.arange(7))  # 4 and 3 examples: unequal shards
        parts = [torch.full((3,), float(rank)), torch.full((2,), rank + 1.0, dtype=torch.float64)]
        result = {
            "positions": mine,
            "gathered": distributed.gather(mine * 10),
            "linear": linear_normalise(w[mine]),
            "softmax": softmax_normalise(w[mine], 0.5),
            "sum": distributed.sum_(parts),
            "scalar": distributed.sum_scalar(rank + 0.5),
        }
        torch.save(result, os.path.join(out, f"{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()
