"""comm: how long a transfer or a collective takes on a DeviceSpec's links (the one place these formulas live).

    point to point      messages x latency + bytes / bandwidth
    ring all-reduce     2 latency + 2 (k - 1) / k x bytes / bandwidth     (k ranks; nothing for k = 1)
    ring all-gather     latency + (k - 1) / k x bytes / bandwidth         (bytes of the gathered tensor)

A ring all-reduce is a reduce-scatter then an all-gather (the two phases NCCL's ring runs), so it costs what those
two cost, a latency each: sequence parallelism, which runs the two apart, then pays what the all-reduce it
replaces did (one latency for the all-reduce made splitting it look twice as slow to start).

`bandwidth` is the link's achieved rate (peak x DeviceSpec.link_efficiency). `internode`: the ranks span nodes,
so the inter-node bandwidth applies. Used by the planning graph (stage
sends), the tied-weight and data-parallel gradient syncs, the tensor-parallel collectives and the min-cut (which
counts a message's latency as the bytes the link would move meanwhile).
"""

from __future__ import annotations

import numpy as np

from partitioner.devices import DeviceSpec

__all__ = ["all_gather_time", "all_reduce_time", "latency_bytes", "p2p_time", "p2p_times"]


def _bandwidth(spec: DeviceSpec, internode: bool) -> float:
    """What NCCL (or gloo) achieves on the link: its peak per direction x DeviceSpec.link_efficiency."""
    return (spec.internode_bandwidth if internode else spec.link_bandwidth) * spec.link_efficiency


def p2p_time(spec: DeviceSpec, nbytes: float, messages: float = 1, *, internode: bool = False) -> float:
    """`messages` point-to-point sends moving `nbytes` in all; nothing when there is nothing to send."""
    if messages <= 0 and nbytes <= 0:
        return 0.0
    return max(messages, 1) * spec.link_latency + nbytes / _bandwidth(spec, internode)


def p2p_times(spec: DeviceSpec, nbytes: np.ndarray, messages: np.ndarray, *, internode: bool = False) -> np.ndarray:
    """p2p_time over arrays of (nbytes, messages), messages >= 1 (the caller decides where nothing is sent)."""
    return np.maximum(messages, 1) * spec.link_latency + nbytes / _bandwidth(spec, internode)


def all_reduce_time(spec: DeviceSpec, nbytes: float, ranks: int, *, internode: bool = False) -> float:
    """A ring all-reduce of `nbytes` over `ranks` ranks: a reduce-scatter and an all-gather (module docstring)."""
    if ranks <= 1:
        return 0.0
    return 2 * spec.link_latency + 2 * (ranks - 1) / ranks * nbytes / _bandwidth(spec, internode)


def all_gather_time(spec: DeviceSpec, nbytes: float, ranks: int, *, internode: bool = False) -> float:
    """A ring all-gather producing `nbytes` on each of `ranks` ranks."""
    if ranks <= 1:
        return 0.0
    return spec.link_latency + (ranks - 1) / ranks * nbytes / _bandwidth(spec, internode)


def latency_bytes(spec: DeviceSpec) -> float:
    """One message's latency as the bytes the link moves meanwhile (the min-cut's price of a crossing value)."""
    return spec.link_latency * _bandwidth(spec, False)
