"""Failure detection for a group of ranks: reports, heartbeats and a watchdog over the rendezvous store.

A blocked gloo op cannot be interrupted from Python, so a rank stuck on a failed peer is ended by a watchdog
thread (the policy of NCCL's async error handling and of torchrun's agent). ``DistributedPipeline`` runs every
step under ``FaultMonitor.watch()``; see its docstring for the protocol.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import torch.distributed as dist

__all__ = ["PEER_FAILURE_EXIT_CODE", "FaultMonitor", "PeerFailureError"]

PEER_FAILURE_EXIT_CODE = 75  # a watchdog ended this rank because another rank failed


class PeerFailureError(RuntimeError):
    """This rank's step failed because another rank failed; `failed_rank` says which."""

    def __init__(self, message: str, failed_rank: int | None):
        super().__init__(message)
        self.failed_rank = failed_rank


class FaultMonitor:
    """Failure reports, heartbeats and a watchdog over the rendezvous store of one pipeline group.

    Keys (under a per-pipeline prefix): ``fail/{rank}`` = "<error>" posted by a rank whose step raised;
    ``hb/{rank}`` = wall time, refreshed every ``heartbeat_s`` by a daemon thread. While ``watch()`` is active
    (the body of a step), the thread also checks the peers: when one has posted a failure, or its heartbeat is
    older than ``heartbeat_timeout``, and this rank is still inside the step ``grace`` seconds later, it writes
    the reason to stderr and ends the process with ``PEER_FAILURE_EXIT_CODE``. Losing the store itself (it
    lives on global rank 0) counts as rank 0's failure.
    """

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world: int,
        *,
        heartbeat_s: float = 1.0,
        heartbeat_timeout: float = 10.0,
        grace: float = 5.0,
        exit_on_peer_failure: bool = True,
    ):
        self.store, self.rank, self.world = store, rank, world
        self.heartbeat_s, self.heartbeat_timeout, self.grace = heartbeat_s, heartbeat_timeout, grace
        self.exit_on_peer_failure = exit_on_peer_failure
        self._in_step = threading.Event()
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name=f"partitioner-watchdog-{rank}", daemon=True)
        self._thread.start()

    # -- reports ------------------------------------------------------------------------------------------------
    def report(self, error: BaseException) -> None:
        """Post this rank's failure (first lines of the error and of its root cause) for the peers; never raises."""
        root = error
        while root.__cause__ is not None:
            root = root.__cause__
        text = _first_line(error) + (f" (caused by {_first_line(root)})" if root is not error else "")
        try:
            self.store.set(f"fail/{self.rank}", text[:500])
        except Exception:  # the store may be gone with its host; the peers see our heartbeat stop instead
            pass

    def failures(self) -> dict[int, str]:
        """Failures posted by the other ranks so far: rank -> error text."""
        keys = [f"fail/{r}" for r in range(self.world) if r != self.rank]
        found = {}
        for r, key in zip([r for r in range(self.world) if r != self.rank], keys):
            if self.store.check([key]):
                found[r] = self.store.get(key).decode(errors="replace")
        return found

    def stale(self) -> dict[int, float]:
        """Peers whose heartbeat is older than `heartbeat_timeout`: rank -> seconds since it beat."""
        now, out = time.time(), {}
        for r in range(self.world):
            if r == self.rank:
                continue
            key = f"hb/{r}"
            if self.store.check([key]):
                age = now - float(self.store.get(key).decode())
                if age > self.heartbeat_timeout:
                    out[r] = age
        return out

    def diagnose(self, wait: float) -> tuple[int | None, str]:
        """Which peer failed, waiting up to `wait` s for a report or a stale heartbeat: (rank, reason)."""
        deadline = time.time() + wait
        while True:
            try:
                failed = self.failures()
                if failed:
                    r = min(failed)
                    return r, f"rank {r} failed: {failed[r]}"
                stale = self.stale()
                if stale:
                    r = min(stale)
                    return r, f"rank {r} stopped (no heartbeat for {stale[r]:.1f} s: it died or was killed)"
            except Exception as e:  # the store is served by global rank 0
                return 0, f"rank 0 (host of the rendezvous store) is unreachable ({type(e).__name__}: {e})"
            if time.time() >= deadline:
                return None, "no peer reported a failure"
            time.sleep(0.2)

    # -- the step guard -----------------------------------------------------------------------------------------
    def watch(self) -> _Watch:
        """Context manager for the body of a step (see the class docstring)."""
        return _Watch(self)

    def close(self) -> None:
        """Stop the heartbeat and watchdog thread (the store is left as it is)."""
        self._stop.set()

    def _beat(self) -> None:
        self.store.set(f"hb/{self.rank}", repr(time.time()))

    def _run(self) -> None:
        first_seen: float | None = None
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._beat()
            except Exception:
                pass
            if not self._in_step.is_set():
                first_seen = None
                continue
            rank, reason = self.diagnose(wait=0.0)
            if rank is None:
                first_seen = None
                continue
            first_seen = first_seen or time.time()
            if time.time() - first_seen >= self.grace and self._in_step.is_set() and self.exit_on_peer_failure:
                sys.stderr.write(
                    f"[partitioner rank {self.rank}] pipeline peer failure: {reason}; this rank is blocked in "
                    f"the pipeline, exiting with code {PEER_FAILURE_EXIT_CODE}\n"
                )
                sys.stderr.flush()
                os._exit(PEER_FAILURE_EXIT_CODE)


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _is_comm_error(exc: BaseException) -> bool:
    """Whether `exc` (or its causes) is a collective / p2p failure rather than an error of this rank's code."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if isinstance(seen, dist.DistError) or "gloo" in text or "Connection closed" in text or "Timed out" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _Watch:
    def __init__(self, monitor: FaultMonitor):
        self.monitor = monitor

    def __enter__(self) -> None:
        self.monitor._in_step.set()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        self.monitor._in_step.clear()
        if exc is None or isinstance(exc, PeerFailureError):
            return False
        # Did a peer fail first? Its report explains our error; a communication error with no report waits for a
        # dead peer's heartbeat to go stale. Otherwise the failure is ours: report it for the peers.
        wait = self.monitor.heartbeat_timeout + 2.0 if _is_comm_error(exc) else 1.0
        rank, reason = self.monitor.diagnose(wait=wait)
        if rank is not None:
            raise PeerFailureError(f"pipeline rank {self.monitor.rank}: step failed because {reason}", rank) from exc
        self.monitor.report(exc)
        if hasattr(exc, "add_note"):
            exc.add_note(f"raised on pipeline rank {self.monitor.rank}")
        return False
