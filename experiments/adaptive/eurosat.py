"""Paper Table 1, EuroSAT row: AdaptiveSoftmax on the final layer of a CNN trained from scratch on EuroSAT RGB.

The paper uses ImageNet VGG-19 features (not loadable offline); we train a small CNN whose penultimate layer is a
wide ReLU layer (d = `config.width`), so x is non-negative and sparse like VGG features. Data: an image folder
`<data_dir>/eurosat/2750/<Class>/*.jpg` decoded by PIL (`config.loader = "folder"`) or by tfds' ImageFolder
(`"tfds"`), or a prepared tfds dir; when absent every row says
"not run: data not found at <path>". `config.generate_smoke_data` (smoke only) writes a tiny folder of
generated images into the workdir to exercise the pipeline without the real data.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from asoftmax import data
from experiments import registry
from experiments.adaptive import classification
from experiments.adaptive import paper as paper_numbers


def write_generated_folder(root: str, n_per_class: int, n_classes: int = 10, size: int = 64, seed: int = 0) -> str:
  """Writes `root/<Class>/*.png` of generated images: class c is a noisy image of mean colour c (learnable).

  The folder is written under a temporary name beside `root` and renamed to `root` when complete, so an interrupted
  run never leaves a partial folder that a later run would take as the data (an existing `root` is replaced).
  """
  from PIL import Image

  rng = np.random.default_rng(seed)
  parent = os.path.dirname(os.path.abspath(root))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix="." + os.path.basename(root) + ".", dir=parent)
  try:
    for c in range(n_classes):
      os.makedirs(os.path.join(tmp, f"Class{c}"), exist_ok=True)
      colour = np.array([(c * 25) % 256, (c * 70) % 256, 255 - c * 25], np.float64)
      for i in range(n_per_class):
        img = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(tmp, f"Class{c}", f"img_{i}.png"))
    os.chmod(tmp, 0o755)
    if os.path.isdir(root):
      shutil.rmtree(root)  # an incomplete folder from an older run
    os.rename(tmp, root)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return root


def load(config, workdir):
  data_dir = config.data_dir
  if config.generate_smoke_data:
    data_dir = os.path.join(workdir, "generated_eurosat")
    if data.find_image_folder(data_dir) is None:
      write_generated_folder(data_dir, config.generated_per_class, seed=config.seed)
  cache = os.path.join(workdir, "eurosat_images.npz") if config.cache_images else ""
  splits = data.load_eurosat(data_dir, loader=config.get("loader", "folder"), tfds_dir=config.tfds_dir,
                                test_fraction=config.test_fraction, seed=config.seed, cache_path=cache)
  if config.generate_smoke_data:
    splits = splits._replace(source="GENERATED smoke images (not EuroSAT): " + splits.source)
  return splits


def run(config, workdir, rng) -> registry.Output:
  rows, notes = classification.run_table(config, workdir, rng, "eurosat", load)
  notes["differs_from_paper"] = (f"features from a {config.model} trained from scratch on EuroSAT (d = width, ReLU), "
                                 "not ImageNet VGG-19 features; split is our seeded stratified 80/20")
  return registry.Output(rows=rows, notes=notes)


def readme_row(res: dict):
  """The shared classification README row, plus the classifier's test accuracy and the sparsity of x (each beside
  the paper's VGG-19 figure where `paper.py` has one)."""
  rows = classification.readme_row(res, "AdaptiveSoftmax Table 1, EuroSAT (k = 1)")
  model, sp = res.get("notes", {}).get("model"), res.get("notes", {}).get("query_sparsity")
  if not isinstance(model, dict) or "test_accuracy" not in model or not isinstance(sp, dict):
    return rows
  acc = paper_numbers.CLASSIFICATION["eurosat"].get("accuracy")
  r = rows[0]
  ok = [x for x in res["rows"] if x.get("status") == "ok" and x.get("k") == 1 and x.get("mode", "paper") == "paper"]
  head = min(ok, key=lambda x: x["delta"]) if ok else None
  nnz = f" = {head['gain_nnz']:.1f}× per nonzero of x" if head and head.get("gain_nnz") is not None else ""
  ours = (f"{r.ours.replace(' at δ', nnz + ' at δ', 1)}; {model.get('name', 'model')} test accuracy {100 * model['test_accuracy']:.1f} %, x: "
          f"{sp['nnz_mean']:.0f} of d = {sp['d']} nonzero")
  paper = r.paper + (f"; VGG-19 accuracy {100 * acc:.1f} %" if acc else "")
  return [r._replace(ours=ours, paper=paper)]


EXPERIMENT = registry.Experiment(
    name="adaptive_eurosat",
    run=run,
    tables=classification.TABLES,
    readme=readme_row,
    plot=classification.plot_samples,
    title="AdaptiveSoftmax on a EuroSAT CNN's final layer (paper Table 1), epsilon = 0.3",
)
