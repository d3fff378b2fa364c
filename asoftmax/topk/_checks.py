"""Deprecated: the checks moved to `asoftmax.checks` (one tracer-safe policy for every package).

Kept only so modules that still write `from asoftmax.topk import _checks` keep working.
"""

from asoftmax.checks import epsilon, is_traced, logits, valid  # noqa: F401
