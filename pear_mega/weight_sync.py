"""Weight sync from the trainer to the colocated rollout engines, in one place.

    sync = WeightSync(rollout, arch, ctx, refit, dtype)   # the transport is chosen here
    sync.push(model) -> metrics      # gather the policy into full HF tensors and load them into every engine
    sync.verify(prompts, responses, trainer_logprobs) -> metrics   # engine vs trainer log-probs on probes
    sync.close()

Beneath ``push``: ``pear_mega.models.iter_hf_tensors`` gathers the TP/PP shards into full HF
tensors, either broadcast over one process group per pipeline stage to the engine ranks
(``refit.transport=collective``; GPU, several hosts) or written in place by each shard owner into
full tensors in host shared memory that the engine ranks read (``pear_mega.models.staging``,
``refit.transport=shared_memory``; ``auto`` picks it on CPU when more than one rank takes part).

The drain protocol: the gather is a generator of collectives, and every rank must run it to the
end whatever it does with the tensors — the engine ranks hand it to ``update_weights`` and drain
what is left if loading fails, the other ranks only drain it (``drain``). ``push`` does both, so
no caller iterates a gather by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from pear_mega.platform import use_gpu


def drain(tensors: Iterable) -> None:
    """Run a gather generator to its end (its collectives need every rank)."""
    for _ in tensors:
        pass


class WeightSync:
    """Push and verify the policy's weights into the engines of an ``EngineGroup``."""

    def __init__(self, rollout, arch, ctx, refit, dtype, *, timeout_s: float, log: Callable[[str], None] = print):
        self.rollout, self.arch, self.ctx, self.refit = rollout, arch, ctx, refit
        self.staging = self._staging(dtype, timeout_s, log)

    def _staging(self, dtype, timeout_s: float, log):
        """Host shared-memory staging for ``refit.transport``, or None (the collective path)."""
        from pear_mega.models.staging import HostStaging

        transport = self.refit.transport
        if transport == "collective":
            return None
        readers = list(range(self.rollout.placement.num_hosts))
        if transport == "auto" and len(HostStaging.participants(self.ctx, readers)) == 1:
            return None  # one rank writes and reads: the collective path moves nothing (views of the parameters)
        reason = HostStaging.unavailable(self.arch, dtype, self.ctx, readers)
        if reason is not None:
            if transport == "shared_memory":
                raise ValueError(f"refit.transport=shared_memory cannot be used: {reason}")
            if not use_gpu():
                log(f"weight sync: gathered over the process groups ({reason})")
            return None
        staging = HostStaging.create(self.arch, dtype, self.ctx, readers, timeout_s=timeout_s)
        log(f"weight sync: through host shared memory ({staging.nbytes / 2**20:.0f} MiB in /dev/shm)")
        return staging

    def push(self, model) -> dict[str, float]:
        """Gather ``model`` (the policy, any wrapper) into full HF tensors on every engine rank and
        load them into the engines in place (each worker keeps its shard). Every rank calls it;
        the metrics come back on the engine ranks."""
        from pear_mega.models import iter_hf_tensors

        start = time.perf_counter()
        tensors = iter_hf_tensors(model, self.arch, self.ctx, broadcast_groups=self.rollout.broadcast_groups,
                                  staging=self.staging)

        def work():
            try:
                stats = self.rollout.engine.update_weights(tensors, bucket_bytes=self.refit.bucket_mb << 20)
            finally:
                drain(tensors)  # the other ranks are still sending: finish the gather
            seconds = time.perf_counter() - start
            return {"timing/weight_sync": seconds, "weight_sync/bytes": float(stats.bytes),
                    "weight_sync/bytes_per_s": stats.bytes / max(seconds, 1e-9),
                    "weight_sync/buckets": float(stats.num_buckets)}

        if not self.rollout.hosts_engine:
            drain(tensors)
        return self.rollout.on_hosts(work)

    def verify(self, prompts, responses, trainer_logprobs, started: float | None = None) -> dict[str, float]:
        """Engine vs trainer log-probs (T = 1) of ``responses`` to ``prompts``; beyond
        ``refit.tol`` (mean or p99) or ``refit.max_tol`` (max; 0 = 10 x tol) the engine ranks raise
        ``RefitVerificationError``. Every engine is checked; the logged difference is the largest
        over engines. ``started``: the ``perf_counter`` time ``timing/refit_verify`` counts from
        (e.g. before the trainer's probe forward)."""
        start = time.perf_counter() if started is None else started

        def work():
            stats = self.rollout.engine.verify_refit(prompts, responses, trainer_logprobs, tol=self.refit.tol,
                                                     max_tol=self.refit.max_tol or None)
            return {**{f"refit/{k}_abs_logp_diff": self.rollout.max_over_engines(v) for k, v in stats.items()},
                    "timing/refit_verify": time.perf_counter() - start}

        return self.rollout.on_hosts(work)

    def close(self) -> None:
        if self.staging is not None:
            self.staging.close()
