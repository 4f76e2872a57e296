"""comptrust: does compressing an LLM keep it trustworthy?

Compress a model (GPTQ, AWQ, pruning), evaluate it on the eight DecodingTrust perspectives plus MMLU, and compare
against the dense model. The public API (``comptrust.api``; the CLI calls the same functions):

    comptrust.evaluate(model=None, perspectives=[...], out=DIR, **config) -> EvalResult
    comptrust.compress(model=None, method=..., out=DIR, **settings)       -> CompressResult
    comptrust.run_study(spec, out=DIR)                                    -> StudyResult (.to_pandas())
    comptrust.load_study(DIR) / comptrust.build_report(DIR)               -> StudyResult
    comptrust.EvalConfig                                                  the validated run settings

Everything is imported on first use (module ``__getattr__``), so ``import comptrust`` stays fast and pulls in
neither torch nor transformers.

Two names are also subpackages: ``comptrust.evaluate`` (the module evaluate.py) and ``comptrust.compress``. Once
imported, a submodule is set as an attribute of this package and would shadow the function of the same name, so
both modules are made callable (their class is switched to one whose ``__call__`` is the API function): code that
uses them as modules (``from comptrust.evaluate import ...``, monkeypatching) is unaffected, and
``comptrust.evaluate(...)`` / ``comptrust.compress(...)`` call the API.
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib as _importlib
import os as _os
import sys as _sys
import types as _types
from typing import Any as _Any

# OpenMP's waiting between parallel regions (torch's CPU ops; both must be set before torch is imported, and a value
# the user set wins). Spinning without end, two processes sharing a small CPU slow each other down ~30x (measured
# here: 66 s vs 2.6 s for the same 3 prompts while another torch job ran); sleeping at once (PASSIVE) pays a thread
# wake-up at every op, and a decode step runs hundreds of small ops. A short spin first (GOMP_SPINCOUNT, libgomp's,
# which torch's Linux wheels use; it overrides the policy's spin) is the middle: 32 stereotype prompts x 32 tokens on
# the embedded model, 2 threads, alone 5.93 s passive -> 3.89 s at 2,000 (3.48 s at 6,000, 3.17 s at 300,000),
# two such processes at once 5.96 s passive -> 6.9 s at 2,000 (8.4 s at 6,000, 56 s at 300,000); bench/results/omp_wait.md.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("GOMP_SPINCOUNT", "2000")

# public name -> "module:attribute", imported on first access
_LAZY = {
    "run_study": "comptrust.api:run_study",
    "load_study": "comptrust.api:load_study",
    "build_report": "comptrust.api:build_report",
    "EvalConfig": "comptrust.config:EvalConfig",
    "EvalResult": "comptrust.results:EvalResult",
    "PerspectiveResult": "comptrust.results:PerspectiveResult",
    "StudyResult": "comptrust.results:StudyResult",
    "CompressResult": "comptrust.results:CompressResult",
    "UsageError": "comptrust.errors:UsageError",
}
# names that are both a submodule and an API function
_CALLABLE_MODULES = {"evaluate": "comptrust.api:evaluate", "compress": "comptrust.api:compress"}

__all__ = ["__version__", "evaluate", "compress", *_LAZY]


def _target(spec: str) -> _Any:
    mod, attr = spec.split(":")
    return getattr(_importlib.import_module(mod), attr)


class _CallableModule(_types.ModuleType):
    """A module that can be called: ``comptrust.evaluate(...)`` runs ``comptrust.api.evaluate(...)``."""

    def __call__(self, *args: _Any, **kwargs: _Any) -> _Any:
        return self._api()(*args, **kwargs)

    def _api(self) -> _Any:
        return _target(_CALLABLE_MODULES[self.__name__.rsplit(".", 1)[1]])

    @property
    def __signature__(self) -> _Any:  # what inspect.signature / a notebook's completion shows: the API's arguments
        import inspect

        return inspect.signature(self._api())


class _Package(_types.ModuleType):
    """This package's module type: makes evaluate/compress callable whenever the import system sets them."""

    def __setattr__(self, name: str, value: _Any) -> None:
        if name in _CALLABLE_MODULES and isinstance(value, _types.ModuleType) and type(value) is _types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> _Any:
    if name in _CALLABLE_MODULES:
        return _importlib.import_module(f"{__name__}.{name}")  # the import sets (and converts) the attribute
    if name in _LAZY:
        value = _target(_LAZY[name])
        globals()[name] = value
        return value
    raise AttributeError(f"module 'comptrust' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
