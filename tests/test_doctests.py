"""Docstring examples run as doctests (`make test`): every module of `asoftmax` with a `>>>` example, plus
`experiments.tables`. Modules whose examples still use undefined names are listed in KNOWN_BROKEN (xfail, not
strict) until their owners fix them; a module that starts passing should be taken off the list."""

import doctest
import importlib
import pkgutil

import pytest

import asoftmax

MODULES = sorted(["experiments.tables"] + [m.name for m in pkgutil.walk_packages(asoftmax.__path__, "asoftmax.")])

# Examples written as fragments (undefined names, no outputs); to be made runnable by the packages' owners.
KNOWN_BROKEN: set[str] = set()


def _params():
  for name in MODULES:
    marks = [pytest.mark.xfail(reason="docstring example is a fragment", strict=False)] if name in KNOWN_BROKEN else []
    yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_params()))
def test_docstring_examples_run(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
  assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed"


def test_most_modules_with_examples_pass():
  with_examples = [n for n in MODULES if doctest.DocTestFinder().find(importlib.import_module(n))
                   and any(t.examples for t in doctest.DocTestFinder().find(importlib.import_module(n)))]
  assert len(with_examples) >= 10
