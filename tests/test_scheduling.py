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
  """A test using a module-scoped fixture is in a SAME_WORKER unit (else every worker that gets one of its tests
  sets the fixture up again: the sharded subprocess is ~20 s) and all tests sharing it are in the same unit."""
  by_fixture = {}
  for item in _whole_suite(request):
    for name in _module_scoped_fixtures(item):
      by_fixture.setdefault((item.nodeid.split("::")[0], name), set()).add(conftest._unit(item.nodeid))
  assert by_fixture, "no module-scoped fixture found: the check itself is broken"
  for (module, name), units in sorted(by_fixture.items()):
    assert len(units) == 1 and next(iter(units)) in conftest.SAME_WORKER, (
        f"{module}: the tests using the module-scoped fixture {name!r} are in units {sorted(units)}; list them "
        "in SAME_WORKER in tests/conftest.py")


def test_every_same_worker_prefix_matches_a_test(request, conftest):
  nodeids = [item.nodeid for item in _whole_suite(request)]
  for name, prefixes in conftest.SAME_WORKER.items():
    for p in prefixes:
      assert any(n.startswith(p) for n in nodeids), f"SAME_WORKER[{name!r}]: {p!r} matches no collected test"


def test_units_are_contiguous_and_longest_first(request, conftest):
  """The collection is ordered by unit, each unit's tests together, units by decreasing measured time."""
  items = _whole_suite(request)
  with open(conftest._DURATIONS) as f:
    durations = json.load(f)
  units = [conftest._unit(it.nodeid) for it in items]
  seen, order = set(), []
  for u in units:
    if not order or order[-1] != u:
      assert u not in seen, f"unit {u!r} is split in the collection order"
      seen.add(u)
      order.append(u)
  cost = {}
  for it, u in zip(items, units):
    cost[u] = cost.get(u, 0.0) + durations.get(it.nodeid, conftest._UNKNOWN_S)
  costs = [cost[u] for u in order]
  assert costs == sorted(costs, reverse=True)
  assert costs[0] >= 10 * costs[-1]  # a real spread: the file was read


def test_durations_file_is_well_formed(conftest):
  with open(conftest._DURATIONS) as f:
    durations = json.load(f)
  assert len(durations) > 200 and all(isinstance(v, float) and v >= 0 for v in durations.values())
  assert all(k.startswith("tests/") and "::" in k for k in durations)


def test_scheduler_splits_by_unit(conftest):
  pytest.importorskip("xdist")
  assert conftest._unit("tests/sharded/test_sharded.py::test_sharded[x]") == "sharded"
  assert conftest._unit("tests/models/test_bert.py::test_anything") == "bert"
  nodeid = "tests/adaptive/test_core.py::test_full_budget_equals_exact[paper-uniform-5]"
  assert conftest._unit(nodeid) == nodeid
  assert os.path.isabs(conftest._DURATIONS)
