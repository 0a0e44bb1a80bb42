"""partitioner.schedules: the one registry of schedules (torch class, stages per rank, split backward, in-flight
microbatches, stage -> rank), checked against torch's own classes and mappings."""

from __future__ import annotations

import pytest
from torch.distributed.pipelining import schedules as torch_schedules
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

from partitioner.schedules import DATA_PARALLEL_MODES, SCHEDULES, get_schedule


def test_every_entry_names_a_torch_schedule_class_of_its_kind() -> None:
    for name, entry in SCHEDULES.items():
        cls = torch_schedules.get_schedule_class(entry.torch_class)
        single = issubclass(cls, torch_schedules.PipelineScheduleSingle)
        assert single == entry.single_stage, name


def test_stage_ranks_and_refusals() -> None:
    assert get_schedule("1f1b").stage_ranks(4, 4) == [0, 1, 2, 3]
    assert get_schedule("interleaved").stage_ranks(6, 2) == [0, 1, 0, 1, 0, 1]
    assert get_schedule("zbv").stage_ranks(8, 4) == [0, 1, 2, 3, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="exactly 2 stages per rank: 6 stages, 2 ranks"):
        get_schedule("zbv").stage_ranks(6, 2)
    with pytest.raises(ValueError, match="one stage per rank.*4 stages for 2 ranks"):
        get_schedule("gpipe").stage_ranks(4, 2)
    with pytest.raises(ValueError, match="divisible by ranks: 5 stages, 2 ranks"):
        get_schedule("zero-bubble").stage_ranks(5, 2)
    with pytest.raises(ValueError, match="unknown schedule 'pipedream'"):
        get_schedule("pipedream")


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_the_v_is_torch_s(ranks: int) -> None:
    mapping = generate_stage_to_rank_mapping(ranks, 2 * ranks, style="v")
    assert get_schedule("zbv").stage_ranks(2 * ranks, ranks) == [mapping[s] for s in range(2 * ranks)]


def test_in_flight_microbatches() -> None:
    assert get_schedule("gpipe").in_flight(4, 8) == [8, 8, 8, 8]
    assert get_schedule("looped-bfs").in_flight(4, 8) == [8, 8, 8, 8]
    assert get_schedule("1f1b").in_flight(4, 8) == [4, 3, 2, 1]
    assert get_schedule("zero-bubble").in_flight(4, 2) == [2, 2, 2, 1]


def test_split_backward_and_stage_counts() -> None:
    assert {n for n, e in SCHEDULES.items() if e.split_backward} == {"zero-bubble", "zbv"}
    assert {n: e.default_stages_per_rank() for n, e in SCHEDULES.items()} == {
        "gpipe": 1, "1f1b": 1, "interleaved": 2, "looped-bfs": 2, "zero-bubble": 2, "zbv": 2,
    }  # fmt: skip


def test_data_parallel_modes_per_schedule() -> None:
    """Every mode runs with the full-backward schedules; the split backward (zero-bubble) bypasses DDP's reducer,
    so "ddp" and "zero1" (DDP's gradients) are refused there, saying why; the default follows the split."""
    assert DATA_PARALLEL_MODES == ("ddp", "zero1", "zero2", "fsdp", "hsdp")
    for name, entry in SCHEDULES.items():
        assert entry.data_parallel_mode() == ("fsdp" if entry.split_backward else "ddp"), name
        for mode in DATA_PARALLEL_MODES:
            if entry.split_backward and mode in ("ddp", "zero1"):
                with pytest.raises(ValueError, match=rf"data_parallel='{mode}' cannot be used .* never fire"):
                    entry.data_parallel_mode(mode)
            else:
                assert entry.data_parallel_mode(mode) == mode, (name, mode)
    with pytest.raises(ValueError, match="'zero3': choose one of"):
        get_schedule("1f1b").data_parallel_mode("zero3")
