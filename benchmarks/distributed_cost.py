"""Cost of going distributed: the learned-weighting step under 1 and 2 CPU processes.

The same global batch (25, validation 20, length 48, MiniLM shapes; SPEC §8) is taken by one
process, or shared by two processes launched by torchrun over gloo, each on one thread. Per
variant (plain step, learned-weighting step) it prints the median seconds per step and what
crossed between processes per step: the bytes each process sent into all-reduce / all-gather
and the number of collective calls. Steps are interleaved between the variants.

    python benchmarks/distributed_cost.py                 # MiniLM, 6 steps per variant
    python benchmarks/distributed_cost.py --steps 3 --model PATH

Two processes on one 2-core machine do the same work on half the examples each, so the time
per step shows the reductions' cost and the duplicated per-process work (the optimiser step,
the lookahead over all 22.7M parameters) as much as any speed-up.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BATCH, VAL, LENGTH = 25, 20, 48
REPO_ROOT = Path(__file__).resolve().parents[1]


class Traffic:
    """Counts the bytes this process hands to the collectives, by wrapping them."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        dist = torch.distributed
        for name in ("all_reduce", "all_gather", "broadcast"):
            setattr(dist, name, self._counted(getattr(dist, name), name))

    def _counted(self, function, name):
        def call(*args, **kwargs):
            tensor = args[1] if name == "all_gather" else args[0]
            self.bytes += tensor.numel() * tensor.element_size()
            self.calls += 1
            return function(*args, **kwargs)

        return call


def worker(model_name: str, steps: int) -> None:
    from datamanip import distributed
    from datamanip.engine import take_step
    from datamanip.experiment import build_optimizer
    from datamanip.manipulations import LearnedWeighting, NoManipulation
    from datamanip.manipulations.base import Batch
    from datamanip.models import load_text_classifier

    torch.set_num_threads(1)
    traffic = Traffic()
    accelerator = distributed.make_accelerator("no")
    torch.manual_seed(0)
    model, _ = load_text_classifier(model_name, num_labels=2)
    optimizer = build_optimizer(model, 4e-5, 0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    inner.train()

    g = torch.Generator().manual_seed(0)

    def shard(n: int) -> Batch:
        ids = torch.randint(1000, 20000, (n, LENGTH), generator=g)
        labels = torch.randint(0, 2, (n,), generator=g)
        rows = distributed.shard(torch.arange(n))
        inputs = {"input_ids": ids[rows], "attention_mask": torch.ones(len(rows), LENGTH).long()}
        return Batch(rows, labels[rows], inputs)

    batch, val = shard(BATCH), [shard(VAL)]
    labels = torch.zeros(BATCH, dtype=torch.long)
    variants = {"plain": NoManipulation(labels, 2), "weighting": LearnedWeighting(labels, 2)}
    times = {name: [] for name in variants}
    traffic_per_step = {}
    for i in range(steps + 1):  # the first round warms up
        for name, manipulation in variants.items():
            distributed.barrier()
            before = (traffic.bytes, traffic.calls)
            start = time.perf_counter()
            take_step(inner, optimizer, manipulation, batch, val, name == "weighting",
                      accelerator, total=BATCH)  # fmt: skip
            distributed.barrier()
            elapsed = time.perf_counter() - start
            if i > 0:
                times[name].append(elapsed)
            traffic_per_step[name] = (traffic.bytes - before[0], traffic.calls - before[1])
    if distributed.is_main():
        for name in variants:
            sent, calls = traffic_per_step[name]
            record = {
                "variant": name,
                "processes": distributed.world_size(),
                "s_per_step": statistics.median(times[name]),
                "bytes_per_step": sent if distributed.world_size() > 1 else 0,
                "collectives_per_step": calls if distributed.world_size() > 1 else 0,
            }
            print("RESULT " + json.dumps(record), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, model: str, steps: int) -> list[dict]:
    script = [str(Path(__file__).resolve()), "--worker", "--model", model, "--steps", str(steps)]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            f"--master_port={free_port()}",
            *script,
        ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"error: the {processes}-process run failed:\n{done.stdout}\n{done.stderr}")
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    return [json.loads(x.removeprefix("RESULT ")) for x in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.model, args.steps)

    rows = launch(1, args.model, args.steps) + launch(2, args.model, args.steps)
    alone = {r["variant"]: r["s_per_step"] for r in rows if r["processes"] == 1}
    print(f"global batch {BATCH}, validation {VAL}, length {LENGTH}, model {args.model}, "
          f"median of {args.steps} steps, one thread per process")  # fmt: skip
    print()
    print("| step | processes | s/step | × one process | MB sent per process per step | "
          "collectives per step |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["variant"], r["processes"])):
        print(
            f"| {r['variant']} | {r['processes']} | {r['s_per_step']:.3f} | "
            f"{r['s_per_step'] / alone[r['variant']]:.2f} | {r['bytes_per_step'] / 1e6:.1f} | "
            f"{r['collectives_per_step']} |"
        )


if __name__ == "__main__":
    main()
