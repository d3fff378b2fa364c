"""The README's "Use it in your model" examples run as written (issue 26 item 3).

Every ```python block of that section is executed in a fresh namespace, in order; the blocks assert their own
results (certificate <= epsilon, the exact greedy tokens).
"""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use it in your model"


def _blocks():
  text = README.read_text()
  start = text.index(SECTION)
  end = text.find("\n## ", start + len(SECTION))
  return re.findall(r"```python\n(.*?)```", text[start:end if end >= 0 else None], flags=re.S)


def test_section_has_three_examples():
  assert len(_blocks()) == 3


@pytest.mark.parametrize("i", range(3), ids=["topk-attention-fn", "rff-optax-step", "adaptive-decode-scan"])
def test_readme_example_runs(i):
  exec(compile(_blocks()[i], f"README.md:{SECTION}[{i}]", "exec"), {"__name__": f"readme_example_{i}"})
