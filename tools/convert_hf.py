"""Convert between HF checkpoints and pear-mega megatron checkpoints, and check the conversion.

    python tools/convert_hf.py import HF_DIR CKPT_DIR [--tp 2 --pp 2]
    python tools/convert_hf.py export CKPT_DIR HF_OUT
    python tools/convert_hf.py verify HF_DIR CKPT_DIR [--tol 1e-4]

``import`` in one process streams the checkpoint one TP/PP rank at a time (peak host memory ~ one
rank's shard, no model is built); under ``torchrun --nproc-per-node N`` (N = tp * pp) every
command splits the model over the ranks. The logic lives in ``pear_mega.models.convert``.
"""

from __future__ import annotations

import argparse
import logging
import sys

EPILOG = """\
worked example (SmolLM2-135M-Instruct, 9 query / 3 KV heads, so TP 1 or 3):

  # HF -> megatron at TP=3, one process, streamed one rank at a time: no model is built, peak
  # host memory ~ one rank's shard + one HF tensor (the way to convert a 70B model on one node)
  python tools/convert_hf.py import ~/.cache/pear_mega/smollm2-135m-instruct /tmp/smol-mcore --tp 3
  # the same, sharded by 3 ranks (memory: one shard per rank, all ranks at once)
  torchrun --nproc-per-node 3 tools/convert_hf.py import ~/.cache/pear_mega/smollm2-135m-instruct /tmp/smol-mcore --tp 3
  # the same in one process with the whole model built in memory (peak ~ the whole model)
  python tools/convert_hf.py import ~/.cache/pear_mega/smollm2-135m-instruct /tmp/smol-mcore --tp 3 --whole-model
  # check: same probe prompts through both models
  python tools/convert_hf.py verify ~/.cache/pear_mega/smollm2-135m-instruct /tmp/smol-mcore --tol 1e-4
  # megatron (this or any trainer checkpoint, any TP/PP) -> HF, loadable by transformers and vLLM
  python tools/convert_hf.py export /tmp/smol-mcore /tmp/smol-hf

supported architectures: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

loading is weights only: export and verify read tensors and plain data from a checkpoint and refuse
one whose pickled index (.metadata) or common.pt names anything else (a crafted checkpoint cannot
run code here); import reads safetensors only and refuses NaN/inf weights.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_hf.py",
        description="HF <-> megatron-core (dist_checkpointing torch_dist) checkpoint conversion.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="HF safetensors directory -> megatron checkpoint",
                         description="Convert an HF directory (config.json + safetensors) into a megatron "
                         "torch_dist checkpoint laid out for --tp x --pp; config, tokenizer and the TP/PP "
                         "metadata are stored with it. In one process the ranks are written one at a time "
                         "without building the model (peak host memory ~ one rank's shard); under torchrun "
                         "with tp*pp ranks each rank writes its own shard. The checkpoint loads at any TP/PP.")  # fmt: skip
    imp.add_argument("hf_dir", help="HF model directory (config.json, *.safetensors, tokenizer files)")
    imp.add_argument("out_dir", help="new (empty) megatron checkpoint directory")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint is for (default 1)")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the checkpoint is for (default 1)")
    imp.add_argument("--dtype", default="float32", help="parameter dtype: float32 (default) or bfloat16")
    imp.add_argument("--whole-model", action="store_true",
                     help="one process: build the whole megatron model in memory and save it, instead of "
                     "streaming rank by rank (peak ~ the whole model; for comparison and debugging)")  # fmt: skip

    exp = sub.add_parser("export", help="megatron checkpoint -> HF safetensors directory",
                         description="Convert a megatron checkpoint written at any TP/PP (by import or by a "
                         "trainer) into an HF directory loadable by transformers and vLLM.")  # fmt: skip
    exp.add_argument("ckpt_dir", help="megatron checkpoint directory (has pear_mega.json)")
    exp.add_argument("out_dir", help="HF output directory")
    exp.add_argument("--dtype", default=None, help="cast tensors to this dtype (default: keep)")
    exp.add_argument("--tokenizer", default=None, help="copy tokenizer files from here (default: <ckpt>/hf)")
    exp.add_argument("--tp", type=int, default=1, help="TP split when run under torchrun (default 1)")
    exp.add_argument("--pp", type=int, default=1, help="PP split when run under torchrun (default 1)")

    ver = sub.add_parser("verify", help="compare HF and megatron logits on probe prompts",
                         description="Run the same probe prompts through the HF model and the megatron "
                         "checkpoint; print max/mean |logit diff| and top-1 agreement; exit 1 past --tol.")  # fmt: skip
    ver.add_argument("hf_dir", help="HF model directory")
    ver.add_argument("ckpt_dir", help="megatron checkpoint directory")
    ver.add_argument("--tol", type=float, default=1e-4, help="max |logit diff| allowed (default 1e-4, fp32)")
    ver.add_argument("--prompt", action="append", default=None, help="probe prompt (repeatable; default: 4 built-in)")
    ver.add_argument("--tp", type=int, default=1, help="TP split when run under torchrun (default 1)")
    ver.add_argument("--pp", type=int, default=1, help="PP split when run under torchrun (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from pear_mega.models import convert

    try:
        if args.command == "import":
            out = convert.import_hf(args.hf_dir, args.out_dir, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                    streaming=not args.whole_model)  # fmt: skip
            print(f"wrote megatron checkpoint {out}")
        elif args.command == "export":
            out = convert.export_hf(args.ckpt_dir, args.out_dir, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                    tokenizer_dir=args.tokenizer)  # fmt: skip
            print(f"wrote HF checkpoint {out}")
        else:
            prompts = tuple(args.prompt) if args.prompt else convert.DEFAULT_PROBES
            report = convert.verify(args.hf_dir, args.ckpt_dir, prompts=prompts, tp=args.tp, pp=args.pp)
            if report is not None:
                ok = report.max_abs_diff <= args.tol
                print(f"{report}  -> {'OK' if ok else 'FAIL'} (tol {args.tol:g})")
                return 0 if ok else 1
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, NotImplementedError) as exc:
        print(f"convert_hf.py {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
