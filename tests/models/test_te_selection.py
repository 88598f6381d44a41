"""Transformer Engine selection: not installed → the local spec; installed but broken → an error
that says why (never a silent fallback); use_te=True without TE or CUDA names what is missing;
the GPU recipes ask for TE explicitly; the GPU extra pins TE to megatron-core's range."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([extra_path, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


def test_broken_te_is_an_error_that_says_why(tmp_path):
    fake = tmp_path / "transformer_engine"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        'raise ImportError("libtransformer_engine.so: undefined symbol: _ZN2at4_ops (built for another torch)")\n')
    code = ("from pear_mega.platform import te_available, TransformerEngineError\n"
            "try:\n    te_available()\nexcept TransformerEngineError as e:\n    print('ERROR', e)\n"
            "else:\n    print('NO ERROR')\n")
    proc = _run(code, str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("ERROR Transformer Engine is installed"), out
    assert str(fake) in out and "undefined symbol" in out and ">=2.9,<2.12" in out and "model.use_te=false" in out


def test_te_not_installed_means_local_spec():
    from pear_mega.models.build import resolve_use_te
    from pear_mega.platform import te_available

    if te_available():
        pytest.skip("Transformer Engine is installed here")
    assert resolve_use_te(None) is False and resolve_use_te(False) is False
    with pytest.raises(ValueError, match="Transformer Engine"):
        resolve_use_te(True)


def test_gpu_recipes_ask_for_te():
    from pear_mega.rl.recipes import RECIPES as RL
    from pear_mega.sft.recipes import RECIPES as SFT

    assert SFT.build("llama3_70b_pear_sft", []).model.use_te is True
    assert SFT.build("qwen3_8b_pear_sft", []).model.use_te is True
    assert RL.build("llama3_70b_grpo", []).model.use_te is True


def test_gpu_extra_pins_te_to_megatron_range():
    from importlib import metadata

    declared = [r for r in metadata.requires("megatron-core") or [] if r.startswith("transformer-engine")]
    assert declared and "<2.12.0" in declared[0] and ">=2.9" in declared[0], declared
    assert '"transformer-engine[pytorch]>=2.9,<2.12"' in (ROOT / "setup.py").read_text()
