"""Figures of the committed results (``make figures``): every PNG under ``docs/figures/`` is drawn
from the JSON under ``docs/results/``, never by hand.

:mod:`.data` extracts the plotted series (NumPy only); :mod:`.plots` draws them with matplotlib
(the optional ``figures`` extra); ``python -m icecache_ray.figures`` writes every figure. Neither
imports torch or ray.
"""
