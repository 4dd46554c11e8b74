"""The library examples in the docs (docs/library.md, and the README if it has any) run as
written, against the emulator."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "docs" / "library.md", ROOT / "README.md"]
EXAMPLES = [(page, code) for page in PAGES
            for code in re.findall(r"<!-- example -->\n```python\n(.*?)```", page.read_text(),
                                   re.S)]


def test_the_docs_have_their_examples():
    assert len(EXAMPLES) == 3


@pytest.mark.parametrize("page,code", EXAMPLES,
                         ids=[f"{page.name}-{i}" for i, (page, _) in enumerate(EXAMPLES)])
async def test_docs_example_runs(page, code, emulator, private_home):
    code = code.replace('"http://127.0.0.1:1234"', repr(emulator.url))
    namespace: dict = {}
    exec(compile(code, str(page), "exec"), namespace)
    await namespace["example"]()
    assert emulator.state.load_calls["qwen/qwen3-4b"] == 1
