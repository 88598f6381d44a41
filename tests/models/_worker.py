"""One rank of a multi-process model test: ``python _worker.py SCENARIO ARGS_JSON OUT_DIR``.

Runs ``scenarios.<SCENARIO>(args)`` and writes its result dict to ``OUT_DIR/rank<RANK>.json``.
The ``__main__`` guard matters: the dist-checkpoint writer may start a process that re-imports it.
"""

import json
import logging
import os
import sys
from pathlib import Path


def main() -> None:
    scenario, args_json, out_dir = sys.argv[1:4]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK')}] %(name)s: %(message)s")
    import torch

    torch.set_num_threads(1)
    import scenarios

    result = getattr(scenarios, scenario)(json.loads(args_json)) or {}
    out = Path(out_dir) / f"rank{os.environ['RANK']}.json"
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
