"""The README's "Use it in your codebase" examples run as written.

Each ```python block of that section is executed in a fresh namespace (in a temporary working
directory); the blocks hold their own assertions (shapes, and the PEFT example's outputs against PEFT's).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use it in your codebase"


def _blocks() -> list[str]:
    text = README.read_text()
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_the_section_has_every_example():
    blocks = _blocks()
    for lib in ("flax.linen", "from flax import nnx", "equinox", "load_peft_adapter", "linen_activation_path",
                "nnx_activation_path"):
        assert any(lib in b for b in blocks), lib


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _blocks()[index]
    exec(compile(code, f"README.md[{SECTION} block {index}]", "exec"), {"__name__": f"readme_{index}"})
