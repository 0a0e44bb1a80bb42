"""launch: start a world of local processes, torchrun-style, with a hard deadline (tests and benchmarks).

``spawn("pkg.module:function", nprocs, kwargs)`` starts ``nprocs`` Python processes with torchrun's environment
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT = a free port). Each initializes the default
group (gloo on the CPU, or ``backend="nccl"`` on cuda:LOCAL_RANK; ``pg_timeout`` bounds every collective), calls
``function(**kwargs)`` and exits 0, or prints the traceback and exits 1. The parent waits at most ``timeout``
seconds in all, then kills what is left (the whole process group of each child) and reports it as timed out: a
hung world fails, it never blocks the caller.

In production use torchrun itself (``torchrun --nproc-per-node N script.py``); the same ``function`` works there
through ``python -m partitioner.launch pkg.module:function '<json kwargs>'``.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

__all__ = ["RankResult", "free_port", "main", "spawn"]


@dataclass(frozen=True)
class RankResult:
    rank: int
    returncode: int  # -9 when killed at the deadline
    stdout: str
    stderr: str
    seconds: float  # from the start of the world to this rank's exit
    timed_out: bool


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(
    target: str,
    nprocs: int,
    kwargs: dict[str, Any] | None = None,
    *,
    timeout: float = 120.0,
    pg_timeout: float = 30.0,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    backend: str = "gloo",
) -> list[RankResult]:
    """Run `target` ("module:function") on `nprocs` ranks of `backend` (gloo on the CPU; "nccl": rank r on
    cuda:r); one RankResult per rank, in rank order."""
    import torch.distributed as dist

    port = free_port()
    # The rendezvous store lives here, as torchrun's agent hosts it: it outlives any rank, so a failing rank's
    # report stays readable by the others.
    store = dist.TCPStore("127.0.0.1", port, nprocs, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=pg_timeout))  # fmt: skip
    procs = []
    start = time.monotonic()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for rank in range(nprocs):
        child_env = dict(os.environ)
        child_env.update(env or {})
        child_env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nprocs),
            LOCAL_WORLD_SIZE=str(nprocs),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            TORCHELASTIC_USE_AGENT_STORE="True",
            PARTITIONER_PG_TIMEOUT=str(pg_timeout),
            PARTITIONER_BACKEND=backend,
            OMP_NUM_THREADS=child_env.get("OMP_NUM_THREADS", "1"),
            PYTHONPATH=os.pathsep.join(filter(None, [cwd or root, child_env.get("PYTHONPATH", "")])),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "partitioner.launch", target, json.dumps(kwargs or {})],
                env=child_env,
                cwd=cwd or root,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # its own process group: the deadline kills it and its children
            )
        )
    results: list[RankResult | None] = [None] * nprocs
    ended: dict[int, float] = {}
    # Drain pipes in threads so a chatty rank cannot block on a full pipe.
    captured: list[list[str]] = [["", ""] for _ in range(nprocs)]

    def drain(i: int) -> None:
        o, e = procs[i].communicate()
        captured[i] = [o, e]
        ended[i] = time.monotonic() - start

    threads = [threading.Thread(target=drain, args=(i,), daemon=True) for i in range(nprocs)]
    for t in threads:
        t.start()
    deadline = start + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    timed_out = set()
    for i, p in enumerate(procs):
        if p.poll() is None:
            timed_out.add(i)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for t in threads:
        t.join(10.0)
    for i, p in enumerate(procs):
        rc = p.returncode if p.returncode is not None else -9
        results[i] = RankResult(i, rc, captured[i][0], captured[i][1], ended.get(i, timeout), i in timed_out)
    del store
    return [r for r in results if r is not None]


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry of one rank: ``python -m partitioner.launch module:function '<json kwargs>'``. Ends the process: exit
    code 0 when the function returned, 1 when it raised (its traceback on stderr)."""
    import torch.distributed as dist

    from partitioner.runtime.device import init_process_group

    argv = sys.argv[1:] if argv is None else argv
    target, kwargs = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    timeout = float(os.environ.get("PARTITIONER_PG_TIMEOUT", "60"))
    backend = os.environ.get("PARTITIONER_BACKEND", "gloo")
    try:
        init_process_group(timeout, backend=backend, device=None if backend == "nccl" else "cpu")
        fn(**kwargs)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # skip atexit/destructors that may block on a broken group
    try:
        dist.destroy_process_group()
    except Exception:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    # The rank's work is done and written. torch 2.13 sometimes aborts in interpreter teardown after functional
    # collectives ran ("terminate called without an active exception", about 1 run in 10 with autograd through them):
    # a finished rank must not turn into a failed one there, so it ends without the teardown.
    os._exit(0)


if __name__ == "__main__":
    main()
