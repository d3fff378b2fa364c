"""The topk experiments on tiny inputs: the WikiText reader/packer and the BERT table's invariants."""

import os

import numpy as np

from asoftmax.data import text
from asoftmax.models import bert
from experiments import registry
from experiments.topk import bert as topk_bert
from experiments.topk import synthetic as topk_synthetic


def _config(name, arg):
  return registry.load_config(f"configs/topk/{name}.py", arg)


def _tiny_wikitext(tmp_path):
  d = tmp_path / "wikitext-2"
  d.mkdir()
  text = " = Heading = \n\n" + "\n".join(
      f" The tower @-@ block number {i} is 3 @,@ 000 metres , and it is tall . \n" for i in range(40))
  (d / "wiki.test.tokens").write_text(text)
  held = "\n".join(f" A river crosses valley number {i} , flowing north to the sea . \n" for i in range(40))
  (d / "wiki.valid.tokens").write_text(held)  # held-out text for the progressive search's basis
  return str(tmp_path)


def test_read_and_pack_wikitext(tmp_path):
  data = _tiny_wikitext(tmp_path)
  with open(os.path.join(data, "wikitext-2", "wiki.test.tokens"), encoding="utf-8") as f:
    lines = text.wikitext_lines(f.read())
  assert len(lines) == 40 and not any(l.startswith("=") for l in lines)
  assert "tower-block" in lines[0] and "3,000" in lines[0]
  _, tok, _ = bert.load_bert()
  ids = bert.pack_token_ids(tok, lines, 32, 3)
  assert ids.shape == (3, 32)
  assert (ids[:, 0] == tok.token_to_id("[CLS]")).all() and (ids[:, -1] == tok.token_to_id("[SEP]")).all()
  # Consecutive rows continue the token stream.
  flat = [t for l in lines for t in tok.encode(l, add_special_tokens=False).ids]
  np.testing.assert_array_equal(ids[:, 1:-1].ravel(), flat[: 3 * 30])


def test_topk_bert_on_tiny_wikitext(tmp_path):
  c = _config("bert", "smoke")
  c.data_dir = _tiny_wikitext(tmp_path)
  c.num_sequences = 2
  c.epsilons = (0.1, 0.001)
  c.layer_epsilons = ()
  c.drift_methods = ("multi_gap",)
  out = topk_bert.run(c, str(tmp_path), __import__("jax").random.key(0))
  rows = out.rows
  ck = [r for r in rows if r["table"] == "certified_k"]
  assert len(ck) == 2 * 6  # 2 epsilons x (4 certificates + 2 cell searches)
  for r in ck:
    assert r["budget_ok"] and r["tv_max"] <= r["epsilon"], r
    assert r["queries"] == 6 * 12 * 2 * 32  # layers x heads x sequences x tokens (packed: no padding)
    assert 0 < r["k_over_n"] <= 1 and r["looseness"] >= 1 - 1e-9
  for r in (r for r in rows if r["table"] == "output_error"):
    assert r["violations"] == 0 and r["identity_max"] < 1e-4, r
  dr = [r for r in rows if r["table"] == "drift"]
  assert len(dr) == 2 and all(0.5 < r["cos_mean"] <= 1 + 1e-6 for r in dr)
  sc = [r for r in rows if r["table"] == "search_cost"]
  assert len(sc) == 2 * 3  # 2 epsilons x (progressive, cell search, oracle)
  for r in sc:
    assert r["budget_ok"] and r["tv_max"] <= r["epsilon"], r
    assert r["k_over_n"] >= r["oracle_k_over_n"] - 1e-9 and r["macs_over_dense"] > 0, r
  # A smaller budget keeps more keys.
  k = {r["epsilon"]: r["k_over_n"] for r in ck if r["method"] == "exact"}
  assert k[0.001] > k[0.1]


def test_topk_bert_missing_data_is_reported(tmp_path):
  c = _config("bert", "smoke")
  c.data_dir = str(tmp_path)
  c.drift_methods = ()
  out = topk_bert.run(c, str(tmp_path), __import__("jax").random.key(0))
  assert len(out.rows) == 1 and out.rows[0]["status"].startswith("not run: data not found")


def test_topk_synthetic_smoke_rows():
  c = _config("synthetic", "smoke")
  out = topk_synthetic.run(c, "", __import__("jax").random.key(0))
  assert len(out.rows) == 2 * 2 * 2
  for r in out.rows:
    assert r["tv_max"] <= r["epsilon"] and r["tv_max_multi_gap"] <= r["epsilon"]
    assert r["k_multi_gap_over_n"] >= r["k_over_n"]
    if r["n_vs_exp_sigma2"] > 100:  # the Gaussian rule's regime
      assert abs(r["diff"]) < 0.01, r
