"""Per-GPU memory planner for an SFT or RL recipe and parallel layout.

    python -m pear_mega.plan --recipe llama3_70b_pear_sft --gpus 32
    python -m pear_mega.plan --recipe qwen3_8b_pear_sft --gpus 8 --gpu-mem-gib 80
    python -m pear_mega.plan --recipe llama3_70b_grpo --gpus 32          # RL: the phases below

It is how a large layout is checked where no cluster exists. The model shape comes from the
recipe's ``config.json`` when that path exists, else from a built-in table of public configs.
Accounting for the *worst* pipeline stage (the first: it holds the embedding and the most
in-flight microbatches under 1F1B; the last stage's output layer is counted where it is larger):

- weights: ``P_stage · bytes(dtype)``, P_stage = this stage's parameters / TP;
- gradients: ``P_stage · 4`` (megatron DDP reduces grads in fp32);
- optimizer: Adam main params + two moments in fp32 = ``P_stage · 12`` for bf16 params (the fp32
  params double as main params: ``P_stage · 8``), divided by DP with the distributed optimizer;
- activations per layer and microbatch (bf16, no sequence parallel, flash attention, SwiGLU;
  S tokens, hidden h, ffn f, kv width k = n_kv·d): inputs of the two norms and the QKV / fc1
  inputs are replicated over TP, ``4·S·h`` elements; QKV outputs, attention output and the
  out-proj input are sharded, ``S·(h + 2k + 2h)/TP``; fc1 output, SwiGLU input and fc2 input,
  ``S·(2f + 2f + f)/TP``; all ×2 bytes. With full recompute only the layer input ``S·h·2`` bytes
  per layer is kept plus one layer's full activations. Under 1F1B the first stage holds
  ``min(PP, microbatches)`` microbatches in flight;
- loss: the logits shard ``S·V/TP·2`` bytes plus its gradient (the fused PEAR loss writes the
  gradient in place, so ×1 with ``--inplace-loss``, ×2 otherwise) and fp32 per-token stats;
- overhead: CUDA context, NCCL and allocator slack, a fixed ``--overhead-gib``.

RL (``plan_rl``): the trainer and the colocated vLLM engine share each GPU. With P the worst
stage's parameters per GPU (above), N the model's parameters, R the engine's tensor-parallel size,
M the device's total memory and u = ``rollout.engine.gpu_memory_utilization``:

- trainer state: weights ``2P`` (bf16) + grads ``4P`` + optimizer (above) + reference model ``2P``
  (when the KL term or the KL-to-init metric needs it) + update-sparsity copies ``8P`` (two fp32
  copies, when on) + overhead. ``rollout.offload_optimizer`` moves the optimizer (fp32 main params
  and Adam moments) to host memory from the end of each update to the start of the next, so it
  is absent while the engine is awake;
- engine: weights ``2N/R``; a reserve ``--engine-overhead-gib`` for vLLM's profiled activation
  peak, CUDA graphs and NCCL buffers; KV cache = ``u·M − 2N/R − reserve``, at least one sequence
  of ``max_model_len`` tokens of ``2·layers·max(1, kv_heads/R)·head_dim·2`` bytes each (vLLM
  refuses to start otherwise). vLLM takes ``u·M`` while awake and checks at start-up that ``u·M``
  is free;
- phases: start-up (trainer state as resumed — the Adam moments exist — plus ``u·M``), rollout
  (awake: trainer state without an offloaded optimizer, plus ``u·M``), refit (engine weights awake,
  KV cache not yet: plus two refit buckets of full tensors) and training (engine asleep: its
  reserve only; trainer state + activations + loss). Every phase must fit in M; u is then chosen
  (``gpu_memory_utilization = 0``) or checked against [u_min, u_max];
- host memory per GPU: the offloaded optimizer, and the engine weights under sleep level 1.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3

# Public HF config values of the models the large recipes name (so planning needs no download).
KNOWN_ARCHS = {
    "llama3_70b_pear_sft": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                tie_word_embeddings=False),
    "llama3_70b_grpo": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                            num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                            tie_word_embeddings=False),
    "qwen3_8b_pear_sft": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                              vocab_size=151936, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_hf(cls, cfg: dict) -> "Shape":
        heads = cfg["num_attention_heads"]
        return cls(
            hidden=cfg["hidden_size"], ffn=cfg["intermediate_size"], layers=cfg["num_hidden_layers"],
            heads=heads, kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
            tied=bool(cfg.get("tie_word_embeddings", False)),
        )

    def layer_params(self) -> int:
        """One transformer layer: QKV, out-proj, gate+up, down, two RMSNorm weights."""
        h, d = self.hidden, self.head_dim
        q, kv = self.heads * d, self.kv_heads * d
        return h * (q + 2 * kv) + q * h + 3 * h * self.ffn + 2 * h

    def total_params(self) -> int:
        emb = self.vocab * self.hidden
        return self.layers * self.layer_params() + emb * (1 if self.tied else 2) + self.hidden


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    seq_length: int
    microbatches: int
    bf16: bool = True
    distributed_optimizer: bool = True
    recompute: bool = False
    inplace_loss: bool = True


def plan_memory(shape: Shape, lay: Layout, overhead_gib: float = 4.0) -> dict[str, float]:
    """Bytes per GPU on the worst stage, by component (see module docstring for each formula)."""
    if shape.layers % lay.pp:
        raise ValueError(f"{shape.layers} layers do not split into PP={lay.pp} stages")
    if shape.heads % lay.tp or shape.kv_heads % lay.tp:
        raise ValueError(f"TP={lay.tp} must divide {shape.heads} query and {shape.kv_heads} KV heads")
    layers_per_stage = shape.layers // lay.pp
    vocab_padded = math.ceil(shape.vocab / lay.tp) * lay.tp
    emb_local = vocab_padded * shape.hidden // lay.tp
    stage_layers = layers_per_stage * shape.layer_params() // lay.tp
    first = stage_layers + emb_local + (emb_local if (lay.pp == 1 and not shape.tied) else 0)
    last = stage_layers + shape.hidden + (emb_local if (lay.pp > 1 or not shape.tied) else 0)
    params = max(first, last)
    wbytes = 2 if lay.bf16 else 4
    weights = params * wbytes
    grads = params * 4
    opt_per_param = 12 if lay.bf16 else 8
    optimizer = params * opt_per_param / (lay.dp if lay.distributed_optimizer else 1)

    s, h, f, t = lay.seq_length, shape.hidden, shape.ffn, lay.tp
    k = shape.kv_heads * shape.head_dim
    q = shape.heads * shape.head_dim
    layer_full = 2 * (4 * s * h + s * (q + 2 * k + 2 * q) / t + s * 5 * f / t)
    in_flight = min(lay.pp, lay.microbatches)
    if lay.recompute:
        per_mb = layers_per_stage * s * h * 2
        activations = per_mb * in_flight + layer_full
    else:
        activations = layers_per_stage * layer_full * in_flight
    logits = s * vocab_padded / t * 2
    loss = logits * (1 if lay.inplace_loss else 2) + s * 4 * 6
    overhead = overhead_gib * GIB
    total = weights + grads + optimizer + activations + loss + overhead
    return {"params_per_gpu": params, "weights": weights, "grads": grads, "optimizer": optimizer,
            "activations": activations, "loss": loss, "overhead": overhead, "total": total}


@dataclass(frozen=True)
class RolloutLayout:
    """The RL side of a plan: the colocated engine and what the trainer keeps next to it."""

    engine_tp: int = 1
    """R: the engine's tensor-parallel size (each GPU holds at most one engine worker)."""
    gpu_memory_utilization: float = 0.0
    """u; 0 = choose the largest u that fits."""
    max_model_len: int = 1024
    reference: bool = True
    """A frozen reference model is kept on the GPU."""
    update_sparsity: bool = False
    """Two fp32 parameter copies on the GPU for the update-sparsity metrics."""
    offload_optimizer: bool = False
    """The optimizer state lives in host memory while the engine is awake."""
    sleep_level: int = 1
    refit_bucket_bytes: int = 256 << 20
    engine_overhead_gib: float = 2.0


def plan_rl(shape: Shape, lay: Layout, ro: RolloutLayout, gpu_mem_bytes: float,
            overhead_gib: float = 4.0) -> dict[str, float]:
    """Bytes per GPU of a colocated RL run, by component and by phase (module docstring), plus
    ``u_min`` / ``u_max`` / ``utilization`` (the one used), ``kv_cache``, ``kv_sequences`` (full
    ``max_model_len`` sequences the KV cache holds), ``host`` bytes per GPU and ``fits`` (1.0 / 0.0)."""
    if shape.heads % ro.engine_tp:
        raise ValueError(f"rollout.engine.tensor_parallel_size={ro.engine_tp} must divide {shape.heads} attention heads")
    sft = plan_memory(shape, lay, overhead_gib)
    P = sft["params_per_gpu"]
    wbytes = 2 if lay.bf16 else 4
    reference = P * wbytes if ro.reference else 0.0
    sparsity = P * 8 if ro.update_sparsity else 0.0
    resident = sft["weights"] + sft["grads"] + reference + sparsity + sft["overhead"]
    optimizer = sft["optimizer"]
    awake_optimizer = 0.0 if ro.offload_optimizer else optimizer
    engine_weights = shape.total_params() * wbytes / ro.engine_tp
    reserve = ro.engine_overhead_gib * GIB
    kv_per_token = 2 * shape.layers * max(1.0, shape.kv_heads / ro.engine_tp) * shape.head_dim * wbytes
    min_kv = ro.max_model_len * kv_per_token
    M = gpu_mem_bytes
    u_min = (engine_weights + reserve + min_kv) / M
    # start-up sees the resumed state (moments present) unless the optimizer is offloaded first
    u_max = (M - resident - awake_optimizer) / M
    u = ro.gpu_memory_utilization or math.floor(u_max * 100) / 100
    budget = u * M
    phases = {
        "startup": resident + awake_optimizer + budget,
        "rollout": resident + awake_optimizer + budget,
        "refit": resident + awake_optimizer + engine_weights + reserve + 2 * ro.refit_bucket_bytes,
        "train": resident + optimizer + sft["activations"] + sft["loss"] + reserve,
    }
    kv = budget - engine_weights - reserve
    fits = all(v <= M for v in phases.values()) and u_min <= u <= u_max and kv >= min_kv
    host = (optimizer if ro.offload_optimizer else 0.0) + (engine_weights if ro.sleep_level == 1 else 0.0)
    return {"params_per_gpu": P, "weights": sft["weights"], "grads": sft["grads"], "optimizer": optimizer,
            "reference": reference, "update_sparsity": sparsity, "overhead": sft["overhead"],
            "activations": sft["activations"], "loss": sft["loss"], "engine_weights": engine_weights,
            "engine_reserve": reserve, "kv_cache": kv, "kv_per_token": kv_per_token,
            "kv_sequences": kv / min_kv, **{f"phase_{k}": v for k, v in phases.items()},
            "u_min": u_min, "u_max": u_max, "utilization": u, "host": host, "gpu_mem": M, "fits": float(fits)}


def format_rl_plan(plan: dict[str, float]) -> str:
    """The RL plan as a markdown table and a verdict that names the numbers."""
    lines = ["| component | GiB per GPU |", "|---|---|"]
    for key in ("weights", "grads", "optimizer", "reference", "update_sparsity", "overhead", "activations", "loss",
                "engine_weights", "engine_reserve", "kv_cache"):
        lines.append(f"| {key} | {plan[key] / GIB:.2f} |")
    lines += ["", "| phase | GiB per GPU |", "|---|---|"]
    for key in ("startup", "rollout", "refit", "train"):
        lines.append(f"| {key} | {plan[f'phase_{key}'] / GIB:.2f} |")
    M = plan["gpu_mem"] / GIB
    verdict = "FITS" if plan["fits"] else "DOES NOT FIT"
    lines.append(
        f"{verdict} in {M:.1f} GiB: gpu_memory_utilization {plan['utilization']:.2f} (must be within "
        f"[{plan['u_min']:.3f}, {plan['u_max']:.3f}]), KV cache {plan['kv_cache'] / GIB:.2f} GiB = "
        f"{plan['kv_sequences']:.1f} full-length sequences, host memory {plan['host'] / GIB:.1f} GiB per GPU")
    return "\n".join(lines)


def rl_layouts(cfg, world_size: int) -> tuple[Layout, RolloutLayout]:
    """The plan's layouts for an ``RLConfig`` on ``world_size`` GPUs."""
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    if world_size % (tp * pp):
        raise ValueError(f"{world_size} GPUs is not a multiple of TP x PP = {tp * pp}")
    dp = world_size // (tp * pp)
    ro, engine = cfg.rollout, cfg.rollout.engine
    seqs = ro.prompts_per_step * ro.n
    lay = Layout(tp=tp, pp=pp, dp=dp, seq_length=cfg.train.seq_length,
                 microbatches=max(1, seqs // (cfg.algorithm.minibatches * dp)), bf16=cfg.model.dtype == "bfloat16",
                 distributed_optimizer=cfg.optim.use_distributed_optimizer is not False,
                 recompute=cfg.model.recompute_activations, inplace_loss=False)
    rollout = RolloutLayout(
        engine_tp=engine.tensor_parallel_size, gpu_memory_utilization=engine.gpu_memory_utilization,
        max_model_len=engine.max_model_len, reference=cfg.needs_reference,
        update_sparsity=bool(cfg.logging.update_sparsity),  # None = on CPU only: off on the GPU being planned
        offload_optimizer=ro.offload_optimizer, sleep_level=engine.sleep_level,
        refit_bucket_bytes=cfg.refit.bucket_mb << 20)
    return lay, rollout


def check_rl_plan(cfg, shape: Shape, world_size: int, gpu_mem_bytes: float) -> dict[str, float]:
    """The RL plan of ``cfg`` (an ``RLConfig``) on this GPU; ValueError with the table when it does not
    fit. Called by the RL trainer on GPU before anything is allocated."""
    lay, ro = rl_layouts(cfg, world_size)
    plan = plan_rl(shape, lay, ro, gpu_mem_bytes)
    if not plan["fits"]:
        raise ValueError(f"{cfg.name}: the run does not fit the GPU memory (pear_mega.plan):\n{format_rl_plan(plan)}\n"
                         "Options: rollout.offload_optimizer=true, logging.kl_to_init=false (no reference model "
                         "when the KL coefficient is 0), logging.update_sparsity=false, a lower or automatic "
                         "rollout.engine.gpu_memory_utilization (0), more GPUs (data-parallel shards of the optimizer).")
    return plan


def _shape_for_recipe(name: str, hf_path: str) -> Shape:
    cfg_file = Path(hf_path) / "config.json"
    if cfg_file.is_file():
        return Shape.from_hf(json.loads(cfg_file.read_text()))
    if name in KNOWN_ARCHS:
        return Shape.from_hf(KNOWN_ARCHS[name])
    raise FileNotFoundError(f"{cfg_file} not found and recipe {name!r} has no built-in shape; "
                            f"known: {sorted(KNOWN_ARCHS)}")


def _main_rl(args) -> int:
    from pear_mega.rl.recipes import RECIPES as RL_RECIPES

    cfg = RL_RECIPES.build(args.recipe, args.overrides)
    try:
        lay, ro = rl_layouts(cfg, args.gpus)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    shape = _shape_for_recipe(args.recipe, cfg.model.hf_path)
    plan = plan_rl(shape, lay, ro, args.gpu_mem_gib * GIB, args.overhead_gib)
    print(f"recipe {args.recipe}: {shape.total_params() / 1e9:.2f}B params, trainer TP={lay.tp} PP={lay.pp} "
          f"DP={lay.dp}, engine TP={ro.engine_tp}, offload_optimizer={ro.offload_optimizer}, "
          f"reference={ro.reference}, sleep_level={ro.sleep_level}")
    print(format_rl_plan(plan))
    return 0 if plan["fits"] else 1


def main(argv: list[str] | None = None) -> int:
    from pear_mega.rl.recipes import RECIPES as RL_RECIPES
    from pear_mega.sft.recipes import RECIPES

    parser = argparse.ArgumentParser(description="Per-GPU memory plan for an SFT or RL recipe and layout.")
    parser.add_argument("--recipe", required=True,
                        help=f"one of: {', '.join(RECIPES.names())} (SFT); {', '.join(RL_RECIPES.names())} (RL)")
    parser.add_argument("--gpus", type=int, required=True, help="total GPUs (= TP x PP x DP)")
    parser.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory per GPU (H100: 80)")
    parser.add_argument("--overhead-gib", type=float, default=4.0)
    parser.add_argument("--no-inplace-loss", action="store_true")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the recipe")
    args = parser.parse_args(argv)
    if args.recipe in RL_RECIPES.names():
        return _main_rl(args)
    cfg = RECIPES.build(args.recipe, args.overrides)
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    if args.gpus % (tp * pp):
        raise SystemExit(f"--gpus {args.gpus} is not a multiple of TP x PP = {tp * pp}")
    dp = args.gpus // (tp * pp)
    if cfg.train.global_batch_packs % dp:
        raise SystemExit(f"train.global_batch_packs={cfg.train.global_batch_packs} not divisible by DP={dp}")
    shape = _shape_for_recipe(args.recipe, cfg.model.hf_path)
    lay = Layout(tp=tp, pp=pp, dp=dp, seq_length=cfg.data.seq_length,
                 microbatches=cfg.train.global_batch_packs // dp, bf16=cfg.model.dtype == "bfloat16",
                 distributed_optimizer=cfg.optim.use_distributed_optimizer is not False,
                 recompute=cfg.model.recompute_activations, inplace_loss=not args.no_inplace_loss)
    mem = plan_memory(shape, lay, args.overhead_gib)
    print(f"recipe {args.recipe}: {shape.total_params() / 1e9:.2f}B params, TP={tp} PP={pp} DP={dp}, "
          f"{lay.microbatches} microbatches x {lay.seq_length} tokens, recompute={lay.recompute}")
    print("| component | GiB per GPU |\n|---|---|")
    for key in ("weights", "grads", "optimizer", "activations", "loss", "overhead", "total"):
        print(f"| {key} | {mem[key] / GIB:.2f} |")
    fits = mem["total"] <= args.gpu_mem_gib * GIB
    print(f"{'FITS' if fits else 'DOES NOT FIT'} in {args.gpu_mem_gib:.0f} GiB "
          f"({mem['total'] / GIB:.1f} GiB, params per GPU {mem['params_per_gpu'] / 1e9:.2f}B)")
    return 0 if fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
