"""Per-GPU memory planner for an SFT recipe and parallel layout.

    python -m pear_mega.plan --recipe llama3_70b_pear_sft --gpus 32
    python -m pear_mega.plan --recipe qwen3_8b_pear_sft --gpus 8 --gpu-mem-gib 80

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


def _shape_for_recipe(name: str, hf_path: str) -> Shape:
    cfg_file = Path(hf_path) / "config.json"
    if cfg_file.is_file():
        return Shape.from_hf(json.loads(cfg_file.read_text()))
    if name in KNOWN_ARCHS:
        return Shape.from_hf(KNOWN_ARCHS[name])
    raise FileNotFoundError(f"{cfg_file} not found and recipe {name!r} has no built-in shape; "
                            f"known: {sorted(KNOWN_ARCHS)}")


def main(argv: list[str] | None = None) -> int:
    from pear_mega.sft.recipes import RECIPES

    parser = argparse.ArgumentParser(description="Per-GPU memory plan for an SFT recipe and layout.")
    parser.add_argument("--recipe", required=True, help=f"one of: {', '.join(RECIPES.names())}")
    parser.add_argument("--gpus", type=int, required=True, help="total GPUs (= TP x PP x DP)")
    parser.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory per GPU (H100: 80)")
    parser.add_argument("--overhead-gib", type=float, default=4.0)
    parser.add_argument("--no-inplace-loss", action="store_true")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the recipe")
    args = parser.parse_args(argv)
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
