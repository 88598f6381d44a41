"""Diagnostics of a study: alignment of the SFT update with the RL update, and training curves across seeds.

**Update alignment** (the paper's diagnostic of whether RL continues or undoes what SFT did): with
θ_0 the student's initialisation, θ_SFT the SFT checkpoint and θ_RL the checkpoint after GRPO,

    a = θ_SFT − θ_0,   b = θ_RL − θ_SFT,   cos(a, b) = Σ a·b / (√Σ a² · √Σ b²)

summed over every parameter element (``overall``) and over the elements of each parameter kind
(``per_kind``). Sums are accumulated in float64, one tensor at a time, so memory stays near three
copies of the largest tensor. A kind whose update is zero on either side has no direction: NaN.

**Curves**: per-step metrics of the runs of one arm (``rl_history`` / ``sft_history`` entries), reduced
over seeds at each step to the mean and the min/max band (with two or three seeds a t-band would
be wider than the data and say little more; the band shows every seed).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

KINDS = ("embedding", "attention", "mlp", "norm", "lm_head")

# HF tensor names of llama / qwen2 / qwen3 causal LMs → parameter kind. First match wins.
_KIND_PATTERNS = (
    (re.compile(r"(^|\.)embed_tokens\.weight$"), "embedding"),
    (re.compile(r"^lm_head\.weight$"), "lm_head"),
    (re.compile(r"(^|\.)(input_layernorm|post_attention_layernorm|norm|q_norm|k_norm)\.weight$"), "norm"),
    (re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)$"), "attention"),
    (re.compile(r"\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)$"), "mlp"),
)


def param_kind(name: str) -> str:
    """Kind of an HF llama/qwen2/qwen3 tensor name: one of :data:`KINDS` (q/k norms are ``norm``).

    Raises ``ValueError`` for a name of another architecture, so that no tensor is silently counted
    under a wrong kind.
    """
    for pattern, kind in _KIND_PATTERNS:
        if pattern.search(name):
            return kind
    raise ValueError(f"update_alignment: cannot tell the kind of tensor {name!r} "
                     f"(known: llama/qwen2/qwen3 names; kinds {KINDS})")


def _tied(hf_dir: Path) -> bool:
    config = hf_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json")
    return bool(json.loads(config.read_text()).get("tie_word_embeddings", False))


def update_alignment(
    init_hf_dir: str | os.PathLike, sft_hf_dir: str | os.PathLike, rl_hf_dir: str | os.PathLike
) -> dict:
    """cos(θ_SFT − θ_0, θ_RL − θ_SFT) from three HF safetensors directories (module docstring).

    Tensors are streamed one at a time (``safe_open`` through ``SafetensorsReader``). A tied
    ``lm_head.weight`` is the embedding: it is skipped when ``config.json`` of the SFT directory says
    ``tie_word_embeddings`` (it is not counted twice).

    Returns ``{"overall": float, "per_kind": {kind: float}}`` (kinds present in the model only, plus
    ``"norms"``: ``{"sft": ‖a‖, "rl": ‖b‖}`` overall, to read the cosine with the update sizes).
    """
    from pear_mega.models.checkpoint import SafetensorsReader

    dirs = {"init": Path(init_hf_dir), "sft": Path(sft_hf_dir), "rl": Path(rl_hf_dir)}
    readers = {k: SafetensorsReader(d) for k, d in dirs.items()}
    names = set(readers["sft"].names())
    for k in ("init", "rl"):
        other = set(readers[k].names())
        if other != names:
            diff = sorted(names ^ other)
            raise ValueError(f"update_alignment: {dirs[k]} and {dirs['sft']} hold different tensors, e.g. {diff[:5]}")
    if _tied(dirs["sft"]):
        names.discard("lm_head.weight")
    # per kind: [Σ a·b, Σ a², Σ b²] in float64
    sums: dict[str, list[float]] = {}
    for name in sorted(names):
        kind = param_kind(name)
        init, sft, rl = (readers[k].get(name) for k in ("init", "sft", "rl"))
        if not (init.shape == sft.shape == rl.shape):
            raise ValueError(f"update_alignment: tensor {name!r} has shapes init {tuple(init.shape)}, "
                             f"sft {tuple(sft.shape)}, rl {tuple(rl.shape)}")
        acc = sums.setdefault(kind, [0.0, 0.0, 0.0])
        for i, v in enumerate(_update_sums(init, sft, rl)):
            acc[i] += v
        del init, sft, rl
    total = [sum(v[i] for v in sums.values()) for i in range(3)]
    return {
        "overall": _cosine(*total),
        "per_kind": {kind: _cosine(*sums[kind]) for kind in KINDS if kind in sums},
        "norms": {"sft": math.sqrt(total[1]), "rl": math.sqrt(total[2])},
    }


def _update_sums(init, sft, rl, chunk: int = 1 << 22) -> tuple[float, float, float]:
    """``(Σ a·b, Σ a², Σ b²)`` with ``a = sft − init``, ``b = rl − sft`` over one tensor, in float64 chunks
    of ``chunk`` elements (a 150k × 1536 embedding would need ~9 GB of float64 temporaries at once)."""
    import torch

    flat = [t.reshape(-1) for t in (init, sft, rl)]
    ab = aa = bb = 0.0
    for start in range(0, flat[0].numel(), chunk):
        i0, s0, r0 = (t[start:start + chunk].to(torch.float64) for t in flat)
        a, b = s0 - i0, r0 - s0
        ab += float(torch.dot(a, b))
        aa += float(torch.dot(a, a))
        bb += float(torch.dot(b, b))
    return ab, aa, bb


def _cosine(ab: float, aa: float, bb: float) -> float:
    """``ab / (√aa √bb)``; NaN when either vector is zero (no direction)."""
    if aa <= 0.0 or bb <= 0.0:
        return math.nan
    return ab / (math.sqrt(aa) * math.sqrt(bb))


# ----------------------------------------------------------------------------- curves across seeds
def curve_band(histories: Sequence[Sequence[Mapping]], key: str) -> dict:
    """Mean and min/max band over runs, per step, of metric ``key``.

    Args:
        histories: one per-step list of dicts (with ``"step"``) per run (seed).
    Returns ``{"step": [...], "mean": [...], "lo": [...], "hi": [...], "n": [...]}`` over the steps
    at which at least one run logged a finite ``key`` (``n`` = how many runs did), sorted by step.
    """
    by_step: dict[float, list[float]] = {}
    for history in histories:
        for row in history or ():
            v = row.get(key)
            if v is None or "step" not in row:
                continue
            v = float(v)
            if math.isfinite(v):
                by_step.setdefault(row["step"], []).append(v)
    steps = sorted(by_step)
    return {
        "step": steps,
        "mean": [sum(by_step[s]) / len(by_step[s]) for s in steps],
        "lo": [min(by_step[s]) for s in steps],
        "hi": [max(by_step[s]) for s in steps],
        "n": [len(by_step[s]) for s in steps],
    }


def history_mean(history: Sequence[Mapping], key: str) -> float:
    """Mean over the steps of one run's history of a finite metric ``key`` (NaN when never logged)."""
    vals = [float(r[key]) for r in history or () if r.get(key) is not None and math.isfinite(float(r[key]))]
    return sum(vals) / len(vals) if vals else math.nan


def history_last(history: Sequence[Mapping], key: str) -> float:
    """The value of ``key`` at the last step that logged it finite (NaN when never logged)."""
    rows = [r for r in history or () if r.get(key) is not None and math.isfinite(float(r[key]))]
    if not rows:
        return math.nan
    return float(max(rows, key=lambda r: r.get("step", 0))[key])


# ----------------------------------------------------------------------------- per-arm summary
SFT_WEIGHT_KEYS = ("pear/weight_mean", "pear/ess", "pear/clip_low_frac", "pear/clip_high_frac")
"""PEAR weight statistics logged per SFT step (``pear_mega.sft.trainer``; ``pear/ess`` is already the
fraction (Σ G)² / (n Σ G²) over the step's n loss tokens, 1 = uniform weights)."""
SFT_KD_KEYS = ("kd/kl", "kd/teacher_mass", "kd/student_mass", "kd/topk_overlap")
"""Distillation statistics logged per SFT step by the kd arms (``pear_mega.sft.losses.PearKDLoss``):
KL_t of ``loss.kd.mode`` per loss token, πβ's stored top-K mass P = Σ_i p_i, πθ's mass Q on the same
ids, and the share of πβ's top-K ids among πθ's top-K (NaN, so left out, for the NLL arms)."""
RL_LAST_KEYS = ("rollout/reward_mean", "drift/kl_to_init_k3", "update/cum_sparsity", "drift/param_rel_l2_to_init")
"""RL metrics reported at their last logged step (``pear_mega.rl.trainer`` / ``pear_mega.rl.metrics``)."""


def summarize_diagnostics(results: Mapping, level: float = 0.95) -> dict:
    """Per arm, a seed interval (``stats.seed_interval``) of: each SFT weight statistic averaged over
    the SFT steps, each RL metric at its last step, and the update alignment overall and per kind.

    Returns ``{arm: {"sft": {key: iv}, "rl": {key: iv}, "alignment": {"overall": iv, "per_kind":
    {kind: iv}}}}`` (``sft`` keys: ``SFT_WEIGHT_KEYS`` and ``SFT_KD_KEYS``) where ``iv = {"mean", "lo", "hi", "n"}``; NaN values (a metric never logged, a
    run without alignment) are left out of the seeds.
    """
    from pear_mega.study.stats import seed_interval

    def iv(values):
        return seed_interval([v for v in values if v is not None and math.isfinite(v)], level)

    out = {}
    for arm in results["arms"]:
        runs = sorted((r for r in results["runs"] if r["arm"] == arm), key=lambda r: r["seed"])
        aligns = [r["alignment"] for r in runs if r.get("alignment")]
        kinds = [k for k in KINDS if any(k in (a.get("per_kind") or {}) for a in aligns)]
        out[arm] = {
            "sft": {k: iv([history_mean(r.get("sft_history") or [], k) for r in runs])
                    for k in (*SFT_WEIGHT_KEYS, *SFT_KD_KEYS)},
            "rl": {k: iv([history_last(r.get("rl_history") or [], k) for r in runs]) for k in RL_LAST_KEYS},
            "alignment": {
                "overall": iv([a.get("overall") for a in aligns]),
                "per_kind": {k: iv([(a.get("per_kind") or {}).get(k) for a in aligns]) for k in kinds},
            },
        }
    return out
