"""Atomic file writes: the one helper every writer in the project uses (results, caches, weights).

A crashed run must never leave a half-written file that looks complete: every file is written
to a temporary file in the same directory and then renamed over the target (atomic on POSIX).

>>> import os, tempfile
>>> from asoftmax import results
>>> path = os.path.join(tempfile.mkdtemp(), "x.json")
>>> results.write_json(path, {"gain": 2.5})
>>> print(open(path).read(), end="")
{
  "gain": 2.5
}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import warnings
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp") -> Iterator[str]:
  """Yields a temporary path next to `path`; on a clean exit it is renamed over `path`, else deleted.

  For writers that want a file name (`np.savez`, `safetensors.numpy.save_file`). `suffix` is the
  temporary file's ending (`np.savez` appends ".npz" to names that lack it, so pass ".npz" there).
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=suffix, dir=directory)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would give 0666 & ~umask (0644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically (fsync'd temp file, then rename)."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())


def to_jsonable(obj: Any) -> Any:
  """Converts numpy/jax scalars and arrays (recursively) to plain Python for json."""
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
    return to_jsonable(np.asarray(obj).tolist())
  if isinstance(obj, float) and not math.isfinite(obj):
    return None if math.isnan(obj) else (1e308 if obj > 0 else -1e308)
  return obj


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically."""
  text = json.dumps(to_jsonable(obj), indent=2, sort_keys=False)
  atomic_write_bytes(path, (text + "\n").encode())


def write_text(path: str, text: str) -> None:
  """Writes text atomically."""
  atomic_write_bytes(path, text.encode())


def _content_sha256(ident: Any, payload: Any) -> str:
  text = json.dumps({"ident": to_jsonable(ident), "row": to_jsonable(payload)}, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def write_keyed_json(path: str, ident: dict, payload: Any) -> None:
  """Writes a cache entry {"ident", "row", "sha256"} atomically: `ident` keys it (what it was computed from) and
  sha256 (of ident and row, canonical JSON) verifies it on `read_keyed_json`."""
  write_json(path, {"ident": ident, "row": payload, "sha256": _content_sha256(ident, payload)})


def read_keyed_json(path: str, ident: dict) -> Any | None:
  """The cached payload at `path` if it was written for `ident` and its content is intact, else None.

  A file that cannot be read, lacks a checksum (written before checksums) or fails it (e.g. a hand-edited row) is
  reported with a `UserWarning` naming the file, and None is returned so that the caller recomputes (and rewrites)
  the entry; a file written for another `ident` returns None silently (another setting's row).
  """
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      cached = json.load(f)
  except (ValueError, OSError) as e:
    warnings.warn(f"cache {path} is unreadable ({e}); recomputing it", stacklevel=2)
    return None
  if not isinstance(cached, dict) or cached.get("ident") != to_jsonable(ident):
    return None
  if cached.get("sha256") != _content_sha256(cached["ident"], cached.get("row")):
    warnings.warn(f"cache {path} fails its checksum (edited or corrupted, or written before checksums); "
                  "recomputing it", stacklevel=2)
    return None
  return cached["row"]
