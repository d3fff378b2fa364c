"""The suite's scheduling (tests/conftest.py): units that share a costly set-up, longest first."""

import json
import os

import pytest


@pytest.fixture
def conftest(request):
  """tests/conftest.py as loaded by pytest (registered under its path; not importable under importlib mode)."""
  module = request.config.pluginmanager.get_plugin(os.path.join(os.path.dirname(__file__), "conftest.py"))
  assert module is not None
  return module


def _whole_suite(request):
  """The session's items, skipping when this run collected only part of the suite (e.g. this file alone)."""
  items = request.session.items
  modules = {it.nodeid.split("::")[0] for it in items}
  if not {"tests/sharded/test_sharded.py", "tests/test_smoke_configs.py", "tests/models/test_bert.py"} <= modules:
    pytest.skip("checks the collection of the whole suite (`make test`)")
  return items


def _module_scoped_fixtures(item):
  info = getattr(item, "_fixtureinfo", None)
  return [n for n, fds in (info.name2fixturedefs.items() if info else ()) if any(d.scope == "module" for d in fds)]


def test_module_scoped_fixtures_are_set_up_by_one_worker(request, conftest):
  """All tests using one module-scoped fixture are in one unit (else every worker that gets one of them sets the
  fixture up again: the sharded subprocess is ~20 s): no PER_TEST module has a module-scoped fixture."""
  by_fixture = {}
  for item in _whole_suite(request):
    for name in _module_scoped_fixtures(item):
      by_fixture.setdefault((item.nodeid.split("::")[0], name), set()).add(conftest._unit(item.nodeid))
  assert by_fixture, "no module-scoped fixture found: the check itself is broken"
  for (module, name), units in sorted(by_fixture.items()):
    assert len(units) == 1, (f"{module}: the tests using the module-scoped fixture {name!r} are in "
                             f"{len(units)} units; remove the module from PER_TEST in tests/conftest.py")


def test_every_per_test_module_exists(request, conftest):
  modules = {item.nodeid.split("::")[0] for item in _whole_suite(request)}
  assert set(conftest.PER_TEST) <= modules, sorted(set(conftest.PER_TEST) - modules)


def test_units_are_contiguous_and_longest_first(request, conftest):
  """The collection is ordered by unit, each unit's tests together, units by decreasing measured time."""
  items = _whole_suite(request)
  units = [conftest._unit(it.nodeid) for it in items]
  seen, order = set(), []
  for u in units:
    if not order or order[-1] != u:
      assert u not in seen, f"unit {u!r} is split in the collection order"
      seen.add(u)
      order.append(u)
  cost = conftest.unit_costs(items)
  costs = [cost[u] for u in order]
  assert costs == sorted(costs, reverse=True)
  assert costs[0] >= 10 * costs[-1]  # a real spread: the file was read


def test_durations_file_is_well_formed(conftest):
  with open(conftest._DURATIONS) as f:
    durations = json.load(f)
  assert len(durations) > 200 and all(isinstance(v, float) and v >= 0 for v in durations.values())
  assert all(k.startswith("tests/") and "::" in k for k in durations)


def test_units_are_modules_or_tests(conftest):
  assert conftest._unit("tests/sharded/test_sharded.py::test_sharded[x]") == "tests/sharded/test_sharded.py"
  nodeid = "tests/test_smoke_configs.py::test_smoke_config_runs[adaptive/llm.py]"
  assert conftest._unit(nodeid) == nodeid
  assert os.path.isabs(conftest._DURATIONS)
