"""Every ```python block of docs/INTEGRATIONS.md runs, as written (each in a fresh namespace)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "INTEGRATIONS.md"
BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)


def test_the_guide_has_its_examples():
    assert len(BLOCKS) == 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_guide_block_runs(index):
    code = BLOCKS[index]
    for peer in ("kronfluence", "trak"):
        if f"from {peer}" in code:
            pytest.importorskip(peer)
    exec(compile(code, f"{GUIDE.name}[block {index}]", "exec"), {"__name__": "guide"})
