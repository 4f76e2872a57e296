"""comptrust: does compressing an LLM keep it trustworthy?

Compress a model (GPTQ, AWQ, pruning), evaluate it on the eight DecodingTrust perspectives plus MMLU,
and compare against the dense model. The public entry points are the ``comptrust`` command and
:func:`comptrust.evaluate.evaluate`.
"""

__version__ = "0.1.0"

import os as _os

# With OpenMP's default spin-waiting, two processes sharing a small CPU slow each other down ~30x (measured here:
# 66 s vs 2.6 s for the same 3 prompts while another torch job ran). Passive waiting costs little when alone.
# Must be set before torch is imported; a value the user set wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
