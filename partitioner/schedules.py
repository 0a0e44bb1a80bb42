"""schedules: one registry of the torch.distributed.pipelining schedules partitioner runs, and what each implies.

Read by the simulator (which torch class replays), the search (stages per device, in-flight microbatches), the API
(option checks) and the runtime (class, stage -> rank, split backward). A new schedule is one entry here.

    name          torch class                     stages per rank   split backward   in flight at stage s (peak)
    gpipe         ScheduleGPipe                   1                 no               m
    1f1b          Schedule1F1B                    1                 no               min(p - s, m)
    interleaved   ScheduleInterleaved1F1B         >= 2 (default 2)  no               counted *
    looped-bfs    ScheduleLoopedBFS               >= 2 (default 2)  no               m
    zero-bubble   ScheduleInterleavedZeroBubble   >= 2 (default 2)  yes              counted *
    zbv           ScheduleZBVZeroBubble           exactly 2         yes              counted * (= min(p - s, m))

(p stages, m microbatches; * over the schedule's own action order, simulate.in_flight_peaks: `Schedule.in_flight`'s
min(p - s, m) is an estimate there.) Stage s runs on rank s % ranks, except zbv's V: rank r holds stages r and
2R - 1 - r.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DATA_PARALLEL_MODES", "SCHEDULES", "Schedule", "get_schedule", "schedule_names"]

# How each stage is replicated over the data-parallel group (partitioner.runtime.data_parallel has the table):
# DDP; ZeRO-1 (DDP + a sharded optimizer); FSDP2 without / with resharding after forward (ZeRO-2 / ZeRO-3); HSDP.
DATA_PARALLEL_MODES = ("ddp", "zero1", "zero2", "fsdp", "hsdp")
# The modes whose gradients DDP's reducer all-reduces: torch pipelining's split backward bypasses it.
_REDUCER_MODES = ("ddp", "zero1")


@dataclass(frozen=True)
class Schedule:
    name: str
    torch_class: str  # the name torch.distributed.pipelining.schedules.get_schedule_class takes
    stages_per_rank: int | None  # fixed count (1: single-stage classes; zbv: 2), None: any count >= 2
    split_backward: bool  # input and weight gradients are separate actions (zero-bubble)
    all_forwards_first: bool  # every microbatch's activations are held at once (GPipe-like)

    @property
    def single_stage(self) -> bool:
        return self.stages_per_rank == 1

    def default_stages_per_rank(self) -> int:
        return self.stages_per_rank or 2

    def in_flight(self, num_stages: int, microbatches: int) -> list[int]:
        """Microbatches whose activations stage s holds at its peak, per stage (used while planning).

        GPipe-like schedules run all forwards first (m in flight everywhere); 1F1B and the interleaved /
        zero-bubble schedules start backwards after about p - s warm-up forwards, so stage s holds min(p - s, m).
        Exact for single-stage schedules; for the multi-stage ones an estimate, off both ways (interleaved 1F1B holds
        fewer on a deep pipeline's first stages and more on some middle ones, the interleaved zero-bubble schedule
        more on its last stages): the planner uses simulate.in_flight_peaks, counted over the schedule's own action
        order, and plans with this form too where it differs (plan.search._in_flight_models).
        """
        if self.all_forwards_first:
            return [microbatches] * num_stages
        return [min(num_stages - s, microbatches) for s in range(num_stages)]

    def data_parallel_mode(self, requested: str | None = None) -> str:
        """The data-parallel mode this schedule runs with: `requested`, or by default "ddp" ("fsdp" where the
        backward is split).

        torch pipelining drives DDP's reducer from the full backward of the last microbatch. Zero-bubble schedules
        split that backward: the input gradients first, the weight gradients later through ``torch.autograd.grad``
        written into ``.grad`` by hand, which never fires the hooks DDP's reducer all-reduces from (its gradients
        would go unreduced: replicas would drift apart silently). So "ddp", and "zero1" (whose gradients DDP
        reduces), are refused there. FSDP2 ("zero2", "fsdp", "hsdp") is reduced by the schedule's own REDUCE_GRAD
        action and works with every schedule.

        >>> get_schedule("1f1b").data_parallel_mode(), get_schedule("zbv").data_parallel_mode("zero2")
        ('ddp', 'zero2')
        """
        if requested is not None and requested not in DATA_PARALLEL_MODES:
            raise ValueError(f"data_parallel={requested!r}: choose one of {DATA_PARALLEL_MODES}")
        if requested in _REDUCER_MODES and self.split_backward:
            raise ValueError(
                f"data_parallel={requested!r} cannot be used with schedule {self.name!r}: torch pipelining splits its "
                "backward into input and weight gradients and writes the weight gradients itself, so the hooks "
                f"DDP's reducer all-reduces from ({requested!r} reduces gradients with DDP) never fire; use "
                "data_parallel='fsdp' (or 'zero2' / 'hsdp', or leave it unset), or a gpipe / 1f1b / interleaved / "
                "looped-bfs schedule"
            )
        return requested or ("fsdp" if self.split_backward else "ddp")

    def check_counts(self, num_stages: int, ranks: int) -> None:
        """Raise ValueError, with the numbers and the fix, when `num_stages` stages cannot run on `ranks` ranks."""
        if self.single_stage and num_stages != ranks:
            raise ValueError(
                f"schedule {self.name!r} runs one stage per rank: {num_stages} stages for {ranks} ranks; compile "
                f"with devices={num_stages}, or use 'interleaved' / 'zero-bubble' for several stages per rank"
            )
        if num_stages % ranks:
            raise ValueError(
                f"schedule {self.name!r} places stage s on rank s % ranks and needs stages divisible by ranks: "
                f"{num_stages} stages, {ranks} ranks; compile with devices = ranks x k"
            )
        if self.stages_per_rank is not None and num_stages != self.stages_per_rank * ranks:
            raise ValueError(
                f"schedule {self.name!r} runs exactly {self.stages_per_rank} stages per rank: {num_stages} stages, "
                f"{ranks} ranks"
            )

    def stage_ranks(self, num_stages: int, ranks: int) -> list[int]:
        """Rank of every stage (see the module docstring); checks the counts first.

        >>> get_schedule("interleaved").stage_ranks(4, 2), get_schedule("zbv").stage_ranks(4, 2)
        ([0, 1, 0, 1], [0, 1, 1, 0])
        """
        self.check_counts(num_stages, ranks)
        if self.name == "zbv":  # the V: down the ranks, then back up
            return [s if s < ranks else 2 * ranks - 1 - s for s in range(num_stages)]
        return [s % ranks for s in range(num_stages)]


SCHEDULES: dict[str, Schedule] = {
    s.name: s
    for s in (
        Schedule("gpipe", "GPipe", 1, split_backward=False, all_forwards_first=True),
        Schedule("1f1b", "1F1B", 1, split_backward=False, all_forwards_first=False),
        Schedule("interleaved", "Interleaved1F1B", None, split_backward=False, all_forwards_first=False),
        Schedule("looped-bfs", "LoopedBFS", None, split_backward=False, all_forwards_first=True),
        Schedule("zero-bubble", "InterleavedZeroBubble", None, split_backward=True, all_forwards_first=False),
        Schedule("zbv", "ZBVZeroBubble", 2, split_backward=True, all_forwards_first=False),
    )
}


def schedule_names() -> list[str]:
    return list(SCHEDULES)


def get_schedule(name: str) -> Schedule:
    """The registry entry of `name`; ValueError listing the known names otherwise."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name]
