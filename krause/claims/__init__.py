"""The paper's claims, each one offline command that prints a table, writes JSON and a figure,
and says whether this run agrees with the paper.

    python -m krause.claims                      # every claim, in order
    python -m krause.claims --claim sinks        # one claim (repeat --claim for several)
    python -m krause.claims --tiny               # CI size: checks the pipeline, not the numbers

Claims (``CLAIMS``, in run order): vision, autoregressive, lm, sinks, sync, scaling; one
module each in this package (its NAME, COMPARISON, EXPECTATION, RULE and run()).
"""

from __future__ import annotations

from . import autoregressive, language, scaling, sinks, synchronisation, vision

CLAIMS = {m.NAME: m for m in (vision, autoregressive, language, sinks, synchronisation, scaling)}

__all__ = ["CLAIMS"]
