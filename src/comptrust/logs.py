"""Third-party chatter (transformers, llm-compressor, torch warnings, tqdm bars) into a log file, not the terminal.

Why: a run printed transformers' GGUF-conversion bars, llm-compressor's 60+ per-layer bars and a torch warning per
compression between comptrust's own lines, which buried the progress a person plans by. Inside
``third_party_to_log(path)``:

* the ``transformers`` / ``huggingface_hub`` / ``accelerate`` / ``datasets`` / ``torch`` loggers write to ``path``
  and not to stderr; transformers' own progress bars are off;
* llm-compressor's loguru logger writes to ``path``, each line once (attach_loguru() after importing it);
* ``warnings.warn`` from third-party code is written to ``path``; comptrust's own warnings still reach stderr;
* tqdm bars created in the block are disabled (and TQDM_DISABLE=1 is set for processes it starts).

The file is opened on the first record only, so a run that logs nothing leaves no file (an --out folder holding
nothing computed can then still be removed). Everything is restored on exit.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

LOGGERS = ("transformers", "huggingface_hub", "accelerate", "datasets", "torch", "llmcompressor",
           "compressed_tensors", "urllib3")
_OWN = f"{os.sep}comptrust{os.sep}"


@contextmanager
def third_party_to_log(path: Path) -> Iterator[Path]:
    path = Path(path).expanduser()
    handler = _LazyFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    # tqdm first (imported now if it was not): it bakes TQDM_* into its defaults when imported, so it must not see
    # the variable below, which is for processes started in the block
    tqdm_init = _silence_tqdm()
    old_env = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    hf_bars = _transformers_bars(False)  # imports transformers first: it installs its stderr handler on import
    saved = []
    for name in _loggers():
        lg = logging.getLogger(name)
        saved.append((lg, lg.propagate, list(lg.handlers)))
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
        lg.addHandler(handler)
        lg.propagate = False
    old_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if _OWN in str(filename):
            old_show(message, category, filename, lineno, file, line)
        else:
            handler.emit(logging.LogRecord("py.warnings", logging.WARNING, str(filename), lineno,
                                           f"{category.__name__}: {message}", None, None))

    warnings.showwarning = show
    loguru_id = _loguru_to(path)
    try:
        yield path
    finally:
        warnings.showwarning = old_show
        if old_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old_env
        if hf_bars is not None:
            _transformers_bars(hf_bars)
        if tqdm_init is not None:
            import tqdm.std

            tqdm.std.tqdm.__init__ = tqdm_init
        for lg, prop, handlers in saved:
            lg.removeHandler(handler)
            for h in handlers:
                if h not in lg.handlers:
                    lg.addHandler(h)
            lg.propagate = prop
        _loguru_restore(loguru_id)
        handler.close()


def _loggers() -> list[str]:
    """LOGGERS, and every existing logger below one of them that prints by itself. torch is imported first (when
    installed; what runs in the block imports it anyway, and the stage line is already out): on import it gives
    "torch" and dozens of its loggers (torch.fx, torch._dynamo, ...) their own stderr handler with propagate off,
    and a torch imported only inside the block put a `W1202 ... torch/fx/_symbolic_trace.py` line on the terminal
    at every compression of a study."""
    import importlib.util

    if "torch" not in sys.modules and importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401
    out = list(LOGGERS)
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if (isinstance(lg, logging.Logger) and name.split(".")[0] in LOGGERS and name not in out
                and any(isinstance(h, logging.StreamHandler) for h in lg.handlers)):
            out.append(name)
    return out


class _LazyFileHandler(logging.FileHandler):
    def __init__(self, path: Path):
        super().__init__(str(path), mode="a", encoding="utf-8", delay=True)
        self._path = path

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None and not self._path.parent.is_dir():
            return  # the folder is not there (yet, or any more): drop rather than fail the run over a log line
        super().emit(record)


def _silence_tqdm():
    """Every tqdm bar created from now on is disabled (tqdm.auto's and subclasses' too: they call this __init__).
    Returns the original __init__ to restore, or None without tqdm."""
    try:
        import tqdm.auto  # noqa: F401 -- what transformers and llm-compressor import
        import tqdm.std
    except ImportError:
        return None
    orig = tqdm.std.tqdm.__init__

    def quiet_init(self, *args, **kwargs):  # noqa: ANN001
        kwargs["disable"] = True
        orig(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = quiet_init
    return orig


def _transformers_bars(enabled: bool) -> bool | None:
    """Turn transformers' progress bars on/off if transformers is imported; returns the previous state."""
    hf = sys.modules.get("transformers")
    if hf is None:
        try:
            from transformers.utils import logging as hf_logging  # imported anyway by what runs in the block
        except ImportError:
            return None
    else:
        from transformers.utils import logging as hf_logging
    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    return before


# llm-compressor's own log switches. Only its console level is set (to "", no console sink): with
# LLM_COMPRESSOR_LOG_FILE set it adds a JSON sink on import and one more DEBUG sink at every oneshot() call (never
# removed), so a study's log held each line two or three times and more with every compression.
_LLMC_ENV = ("LLM_COMPRESSOR_LOG_LEVEL",)
_saved_env: list[dict] = []
_blocks: list[dict[str, Any]] = []  # the open third_party_to_log blocks: their path and loguru sink id


def _loguru_to(path: Path) -> int | None:
    """llm-compressor logs through loguru to stdout. Before it is imported, its console switch is turned off (it
    reads it when it configures itself, on import, and then removes every sink); once imported, its sinks are
    replaced by one writing to `path`. attach_loguru() re-adds that sink after llm-compressor's import."""
    _saved_env.append({k: os.environ.get(k) for k in _LLMC_ENV})
    os.environ["LLM_COMPRESSOR_LOG_LEVEL"] = ""
    block: dict[str, Any] = {"path": path, "sink": None}
    _blocks.append(block)
    if "loguru" not in sys.modules:
        return None
    from loguru import logger

    logger.remove()
    block["sink"] = logger.add(str(path), level="INFO", catch=True, delay=True)
    return block["sink"]


def current_log() -> Path | None:
    """The file of the innermost open third_party_to_log block (worker processes a study starts log there too)."""
    return Path(_blocks[-1]["path"]) if _blocks else None


def attach_loguru() -> None:
    """Inside third_party_to_log: make sure loguru writes to the block's log file exactly once. Call it after
    importing llm-compressor, whose import removes every loguru sink (compress/quantize.py does, before oneshot)."""
    if not _blocks or "loguru" not in sys.modules:
        return
    from loguru import logger

    block = _blocks[-1]
    if block["sink"] is not None:
        try:
            logger.remove(block["sink"])
        except ValueError:  # llm-compressor's import removed it
            pass
    block["sink"] = logger.add(str(block["path"]), level="INFO", catch=True, delay=True)


def _loguru_restore(sink_id: int | None) -> None:
    for k, v in (_saved_env.pop() if _saved_env else {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    block = _blocks.pop() if _blocks else {"sink": sink_id}
    if block["sink"] is None:
        return
    from loguru import logger

    try:
        logger.remove(block["sink"])
    except ValueError:
        pass
    logger.add(sys.stderr, level="INFO")
