"""Run Python where `movekd_hf` is not importable, as a user who only downloaded a checkpoint would.

The child interpreter starts without the `site` module (`-S`), so the editable-install hook that makes
`movekd_hf` importable never runs; the environment's packages (torch, transformers, ...) are put on its path
directly. Checkpoints then load only through the remote code saved next to their weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile


def run_without_package(code: str, timeout: float = 600) -> dict:
    """Run `code` in a fresh interpreter without `movekd_hf`; it must print one JSON object last."""
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as workdir:
        result = subprocess.run(
            [sys.executable, "-S", "-c", code],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if result.returncode != 0:
        raise RuntimeError(f"isolated run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
