"""Several processes (``torchrun`` / ``accelerate launch``): what the engine reduces, and how.

Every process holds the whole model, the whole optimiser state and the whole manipulation
(every example's weight, the augmenter); each takes its shard of every global batch and of the
validation set. Only first-order quantities cross processes (SPEC §7: second-order gradients
and forward-mode AD do not go through DDP), summed with ``all_reduce``:

- the lookahead gradient Σ_i c_i ∇ℓ_i and the real step's gradient (each process's share of
  the global batch loss, so the sum is the one-process gradient);
- the validation gradient ∇L_val(θ') and the reward loss (each process's share of the mean);
- the normalisers of the weights in the batch (Σ max(w, 0), or the softmax's max and sum);
- the reward gradient of a manipulation whose φ is shared (the augmenter's parameters);
- the updated weights, gathered so that every process ends with the same weight vector.

Every function here is the identity in one process, so the engine's arithmetic there is the
one-process arithmetic. The process group comes from Accelerate (gloo on CPUs, NCCL on GPUs).
"""

import atexit
import logging
import os

import torch
from torch import Tensor

from datamanip.errors import DatamanipError

logger = logging.getLogger(__name__)


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def rank() -> int:
    return torch.distributed.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def shard(positions: Tensor) -> Tensor:
    """This process's contiguous share of a global batch (sizes differ by at most one)."""
    n = world_size()
    return positions if n == 1 else positions.tensor_split(n)[rank()]


def sum_(tensors: list[Tensor]) -> list[Tensor]:
    """Sums each tensor over the processes, in place, in one flat buffer per dtype (one
    all-reduce instead of one per parameter); returns the same list."""
    if world_size() == 1 or not tensors:
        return tensors
    # In order of first appearance: a set's order may differ between processes, and every
    # process must issue the same all-reduces in the same order.
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in group])
        torch.distributed.all_reduce(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    return tensors


def sum_scalar(value: float) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.item()


def max_(t: Tensor) -> Tensor:
    if world_size() == 1:
        return t
    t = t.detach().clone()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def sum_grads(params: list[Tensor]) -> None:
    """Sums the ``.grad`` of ``params`` over the processes (the real step's gradient)."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    sum_(grads)


def gather(t: Tensor) -> Tensor:
    """The concatenation over processes (in rank order) of a 1-d tensor of any length."""
    n = world_size()
    if n == 1:
        return t
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(n)]
    torch.distributed.all_gather(sizes, torch.tensor([len(t)]))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=t.dtype)
    padded[: len(t)] = t.cpu()
    parts = [torch.empty_like(padded) for _ in range(n)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def gather_objects(obj) -> list | None:
    """Every process's ``obj`` (picklable), in rank order, on the main process (None on the
    others)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_main() else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def seed_processes(seed: int) -> None:
    """Gives each process its own random stream (dropout masks) once the model exists; the
    main process keeps the one-process stream, so one process runs as before."""
    if rank() > 0:
        torch.manual_seed(seed + 1_000_003 * rank())


def batch_record(batch_size: int) -> dict:
    """What the run directory records of the processes: ``--batch-size`` is the global batch."""
    n = world_size()
    return {
        "num_processes": n,
        "global_batch_size": batch_size,
        "per_process_batch_size": -(-batch_size // n),
    }


def same_on_every_process(value):
    """The main process's ``value`` (a default run directory named by the clock), on every
    process of a launch; starts the process group if need be."""
    if launched_processes() == 1:
        return value
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())
    shared = [value]
    torch.distributed.broadcast_object_list(shared, src=0)
    return shared[0]


def launched_as_main() -> bool:
    """Whether this is the main process of its launch, known before the process group exists."""
    return os.environ.get("RANK", "0") == "0"


def launched_processes() -> int:
    """How many processes the launcher says it started (``WORLD_SIZE``; 1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def make_accelerator(mixed_precision: str, **options):
    """The run's ``Accelerator``, multi-process on CPUs too, and a check that it is.

    Without ``cpu=True`` on a machine without GPUs, each process of ``torchrun`` or ``accelerate
    launch --multi_gpu`` runs alone, silently repeating the whole run N times; with it they form
    a gloo process group (MULTI_CPU). A launcher that started N processes while Accelerate sees
    one is refused rather than run N times over. The process group ends at exit (torchrun
    reports SIGABRT for a process that exits with it still open).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher != "no" and launcher != mixed_precision:
        logger.warning(
            "the launcher asks for mixed precision %s but --mixed-precision is %s, which this "
            "run uses; pass --mixed-precision %s to datamanip",
            launcher,
            mixed_precision,
            launcher,
        )
    # One process may run several configs (seeds, tests); Accelerate keeps its state in a
    # singleton, so drop the previous run's mixed-precision state (the process group stays).
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision, **options
    )
    asked = cpu_launch_processes()
    if asked and asked > 1 and accelerator.num_processes == 1:
        raise DatamanipError(
            f"accelerate launch --cpu --num_processes {asked} started one process (Accelerate's "
            "multi-CPU launch wants mpirun); on CPUs launch with accelerate launch --multi_gpu "
            f"--num_processes {asked} -m datamanip ... or torchrun --nproc_per_node {asked} "
            "-m datamanip ..."
        )
    launched = launched_processes()
    if launched > 1 and accelerator.num_processes != launched:
        raise DatamanipError(
            f"the launcher started {launched} processes but Accelerate sees "
            f"{accelerator.num_processes}: each would run alone; on CPUs launch with "
            "torchrun --nproc_per_node N -m datamanip ... or accelerate launch --multi_gpu "
            "--num_processes N -m datamanip ..."
        )
    if accelerator.num_processes > 1:
        _end_process_group_at_exit()
        if not accelerator.is_main_process:
            quiet_other_processes()
    return accelerator


def cpu_launch_processes() -> int | None:
    """The ``--num_processes`` of an ``accelerate launch --cpu`` that started this process.

    That launch starts one process whatever the number asked and leaves no trace of it in the
    environment, so the launcher's command line (the parent process's, on Linux) is read; None
    when it cannot be known.
    """
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1") or (
        "WORLD_SIZE" in os.environ
    ):
        return None
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, arg in enumerate(argv):
        if arg.startswith("--num_processes="):
            value = arg.split("=", 1)[1]
        elif arg == "--num_processes" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        return int(value) if value.isdigit() else None
    return None


_registered = False


def _end_process_group_at_exit() -> None:
    global _registered
    if not _registered:
        atexit.register(end_process_group)
        _registered = True


def end_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def quiet_other_processes() -> None:
    """Processes other than the main one print errors only to the terminal (the main process
    says the rest once); their own log file (``--log-dir``) keeps everything."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def log_to_file(folder: str) -> None:
    """Every process logs at INFO to ``FOLDER/process_RANK.log`` (``--log-dir``)."""
    os.makedirs(folder, exist_ok=True)
    name = os.path.join(folder, f"process_{os.environ.get('RANK', '0')}.log")
    handler = logging.FileHandler(name)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for other in root.handlers:  # the terminal keeps the level it had (--quiet: warnings)
        if other.level == logging.NOTSET:
            other.setLevel(root.level)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
