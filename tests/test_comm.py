"""partitioner.comm: the transfer and collective formulas, against hand computation on a small spec."""

from __future__ import annotations

import dataclasses

import pytest

from partitioner.comm import all_gather_time, all_reduce_time, latency_bytes, p2p_time
from partitioner.devices import PRESETS

SPEC = dataclasses.replace(
    PRESETS["h100"], link_bandwidth=100.0, internode_bandwidth=10.0, link_latency=0.5, link_efficiency=1.0
)


def test_point_to_point() -> None:
    assert p2p_time(SPEC, 200.0) == pytest.approx(0.5 + 2.0)
    assert p2p_time(SPEC, 200.0, 3) == pytest.approx(3 * 0.5 + 2.0)  # a latency per message
    assert p2p_time(SPEC, 200.0, internode=True) == pytest.approx(0.5 + 20.0)
    assert p2p_time(SPEC, 0.0, 0) == 0.0  # nothing to send
    assert p2p_time(SPEC, 0.0, 2) == pytest.approx(1.0)  # empty messages still wait their latency


def test_ring_collectives() -> None:
    # a reduce-scatter then an all-gather: a latency each
    assert all_reduce_time(SPEC, 400.0, 4) == pytest.approx(2 * 0.5 + 2 * 3 / 4 * 4.0)
    assert all_gather_time(SPEC, 400.0, 4) == pytest.approx(0.5 + 3 / 4 * 4.0)
    assert all_reduce_time(SPEC, 400.0, 2, internode=True) == pytest.approx(2 * 0.5 + 2 * 1 / 2 * 40.0)
    assert all_reduce_time(SPEC, 400.0, 1) == all_gather_time(SPEC, 400.0, 1) == 0.0


def test_link_efficiency_scales_the_bandwidth_not_the_latency() -> None:
    half = dataclasses.replace(SPEC, link_efficiency=0.5)
    assert p2p_time(half, 200.0) == pytest.approx(0.5 + 4.0)
    assert all_reduce_time(half, 400.0, 4) == pytest.approx(2 * 0.5 + 2 * 3 / 4 * 8.0)


def test_latency_in_bytes() -> None:
    assert latency_bytes(SPEC) == pytest.approx(50.0)
