"""Formatting shared by the AdaptiveSoftmax experiments."""

from __future__ import annotations

from collections.abc import Sequence

from asoftmax.adaptive import core


def phase_split(phase_means: Sequence[float]) -> str:
  """Percent of the samples read in each phase (`core.PHASES`), as "warm-up/elimination/winners/Z".

  >>> phase_split([10.0, 60.0, 20.0, 10.0])
  '10/60/20/10'
  """
  total = float(sum(phase_means)) or 1.0
  return "/".join(f"{100.0 * v / total:.0f}" for v in phase_means[: len(core.PHASES)])
