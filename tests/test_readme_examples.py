"""The README's library examples run as written, against the emulator."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"<!-- example -->\n```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_its_examples():
    assert len(EXAMPLES) == 3


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example-{i}" for i in range(len(EXAMPLES))])
async def test_readme_example_runs(code, emulator):
    code = code.replace('"http://127.0.0.1:1234"', repr(emulator.url))
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    await namespace["example"]()
    assert emulator.state.load_calls["qwen/qwen3-4b"] == 1
