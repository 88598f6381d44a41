"""Rank launcher for the model tests (torchrun-like, with timeouts).

Multi-rank scenarios (``tests/models/scenarios.py``) run in fresh subprocesses, one per rank,
wired like torchrun (RANK, WORLD_SIZE, MASTER_ADDR/PORT) with one torch thread each. A scenario
that crashes or outlives its timeout gets every rank's process group killed, so a dead rank never
leaves the others blocked in gloo.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_worker.py")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the rank and any writer process it started
        except ProcessLookupError:
            pass
    proc.wait()


def run_ranks(scenario: str, world_size: int, args: dict, *, timeout: float) -> list[dict]:
    """Run ``scenarios.<scenario>(args)`` on ``world_size`` ranks; return each rank's result dict.

    Raises AssertionError with the failing ranks' log tails on a crash or timeout.
    """
    out_dir = Path(tempfile.mkdtemp(prefix=f"pear-{scenario}-"))
    port = _free_port()
    procs, logs = [], []
    for rank in range(world_size):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        )
        log = open(out_dir / f"rank{rank}.log", "w")  # noqa: SIM115 (closed after the ranks exit)
        logs.append(log)
        command = [sys.executable, str(WORKER), scenario, json.dumps(args), str(out_dir)]
        procs.append(
            subprocess.Popen(
                command, env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    deadline = time.monotonic() + timeout
    problem = None
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                problem = "a rank failed"
                time.sleep(2.0)  # let the others print their side of it
                break
            if time.monotonic() > deadline:
                problem = f"timed out after {timeout:.0f} s"
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            _kill(p)
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if problem or any(codes):
        tails = []
        for rank in range(world_size):
            text = (out_dir / f"rank{rank}.log").read_text(errors="replace")
            tails.append(f"--- rank {rank} (exit {codes[rank]}) ---\n{text[-4000:]}")
        raise AssertionError(
            f"scenario {scenario} on {world_size} ranks: {problem or 'non-zero exit'} (logs in {out_dir})\n"
            + "\n".join(tails)
        )
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]
    shutil.rmtree(out_dir, ignore_errors=True)
    return results


def rows(results: list[dict], key: str = "rows") -> list[dict]:
    """All ranks' result rows of one kind, concatenated."""
    return [row for result in results for row in result.get(key, [])]
