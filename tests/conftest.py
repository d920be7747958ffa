"""Session-wide test settings."""

from __future__ import annotations

import os
import tempfile

# the CLIs' persistent compilation cache goes to a fresh directory per test session, never the user's
os.environ.setdefault("SORA_JAX_COMPILE_CACHE", tempfile.mkdtemp(prefix="sora-jax-test-jit-"))
