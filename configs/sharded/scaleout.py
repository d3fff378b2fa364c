r"""Scale-out table (issue 29): per-device memory, products per device, wall-clock and agreement with one device
for 1, 2, 4, 8 devices on a vocab-sharded head (exact and AdaptiveSoftmax), a 10^6-class RF tree and a 32,768-key
causal cache. Beyond the papers.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python -m experiments.run --config configs/sharded/scaleout.py --workdir docs/results/sharded_scaleout
    python -m experiments.run --config configs/sharded/scaleout.py:smoke --workdir /tmp/scaleout_smoke

The devices come from `config.mesh` (the launcher builds it with `jax.make_mesh`; default 8 devices on one axis,
which needs the XLA flag above on a CPU machine); each row uses the first S of them. Device counts above the mesh
size are rows marked not run. The full head is 128,256 x 4096 (2.1 GB in float32, prepared 3 times for
AdaptiveSoftmax): `--config.head=32064,4096` runs a quarter of it.

The issue-29 target (the full head over 8 devices only, exact and AdaptiveSoftmax on 64 queries; the one-device
top-1 is the host float32 GEMM; one host copy of A, dropped once the sharded copy exists):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu taskset -c 0 \
      python -m experiments.run --config configs/sharded/scaleout.py:target --workdir docs/results/sharded_head_target

Time (measured, CPU, 2 shared cores, 8 forced devices): full with `head=32064,4096` ~15 min; target 7.5 min
(430 s in the experiment at load 5.6-10.6, peak RSS 11.2 GB: A's host copy 2.1 GB until sharded, the sharded copy
2.1 GB, the prepared matrix 6.0 GB, and the one-time finiteness scan of A in `sharded.prepare_matrix`); smoke ~10 s.
"""

import ml_collections

from asoftmax import configlib

# Arguments after the colon (`--config configs/sharded/scaleout.py:smoke`), declared as data for `--list`.
ARGS = {"variant": configlib.choice("full", "target", "smoke")}


def get_config(arg=None):
  a = configlib.parse_arg(arg, ARGS)
  c = ml_collections.ConfigDict()
  c.experiment = "sharded_scaleout"
  c.seed = 0
  c.data_dir = ""  # synthetic data

  # The launcher's device mesh (jax.make_mesh): its devices are the pool; each row uses a (S,) mesh of the first S.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (8,)  # axis sizes (needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 on CPU)
  c.mesh.axis_names = ("devices",)
  c.devices = (1, 2, 4, 8)  # device counts S, one row each
  c.workloads = ("cache", "rff", "head")

  # Workloads.
  c.head = (128_256, 4096)  # an LLM-like head (adaptive.synthetic.llm_head_problem)
  c.queries = 64
  c.adaptive = True  # also AdaptiveSoftmax on the head
  c.epsilon = 0.3
  c.delta = 0.1
  c.classes = 1_000_000  # RF tree
  c.rff_features = 16
  c.draws = 20_000
  c.cache_keys = 32_768  # KV cache
  c.epsilon_attention = 0.01

  # Protocol.
  c.repeats = 3
  c.free_host_head = False  # drop the host copy of A once the sharded copy exists (one device count only)

  if a["variant"] == "target":
    c.devices = (8,)
    c.workloads = ("head",)
    c.repeats = 1
    c.free_host_head = True

  if a["variant"] == "smoke":
    c.mesh.shape = (1,)  # one device: the row for 2 is marked not run
    c.devices = (1, 2)
    c.head = (1000, 64)
    c.queries = 4
    c.adaptive = False  # a compile of the algorithm costs ~10 s
    c.classes = 1000
    c.draws = 500
    c.cache_keys = 512
    c.repeats = 1
  return c
