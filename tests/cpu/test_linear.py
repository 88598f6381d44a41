"""The CPU training path of the local layer spec against megatron's own implementation.

``pear_mega.cpu.linear`` replaces megatron's linear autograd function on CPU (bf16 GEMMs in
fp32, weight gradients accumulated into DDP's ``main_grad``), ``pear_mega.optim`` switches the
optimizer to torch's fused AdamW and clips in place. Checked here, in a fresh interpreter (the CPU
patches and megatron's parallel state are process-global), on tiny llama (tied embeddings) and
qwen2 (QKV bias) models over two microbatches: the same logits and the same accumulated gradients
as megatron's ``LinearWithGradAccumulationAndAsyncCommunication`` + DDP hook (fp32: to rounding;
bf16: to bf16 precision), norms in the model dtype, and the clip equal to megatron's.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    from pear_mega.models import ModelArch, attention_inputs, build_gpt_model, load_hf_checkpoint
    from pear_mega.cpu.linear import _linear_layers, cpu_linear
    from pear_mega.optim import OptimConfig, _clip_grads_, build_optimizer, wrap_ddp
    from pear_mega.parallel import ParallelConfig, init_parallel

    ctx = init_parallel(ParallelConfig())
    seq = 24
    cu = torch.tensor([0, 13, 22])
    position_ids, mask, _ = attention_inputs(cu, seq, ctx.device)

    def run(hf_dir, dtype, ours):
        arch = ModelArch.from_hf(hf_dir)
        model = build_gpt_model(arch, ctx, dtype=dtype)
        load_hf_checkpoint(model, hf_dir, arch, ctx)
        layers = _linear_layers(model)
        assert layers and all(l.__dict__.get("_forward_impl") is cpu_linear for l in layers)
        norms = [p for n, p in model.named_parameters() if "norm" in n]
        assert norms and all(p.dtype == dtype for p in norms), "norms must have the model dtype"
        if ours:
            ddp = wrap_ddp(model, use_distributed_optimizer=False)
            assert all(l.gradient_accumulation_fusion for l in layers)
        else:  # megatron's own linear function and DDP hook
            for layer in layers:
                del layer.__dict__["_forward_impl"]
            ddp = DistributedDataParallel(
                config=model.config, module=model,
                ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
            )
        ddp.zero_grad_buffer()
        gen = torch.Generator().manual_seed(0)
        logits = []
        for _ in range(2):  # two microbatches accumulate into the same buffer
            ids = torch.randint(0, arch.vocab_size, (1, seq), generator=gen)
            out = ddp(ids, position_ids, mask)
            weights = torch.randn(out.shape, generator=gen)
            (out.float() * weights).sum().backward()
            logits.append(out.detach().float())
        grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
        return ddp, model, torch.stack(logits), grads

    for hf_dir in sys.argv[1:]:
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            _, _, ref_logits, ref_grads = run(hf_dir, dtype, ours=False)
            ddp, model, logits, grads = run(hf_dir, dtype, ours=True)
            if dtype == torch.float32:
                fp32_ddp = ddp
            err = ((logits - ref_logits).norm() / ref_logits.norm()).item()
            assert err <= tol, (hf_dir, dtype, "logits", err)
            for name, ref in ref_grads.items():
                err = ((grads[name] - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                assert err <= tol, (hf_dir, dtype, name, err)

        # In-place clip == megatron's clip; fused AdamW on CPU.
        optimizer, _ = build_optimizer([fp32_ddp], OptimConfig(lr=1e-3), total_steps=10, dtype=torch.float32)
        inner = optimizer.chained_optimizers[0].optimizer
        assert all(group["fused"] for group in inner.param_groups)
        assert not optimizer.prepare_grads()
        params = optimizer.chained_optimizers[0].get_parameters()
        norm = float(optimizer.get_grad_norm())
        assert norm > 0.5, norm  # so that the clip below scales
        # megatron's clip reads and scales .grad: give copies of the gradients to stand-in params
        exp_params = [torch.nn.Parameter(torch.empty_like(p)) for p in params]
        for param, p in zip(exp_params, params):
            param.grad = p.grad.clone()
        clip_grad_by_total_norm_fp32(exp_params, max_norm=0.5, total_norm=norm)
        _clip_grads_(optimizer.chained_optimizers[0], 0.5, norm)
        assert all(torch.equal(p.grad, e.grad) for p, e in zip(params, exp_params))
    print("OK")
    """
)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cpu_training_path_matches_megatron(tiny_models):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, tiny_models["llama"], tiny_models["qwen2"]],
        capture_output=True, text=True, timeout=280, cwd=str(REPO), check=False,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]
