"""Run logging: TensorBoard scalars and histograms, a console line, and a progress bar with ETA.

Only global rank 0 writes; callers make sure the numbers they pass are already reduced over the
ranks that hold them (e.g. the last pipeline stage's loss broadcast to rank 0).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


class MetricsWriter:
    def __init__(self, rank: int, total_steps: int, tensorboard_dir: str = "", progress_bar: bool = True,
                 initial_step: int = 0, desc: str = "train"):
        self.rank = rank
        self.writer = None
        self.bar = None
        self.history: list[dict] = []
        if rank != 0:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            Path(tensorboard_dir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(tensorboard_dir)
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True, file=sys.stderr)
        self.total_steps = total_steps
        self._start = time.perf_counter()

    def log(self, step: int, scalars: dict[str, float], console_keys: tuple[str, ...] = ()) -> None:
        if self.rank != 0:
            return
        record = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        self.history.append(record)
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, float(value), step)
        shown = {k.split("/")[-1]: f"{float(scalars[k]):.4g}" for k in console_keys if k in scalars}
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        else:  # no terminal (logs, CI): one line per logged step, with the ETA the bar would show
            elapsed = time.perf_counter() - self._start
            done = len(self.history)
            eta = elapsed / done * max(self.total_steps - step, 0) if done else 0.0
            print(f"step {step}/{self.total_steps} " + " ".join(f"{k}={v}" for k, v in shown.items())
                  + f" eta={eta:.0f}s", flush=True)

    def histogram(self, step: int, name: str, values: torch.Tensor) -> None:
        if self.rank == 0 and self.writer is not None and values.numel() > 0:
            self.writer.add_histogram(name, values.detach().float().cpu(), step)

    def dump(self, path: str | Path) -> None:
        """Write the scalar history as JSON lines (used by the quickstart's summary table)."""
        if self.rank != 0:
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for record in self.history:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
