"""Progress bars for experiments (the library takes an optional `progress(done, total)` callback instead)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from tqdm.auto import tqdm


@contextlib.contextmanager
def bar(total: int, desc: str = "", **kwargs) -> Iterator[Callable[[int, int], None]]:
  """A tqdm bar as a `progress(done, total)` callback for library loops (`hidden_cache`, `train`)."""
  b = tqdm(total=total, desc=desc, **kwargs)
  try:
    yield lambda done, _total: b.update(done - b.n)
  finally:
    b.close()
