"""The adapter core is a layer below the models: ``import sora_jax`` imports no Flax."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_sora_jax_imports_no_flax():
    # a fresh interpreter: this process has imported Flax already through other tests
    code = "import sora_jax, sys; print(sorted(m for m in sys.modules if m.startswith('flax')))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
