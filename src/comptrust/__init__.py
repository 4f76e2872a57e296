"""comptrust: does compressing an LLM keep it trustworthy?

Compress a model (GPTQ, AWQ, pruning), evaluate it on the eight DecodingTrust perspectives plus MMLU,
and compare against the dense model. The public entry points are the ``comptrust`` command and
:func:`comptrust.evaluate.evaluate`.
"""

__version__ = "0.1.0"
