"""From prompts to training packs: prompt sources, rollout + reward, packing, advantages.

Pieces of one RL step that do not touch the model:

- ``PromptSource``: the task's prompts in a seeded per-epoch order behind a cursor (the data
  position saved in checkpoints), their verifiable rewards and the refit probe sequences.
- ``collect_rollouts``: sample ``n`` responses per prompt with the rollout engine, score them,
  apply over-long shaping and (GRPO) dynamic sampling. Runs on global rank 0; the result is a
  list of picklable ``RolloutSequence`` that is broadcast to every rank.
- Packing in the packed, shifted layout of ``docs/architecture.md``: a sequence is
  ``prompt_ids + response_ids`` (length ``p + r``); its loss positions are ``p-1 … p+r-2``
  (``labels[t] = tokens[t+1]``, the response tokens), so response-aligned vectors of length ``r``
  (rollout log-probs, advantages, ...) sit at ``start = offset + p - 1`` of the pack.
- Sharding: sequence ``i`` of a step lives on data-parallel rank ``i % dp`` for the whole step
  (recompute and every optimizer step), so per-sequence state stays local. Every rank knows every
  sequence, so all ranks agree on the pack count of each optimizer step without communicating:
  shorter ranks get empty packs (all labels −100, no loss tokens).

Synthetic task ("low_ids"). A randomly initialised model cannot earn any reward on real tasks; to
test that the loop learns, the synthetic reward is dense and per-token:
``r = (1/|y|) Σ_t [y_t < V/2]`` over response tokens ``y`` (V = tokenizer vocabulary). A random
policy scores ≈ 0.5 with per-sample spread ≈ 0.5/√|y|, so every group carries signal, and the
policy can only raise it by moving probability mass to the lower half of the vocabulary.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pear_mega.pear import IGNORE_INDEX
from pear_mega.platform import use_gpu
from pear_mega.rl.config import RLConfig, TaskConfig
from pear_mega.tasks import load_prompt_file, task_source  # noqa: F401 (load_prompt_file: re-exported)


@dataclass
class RolloutSequence:
    """One sampled response with its reward; everything the trainer ranks need (picklable)."""

    group: int
    """Index of its prompt within the step (the GRPO group); groups are contiguous."""
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    """log π_rollout(response_ids[k] | ...) under the sampling distribution."""
    reward: float
    """The reward the advantages use (verifier reward + over-long shaping)."""
    raw_reward: float
    """The verifier's reward."""
    loss_weight: float = 1.0
    """0 drops the sequence from the loss (over-long filtering)."""
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


# ---------------------------------------------------------------------------------------- prompts


class PromptSource:
    """The task's prompts (``pear_mega.tasks``, by ``task.source``) in a seeded per-epoch order,
    consumed through a cursor.

    A row is ``{"prompt": chat messages | token ids, "target": reward sample, "answer": str}``;
    ``target`` follows ``pear_mega.rewards.compute_rewards`` (or ``{"source": "synthetic"}``).
    Epoch ``e`` visits the rows in ``permutation(seed, e)``; ``cursor`` counts prompts consumed.
    """

    def __init__(self, task: TaskConfig, tokenizer, vocab_size: int):
        self.task = task
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.rows = self._load_rows(task)
        self.cursor = 0
        self._scorer_state: dict = {}  # the task source's scorer, built on first use

    def _load_rows(self, task: TaskConfig) -> list[dict]:
        return task_source(task.source).prompts(task, self.vocab_size)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, k: int) -> list[dict]:
        """The next ``k`` rows (crossing epochs as needed); advances the cursor."""
        out = []
        for _ in range(k):
            epoch, pos = divmod(self.cursor, len(self.rows))
            order = np.random.default_rng([self.task.seed, epoch]).permutation(len(self.rows))
            out.append(self.rows[int(order[pos])])
            self.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "num_prompts": len(self.rows), "seed": self.task.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_prompts") != len(self.rows) or state.get("seed") != self.task.seed:
            raise ValueError(
                f"checkpoint prompt state {state} does not match this task (num_prompts={len(self.rows)}, "
                f"seed={self.task.seed}): resume with the task settings the run started with"
            )
        self.cursor = int(state["cursor"])

    def probes(self, k: int, encode) -> tuple[list[list[int]], list[list[int]]]:
        """Fixed probe sequences for refit verification: the first ``k`` rows (file order) with
        ``Answer: <gold>`` + end of turn as the response (synthetic: fixed pseudo-random tokens)."""
        from pear_mega.collect import end_of_turn_id

        eot = end_of_turn_id(self.tokenizer)
        source = task_source(self.task.source)
        prompts, responses = [], []
        rng = random.Random(self.task.seed + 1)
        for row in self.rows[:k]:
            prompts.append(encode(row["prompt"]))
            responses.append(source.probe_response(row, self.tokenizer, eot, rng, self.vocab_size))
        return prompts, responses

    def score(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]], rows: Sequence[dict]
              ) -> tuple[torch.Tensor, dict[str, float]]:
        """Verifier rewards ``[N]`` and their metrics for responses to ``rows`` (one row per response)."""
        return task_source(self.task.source).score(texts, token_ids, rows, self.vocab_size, self._scorer_state)


# ---------------------------------------------------------------------------------------- rollout


def sampling_seed(engine_seed: int, step: int, round_: int) -> int:
    """The torch seed of generation round ``round_`` of RL step ``step``."""
    return (engine_seed * 1_000_003 + step * 1_009 + round_) % (2**63)


def collect_rollouts(engine, source: PromptSource, cfg: RLConfig, step: int
                     ) -> tuple[list[RolloutSequence], dict[str, float], str]:
    """Generate → reward → over-long shaping → (GRPO) dynamic sampling, on the engine ranks.

    ``engine``: anything with ``RolloutEngine.generate``'s signature — a ``RolloutEngine``, or the
    ``EngineGroup`` that spreads the prompts over several engines (then every engine rank runs this
    with the same arguments and gets the same result).

    Sampling of round ``k`` of step ``s`` is seeded with ``(rollout.engine.seed, s, k)`` (vLLM's sampler
    draws from torch's default generator in this process), so the batch depends only on the
    weights and the prompt cursor: a resumed run draws what the uninterrupted run drew.

    Returns:
        (sequences, metrics, one decoded example response).
    """
    from pear_mega.rl.algorithms import dynamic_sampling_mask, overlong_shaping

    ro, policy = cfg.rollout, cfg.policy
    dynamic = getattr(policy, "dynamic_sampling", False)  # group-relative settings (GRPOConfig) only
    rounds = cfg.algorithm.dynamic_sampling_max_rounds if dynamic else 1
    kept: list[RolloutSequence] = []
    sums = {"raw": [], "len": [], "trunc": [], "extract_fail": [], "dropped": 0.0, "kept": 0.0, "penalty": []}
    example = ""
    groups = 0
    reward_seconds = 0.0
    for rnd in range(rounds):
        rows = source.take(ro.prompts_per_step)
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if use_gpu() else []):
            torch.manual_seed(sampling_seed(ro.engine.seed, step, rnd))
            samples = engine.generate([r["prompt"] for r in rows], n=ro.n, temperature=ro.temperature,
                                      top_p=ro.top_p, max_tokens=ro.max_tokens, stop=ro.stop or None)
        start = time.perf_counter()
        raw, metrics = source.score([s.text for s in samples], [s.token_ids for s in samples],
                                    [rows[s.prompt_index] for s in samples])
        reward_seconds += time.perf_counter() - start
        if not example and samples:
            example = samples[0].text
        lengths = torch.tensor([len(s.token_ids) for s in samples], dtype=torch.float32)
        truncated = torch.tensor([s.truncated for s in samples])
        shaped, weights, _ = overlong_shaping(raw, lengths, truncated, policy.overlong_mode, ro.max_tokens,
                                              policy.overlong_buffer, policy.overlong_penalty)
        sums["raw"].append(raw)
        sums["len"].append(lengths)
        sums["trunc"].append(truncated.float())
        sums["penalty"].append(shaped - raw)
        sums["extract_fail"].append(metrics.get("reward/extract_fail_frac", 0.0))
        keep = torch.ones(len(samples), dtype=torch.bool)
        if dynamic:
            keep, m = dynamic_sampling_mask(shaped, ro.n)
            sums["dropped"] += float(m["rollout/dynamic_sampling_dropped_groups"])
            sums["kept"] += float(m["rollout/dynamic_sampling_kept_groups"])
        for g in range(len(rows)):
            if groups >= ro.prompts_per_step:
                break
            idx = range(g * ro.n, (g + 1) * ro.n)
            if not bool(keep[idx[0]]):
                continue
            for i in idx:
                s = samples[i]
                kept.append(RolloutSequence(groups, list(s.prompt_token_ids), list(s.token_ids), list(s.logprobs),
                                            float(shaped[i]), float(raw[i]), float(weights[i]), s.truncated))
            groups += 1
        if groups >= ro.prompts_per_step:
            break
    raw, lengths = torch.cat(sums["raw"]), torch.cat(sums["len"])
    metrics = {
        "rollout/reward_mean": float(raw.mean()),
        "rollout/reward_std": float(raw.std()) if raw.numel() > 1 else 0.0,
        "rollout/shaped_reward_mean": float(np.mean([s.reward for s in kept])) if kept else 0.0,
        "rollout/response_len_mean": float(lengths.mean()),
        "rollout/response_len_max": float(lengths.max()),
        "rollout/truncated_frac": float(torch.cat(sums["trunc"]).mean()),
        "rollout/overlong_penalty_mean": float(torch.cat(sums["penalty"]).mean()),
        "rollout/extract_fail_frac": float(np.mean(sums["extract_fail"])),
        "rollout/groups": float(groups),
        "rollout/generation_rounds": float(rnd + 1),
        "rollout/sequences": float(len(kept)),
        "timing/reward": reward_seconds,
    }
    if dynamic:
        metrics["rollout/dynamic_sampling_dropped_groups"] = sums["dropped"]
        metrics["rollout/dynamic_sampling_kept_groups"] = sums["kept"]
    return kept, metrics, example


# ---------------------------------------------------------------------------------------- packing


def shard_of(num_sequences: int, dp_rank: int, dp_size: int) -> list[int]:
    """Sequence indices that live on data-parallel rank ``dp_rank`` for the whole step."""
    return list(range(dp_rank, num_sequences, dp_size))


def empty_pack(seq_length: int, pad_id: int) -> dict:
    """A pack of padding only: no loss tokens (keeps microbatch counts equal across DP ranks)."""
    return {"tokens": torch.full((seq_length,), pad_id, dtype=torch.long),
            "labels": torch.full((seq_length,), IGNORE_INDEX, dtype=torch.long),
            "cu_seqlens": torch.tensor([0, seq_length], dtype=torch.int32),
            "seq_ids": [], "starts": [], "lengths": [], "num_loss_tokens": 0, "num_tokens": 0}


def build_pack(seqs: Sequence[RolloutSequence], ids: Sequence[int], seq_length: int, pad_id: int) -> dict:
    """Concatenate sequences ``ids`` into one pack of exactly ``seq_length`` tokens.

    Returns ``tokens [S]``, ``labels [S]`` (response tokens only), ``cu_seqlens [B+1]`` (a pad
    tail is its own segment) and, per sequence, its id, ``start`` (first loss position) and
    response ``length``.
    """
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    labels = torch.full((seq_length,), IGNORE_INDEX, dtype=torch.long)
    bounds, starts, lengths = [0], [], []
    offset = 0
    for i in ids:
        s = seqs[i]
        p, r = len(s.prompt_ids), len(s.response_ids)
        if p < 1 or r < 1:
            raise ValueError(f"sequence {i}: needs a prompt and a response, got {p} and {r} tokens")
        if offset + p + r > seq_length:
            raise ValueError(f"sequences {list(ids)} ({offset + p + r} tokens so far) do not fit a pack of {seq_length}")
        tokens[offset:offset + p] = torch.tensor(s.prompt_ids)
        tokens[offset + p:offset + p + r] = torch.tensor(s.response_ids)
        labels[offset + p - 1:offset + p + r - 1] = torch.tensor(s.response_ids)
        starts.append(offset + p - 1)
        lengths.append(r)
        offset += p + r
        bounds.append(offset)
    if offset < seq_length:
        bounds.append(seq_length)
    return {"tokens": tokens, "labels": labels, "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
            "seq_ids": list(ids), "starts": starts, "lengths": lengths, "num_loss_tokens": sum(lengths),
            "num_tokens": offset}


def pack_sequences(seqs: Sequence[RolloutSequence], ids: Sequence[int], seq_length: int, pad_id: int) -> list[dict]:
    """First-fit ``ids`` (in order) into packs of ``seq_length`` tokens."""
    from pear_mega.data.packing import first_fit

    lengths = [len(seqs[i]) for i in ids]
    for i, n in zip(ids, lengths):
        if n > seq_length:
            raise ValueError(f"sequence {i}: prompt + response = {n} tokens > train.seq_length={seq_length}; "
                             "raise train.seq_length or lower rollout.max_tokens")
    return [build_pack(seqs, [ids[j] for j in b], seq_length, pad_id) for b in first_fit(lengths, seq_length)]


def plan_microbatches(seqs: Sequence[RolloutSequence], dp_rank: int, dp_size: int, seq_length: int, pad_id: int,
                      minibatches: int = 1, shuffle_seed: tuple[int, ...] | None = None, with_totals: bool = False):
    """This rank's packs for each of ``minibatches`` optimizer steps, padded with empty packs to
    the largest count over DP ranks (every rank computes every rank's packing: no communication).

    The rank's sequences are shuffled with ``shuffle_seed`` (None: kept in order) and split into
    ``minibatches`` near-equal parts. ``with_totals`` also returns, per minibatch, the global
    number of loss tokens (responses whose ``loss_weight`` is > 0, over all DP ranks).
    """
    per_rank = []
    totals = [0] * minibatches
    for r in range(dp_size):
        ids = shard_of(len(seqs), r, dp_size)
        if shuffle_seed is not None:
            ids = [ids[j] for j in np.random.default_rng(list(shuffle_seed) + [r]).permutation(len(ids))]
        parts = [list(map(int, part)) for part in np.array_split(np.array(ids, dtype=np.int64), minibatches)]
        for m, part in enumerate(parts):
            totals[m] += sum(len(seqs[i].response_ids) for i in part if seqs[i].loss_weight > 0)
        per_rank.append([pack_sequences(seqs, part, seq_length, pad_id) for part in parts])
    mine = per_rank[dp_rank]
    for m in range(minibatches):
        most = max(1, *(len(packs[m]) for packs in per_rank))
        mine[m] = mine[m] + [empty_pack(seq_length, pad_id) for _ in range(most - len(mine[m]))]
    return (mine, totals) if with_totals else mine


def trim_packs(packs: Sequence[dict], multiple: int = 64) -> tuple[list[dict], int]:
    """Cut the packs of one schedule call to their longest real content, rounded up to ``multiple``.

    megatron's schedule runs every microbatch of a call at one ``seq_length``; packs are built at
    ``train.seq_length`` but often hold less, and padding costs as much as real tokens. Every
    ``[S]`` tensor is sliced to ``[L]`` and the pad segment of ``cu_seqlens`` ends at ``L``.

    Returns:
        (the trimmed packs, L).
    """
    full = packs[0]["tokens"].numel()
    used = max(max(int(p["num_tokens"]) for p in packs), 1)
    length = min(full, -(-used // multiple) * multiple)
    if length == full:
        return list(packs), full
    out = []
    for pack in packs:
        new = {k: (v[:length] if isinstance(v, torch.Tensor) and k != "cu_seqlens" and v.shape == (full,) else v)
               for k, v in pack.items()}
        bounds = [b for b in pack["cu_seqlens"].tolist() if b <= pack["num_tokens"]]
        if bounds[-1] < length:
            bounds.append(length)
        new["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
        out.append(new)
    return out, length


def scatter_to_pack(pack: dict, values: dict[int, torch.Tensor], default: float = 0.0) -> torch.Tensor:
    """Response-aligned per-sequence vectors ``{seq_id: [r]}`` → one per-token ``[S]`` tensor."""
    out = torch.full((pack["tokens"].numel(),), default, dtype=torch.float32)
    for i, start, r in zip(pack["seq_ids"], pack["starts"], pack["lengths"]):
        out[start:start + r] = values[i].float().cpu()
    return out


def gather_from_pack(pack: dict, per_token: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per-token ``[S]`` → ``{seq_id: [r]}`` (CPU, fp32), the inverse of ``scatter_to_pack``."""
    flat = per_token.detach().float().cpu()
    return {i: flat[start:start + r].clone() for i, start, r in zip(pack["seq_ids"], pack["starts"], pack["lengths"])}


@dataclass
class Experience:
    """Per-sequence, response-aligned tensors of one step on this rank (last pipeline stage).

    ``logp_old``: trainer log-probs before the step's updates; ``logp_ref``: reference policy;
    ``values``: critic values (PPO); ``advantages`` / ``returns``: per token.
    """

    ids: list[int]
    logp_old: dict[int, torch.Tensor] = field(default_factory=dict)
    entropy: dict[int, torch.Tensor] = field(default_factory=dict)
    logp_ref: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    advantages: dict[int, torch.Tensor] = field(default_factory=dict)
    returns: dict[int, torch.Tensor] = field(default_factory=dict)
