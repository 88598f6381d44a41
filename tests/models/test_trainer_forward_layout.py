"""Both trainers feed a model the attention inputs of the layer spec it was built with
(``model.pear_spec_layout``), not the machine's default: a local-spec model (``model.use_te=false``)
on a machine where Transformer Engine would be chosen gets the block-diagonal mask, never THD
packed-sequence parameters. Checked in a fresh interpreter (megatron's parallel state is
process-global) with the machine's answer to "TE and CUDA here?" set to yes after the build."""

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
    from types import SimpleNamespace

    import torch

    import pear_mega.platform as platform
    from pear_mega.models import ModelArch, attention_inputs, build_gpt_model
    from pear_mega.parallel import ParallelConfig, init_parallel
    from pear_mega.rl.trainer import RLTrainer
    from pear_mega.sft.trainer import SFTTrainer
    from pear_mega.trainer_core import make_trainable

    ctx = init_parallel(ParallelConfig())
    arch = ModelArch.from_hf(sys.argv[1])
    model = make_trainable(build_gpt_model(arch, ctx, use_te=False), recompute_activations=False,
                           use_distributed_optimizer=False)
    assert model.module.pear_spec_layout == "local"
    cu = torch.tensor([0, 9, 16], dtype=torch.int32)
    pack = {"tokens": torch.randint(0, arch.vocab_size, (16,), generator=torch.Generator().manual_seed(0)),
            "cu_seqlens": cu}
    with torch.no_grad():
        positions, mask, _ = attention_inputs(cu, 16, ctx.device, use_te=False)
        expected = model(pack["tokens"].unsqueeze(0), positions, mask)
        # from here on the machine looks like one where TE would be the default spec
        platform.use_gpu = lambda: True
        platform.te_available = lambda: True
        sft_out, _ = SFTTrainer._forward_step(SimpleNamespace(ctx=ctx, _loss_func=print), iter([pack]), model)
        rl_out, _ = RLTrainer._forward_step(SimpleNamespace(ctx=ctx), print, iter([pack]), model)
    torch.testing.assert_close(sft_out, expected, rtol=0, atol=0)
    torch.testing.assert_close(rl_out, expected, rtol=0, atol=0)
    print("OK")
    """
)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_trainers_use_the_models_spec_layout(tiny_models):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, tiny_models["llama"]], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-2000:] + proc.stderr[-4000:]
