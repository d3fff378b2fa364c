"""Issue 30's API rule for `asoftmax.models` and `asoftmax.data` (optax's): the package `__init__` re-exports from
its modules and holds the one `__all__`; every name an experiment or a script uses is in that `__all__` (so the
bad-input registry of tests/test_bad_input.py sees it), whatever the import form:

    from asoftmax.models import load_smollm2           # a name of the package
    from asoftmax.models import llama; llama.f(...)    # a name read through a submodule
    from asoftmax.models.llama import f                # a name imported from a submodule
    from asoftmax import models; models.f(...)         # a name read through the package
    import asoftmax.models.llama as m; m.f(...)

Submodule imports stay allowed (they are not churned), but what they reach must be public.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import pkgutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("asoftmax.models", "asoftmax.data")
SCANNED = ("experiments", "scripts", "configs", "tests/experiments")  # and the experiments' tests


def _submodules(pkg: str) -> set[str]:
  mod = importlib.import_module(pkg)
  return {m.name for m in pkgutil.iter_modules(mod.__path__)}


def _dotted(node) -> list[str] | None:
  """`a.b.c` -> ['a', 'b', 'c'] for a chain of attributes on a name; None for anything else."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  return [node.id] + parts[::-1]


def _resolve(path: list[str], subs: dict[str, set[str]]) -> tuple[str, str] | None:
  """('asoftmax.models', 'name') for a dotted path that reaches a name of a scanned package (through any chain of
  its submodules); None when the path does not reach one (a module itself, or another package)."""
  for pkg in PACKAGES:
    head = pkg.split(".")
    if path[:len(head)] != head:
      continue
    rest = path[len(head):]
    while rest and rest[0] in subs[pkg]:
      rest = rest[1:]
    return (pkg, rest[0]) if rest else None
  return None


def used_names(root: pathlib.Path = ROOT, dirs=SCANNED) -> dict[tuple[str, str], list[str]]:
  """{(package, name): [files]} for every name of `asoftmax.models` / `asoftmax.data` the files under `dirs` use."""
  subs = {p: _submodules(p) for p in PACKAGES}
  out: dict[tuple[str, str], list[str]] = {}

  def add(hit, rel):
    if hit is not None:
      out.setdefault(hit, [])
      if rel not in out[hit]:
        out[hit].append(rel)

  for d in dirs:
    for path in sorted((root / d).rglob("*.py")):
      rel = str(path.relative_to(root))
      tree = ast.parse(path.read_text())
      alias: dict[str, list[str]] = {}  # local name -> the dotted module path it is bound to
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          for a in node.names:
            if a.asname:
              alias[a.asname] = a.name.split(".")
            else:
              alias[a.name.split(".")[0]] = [a.name.split(".")[0]]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
          for a in node.names:
            full = node.module.split(".") + [a.name]
            hit = _resolve(full, subs)
            if hit is None:  # a module (package or submodule): attributes read through it are resolved below
              alias[a.asname or a.name] = full
            add(hit, rel)
      for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
          parts = _dotted(node)
          if parts and parts[0] in alias:
            add(_resolve(alias[parts[0]] + parts[1:], subs), rel)
  return out


def _exported(pkg: str, name: str) -> bool:
  """`name` is in the package `__all__`, or (read through a submodule) is the very object the package exports
  under another name (`bert.encode` is `asoftmax.models.bert_encode`)."""
  mod = importlib.import_module(pkg)
  if name in mod.__all__:
    return True
  objs = [getattr(importlib.import_module(f"{pkg}.{m}"), name, None) for m in _submodules(pkg)]
  return any(o is not None and any(o is getattr(mod, n) for n in mod.__all__) for o in objs)


def missing_from_all(root: pathlib.Path = ROOT, dirs=SCANNED) -> list[str]:
  """'package.name (files)' for every used name that is not in its package's `__all__`."""
  bad = []
  for (pkg, name), files in sorted(used_names(root, dirs).items()):
    if not _exported(pkg, name):
      bad.append(f"{pkg}.{name} ({', '.join(files)})")
  return bad


def test_experiments_and_scripts_use_only_public_names():
  """Anything an experiment, config, script (or an experiment's test) takes from asoftmax.models / asoftmax.data is
  in the package `__all__` (and so in the bad-input registry), or it must stay private to its package.

  On the code before this test (f3a4ede) it listed 25 names: data.consecutive_chunks, find_image_folder,
  wikitext_lines, words; models.DenseCacheAttention, EuroSATResNet, LlamaCache, accuracy, cached_hidden_states,
  decode_step, extract_features, hidden_states_with_attention, init_cache, load_params, pack_token_ids,
  params_from_tensors, prefill, read_gguf, read_metadata, save_params, sentence_embedding, smollm2_path,
  tokenize (bert's), train_classifier, train_or_load."""
  missing = missing_from_all()
  assert not missing, "names used outside the package but missing from its __all__: " + "; ".join(missing)


def test_scanner_sees_every_import_form(tmp_path):
  """The scanner itself: each import form reaches the name; a module import alone reaches nothing."""
  (tmp_path / "experiments").mkdir()
  (tmp_path / "experiments" / "x.py").write_text(
      "import asoftmax.models.llama as m\n"
      "import asoftmax.data\n"
      "from asoftmax import models\n"
      "from asoftmax.models import llama, load_bert\n"
      "from asoftmax.data.text import tokenize\n"
      "def f():\n"
      "  m.a1; llama.a2; models.a3; models.llama.a4; asoftmax.data.mnist.a5; llama._a6\n")
  got = sorted(used_names(tmp_path, ("experiments",)))
  assert got == [("asoftmax.data", "a5"), ("asoftmax.data", "tokenize"), ("asoftmax.models", "_a6"),
                 ("asoftmax.models", "a1"), ("asoftmax.models", "a2"), ("asoftmax.models", "a3"),
                 ("asoftmax.models", "a4"), ("asoftmax.models", "load_bert")]


@pytest.mark.parametrize("pkg", PACKAGES)
def test_one_all_per_package(pkg):
  """optax's rule: only the package `__init__` has an `__all__`; each name in it is defined (re-exported)."""
  mod = importlib.import_module(pkg)
  for name in mod.__all__:
    assert hasattr(mod, name), f"{pkg}.__all__ lists {name}, which the package does not define"
  with_all = [m for m in sorted(_submodules(pkg)) if hasattr(importlib.import_module(f"{pkg}.{m}"), "__all__")]
  assert not with_all, f"{pkg}: submodules with their own __all__ (keep one per package): {with_all}"
