"""A managed llama.cpp server (llama-cpp-python's OpenAI-compatible server) for evaluating GGUF files as served.

    with LlamaCppServer("model.Q4_K_M.gguf") as base_url:      # http://127.0.0.1:<port>/v1
        ...                                                  # any OpenAI client
    with gguf_engine("model.Q4_K_M.gguf") as engine:          # an Engine for comptrust.evaluate
        evaluate(engine, engine.describe(), ["stereotype"], opts, out)
    quantize_gguf("model.Q4_1.gguf", "model.Q8_0.gguf", "Q8_0")

The server is `python -m llama_cpp.server --model <gguf> --host 127.0.0.1 --port <p> --model_alias <alias>
--n_ctx <n> --n_threads <t>` run by this interpreter. No --chat_format is given: llama-cpp-python then applies the
chat template embedded in the GGUF (tokenizer.chat_template), the one transformers' GGUF loader uses too. It
serves one request at a time (a lock around its one model), so gguf_engine uses concurrency 2: one request
running, one queued.

Needs llama-cpp-python[server]: `bash scripts/llamacpp.sh` (what the test set-up runs: only libllama + ggml are
compiled, once per machine) or `pip install 'comptrust[serve]'` (pip compiles all of llama.cpp).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from comptrust.cpu import cpu_threads
from comptrust.errors import RuntimeFailure, UsageError

INSTALL_HINT = ("bash scripts/llamacpp.sh in the venv (compiles only what comptrust loads, cached in $COMPTRUST_HOME), "
                "or pip install 'llama-cpp-python[server]' (compiles all of llama.cpp)")

# Sampling knobs whose llama.cpp defaults differ from transformers' (repeat_penalty 1.1, min_p 0.05, top_k 40):
# set to transformers' behaviour so served and in-process evaluations decode the same way (top_k 50 is
# transformers' default and what HFEngine samples with when the model's generation config sets none).
LLAMACPP_NEUTRAL_SAMPLING = {"repeat_penalty": 1.0, "min_p": 0.0, "top_k": 50}

_LIVE: weakref.WeakSet[LlamaCppServer] = weakref.WeakSet()


def _stop_all() -> None:
    for s in list(_LIVE):
        s.stop()


atexit.register(_stop_all)


def llama_cpp_available() -> str | None:
    """None if llama-cpp-python and its server extra can be imported, else why not (one line)."""
    missing = [m for m in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
               if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed: {INSTALL_HINT}"
    # the Python package without its compiled library (a build that failed half-way) imports with an OSError;
    # say so here rather than fail every served test with a traceback
    spec = importlib.util.find_spec("llama_cpp")
    lib_dir = os.environ.get("LLAMA_CPP_LIB_PATH") or (
        os.path.join(next(iter(spec.submodule_search_locations)), "lib") if spec and spec.submodule_search_locations
        else "")
    if not any(os.path.isfile(os.path.join(lib_dir, n)) for n in ("libllama.so", "libllama.dylib", "llama.dll")):
        return f"llama_cpp is installed without its compiled library (no libllama in {lib_dir}): {INSTALL_HINT}"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LlamaCppServer:
    """Context manager: starts the server, waits until GET /v1/models answers, yields the base URL
    (http://127.0.0.1:<port>/v1), and stops it on exit (SIGTERM, then SIGKILL after `stop_grace` s), also on
    exceptions and KeyboardInterrupt. start()/stop() can be called directly (a restart keeps the port).

    n_ctx: context size (default 8192; 0 = the model's training context). n_threads: default
    comptrust.cpu.cpu_threads() (OMP_NUM_THREADS when set, else all cores).
    log_path: where the server's output goes (default a temporary file, removed on stop unless it failed).
    """

    def __init__(
        self,
        gguf_path: str | os.PathLike,
        port: int | None = None,
        n_ctx: int = 8192,
        n_threads: int | None = None,
        alias: str | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 180.0,
        stop_grace: float = 10.0,
        log_path: str | os.PathLike | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.gguf_path = Path(gguf_path).expanduser()
        if not self.gguf_path.is_file():
            raise UsageError(f"{self.gguf_path}: no such GGUF file")
        with open(self.gguf_path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UsageError(f"{self.gguf_path}: not a GGUF file")
        if n_ctx < 0:
            raise UsageError(f"n_ctx {n_ctx}: must be 0 (the model's) or positive")
        self.port = port
        self.n_ctx = n_ctx
        self.n_threads = n_threads or cpu_threads()
        self.alias = alias or self.gguf_path.stem
        self.host = host
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else None
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self._mutex = threading.Lock()

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeFailure("the llama.cpp server was never started")
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.gguf_path),
            "--host", self.host,
            "--port", str(self.port),
            "--model_alias", self.alias,
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads),
            "--verbose", "False",
            *self.extra_args,
        ]

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> str:
        why = llama_cpp_available()
        if why:
            raise UsageError(f"cannot serve {self.gguf_path.name}: {why}")
        with self._mutex:
            if self.proc is not None and self.proc.poll() is None:
                return self.base_url
            chosen = self.port is None
            for attempt in range(3 if chosen else 1):
                if chosen:
                    self.port = free_port(self.host)
                try:
                    self._spawn_and_wait()
                    return self.base_url
                except RuntimeFailure as e:
                    # another process took the port between free_port() and the server's bind: another port
                    if chosen and attempt < 2 and "address already in use" in str(e).lower():
                        continue
                    raise
        raise AssertionError("unreachable")

    def _spawn_and_wait(self) -> None:
        if self.log_path is None or self._own_log:
            fd, name = tempfile.mkstemp(prefix="comptrust-llamacpp-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 -- the server writes to it until stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT, env=env
            )
        except OSError as e:
            self._close_log()
            raise RuntimeFailure(f"cannot start the llama.cpp server: {e}") from None
        _LIVE.add(self)
        try:
            self._wait_ready()
        except BaseException:  # a failed start or a KeyboardInterrupt while waiting: no server left behind
            self._terminate()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        url = f"{self.base_url}/models"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
        while True:
            rc = self.proc.poll() if self.proc else None
            if rc is not None:
                raise RuntimeFailure(
                    f"the llama.cpp server for {self.gguf_path.name} exited with code {rc} while starting: "
                    f"{self.log_tail()}"
                )
            try:
                with opener.open(url, timeout=5) as r:
                    if r.status == 200:
                        json.loads(r.read())
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeFailure(
                    f"the llama.cpp server for {self.gguf_path.name} did not answer {url} within "
                    f"{self.startup_timeout:g} s: {self.log_tail()}"
                )
            time.sleep(0.2)

    def log_tail(self, n: int = 3) -> str:
        try:
            lines = [ln.strip() for ln in Path(self.log_path).read_text(errors="replace").splitlines() if ln.strip()]
        except (OSError, TypeError):
            return "(no log)"
        return " | ".join(lines[-n:]) or "(empty log)"

    def _terminate(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.proc = None
        _LIVE.discard(self)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        with self._mutex:
            self._terminate()
            if self._own_log and self.log_path is not None:
                with contextlib.suppress(OSError):
                    self.log_path.unlink()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def gguf_fingerprint(path: Path) -> str:
    from comptrust.models.fingerprint import file_sha256

    return file_sha256(path)


@contextlib.contextmanager
def gguf_engine(
    gguf_path: str | os.PathLike,
    *,
    n_ctx: int = 8192,
    n_threads: int | None = None,
    concurrency: int = 2,
    timeout: float = 600,
    max_retries: int = 3,
    sampling: dict[str, Any] | None = None,
    port: int | None = None,
) -> Iterator[Any]:
    """Serve a GGUF with llama.cpp and yield an OpenAIEngine on it; the server stops when the block ends.

    The engine's fingerprint is "llamacpp:<sha256 of the GGUF>:llama-cpp-python-<version>:gguf:<id>" plus the
    sampling overrides (not the random port), so cached generations are reused across runs of the same file
    and never shared with the HF engine's or another llama.cpp version's. sampling: llama.cpp-specific request
    fields (default LLAMACPP_NEUTRAL_SAMPLING: no repeat penalty, no min-p, top-k 50, as transformers samples).
    engine.describe() is the info dict for evaluate().
    """
    from comptrust.engine.openai_engine import OpenAIEngine

    why = llama_cpp_available()
    if why:
        raise UsageError(f"cannot serve {Path(gguf_path).name}: {why}")
    import llama_cpp

    path = Path(gguf_path).expanduser()
    server = LlamaCppServer(path, port=port, n_ctx=n_ctx, n_threads=n_threads, alias="gguf")

    digest = gguf_fingerprint(path)
    t0 = time.time()
    with server as url:
        engine = OpenAIEngine(
            url, "gguf", api_key_env="", concurrency=concurrency, timeout=timeout, max_retries=max_retries,
            extra_body=LLAMACPP_NEUTRAL_SAMPLING if sampling is None else sampling,
            identity=f"llamacpp:{digest}:llama-cpp-python-{llama_cpp.__version__}",
        )
        engine.load_seconds = time.time() - t0
        engine.meta = {
            "name": path.stem,
            "kind": "gguf-served",
            "spec": str(path),
            "path": str(path.resolve()),
            "gguf_sha256": digest,
            "engine": "llamacpp-server",
            "llama_cpp_python": llama_cpp.__version__,
            "n_ctx": n_ctx,
            "n_threads": server.n_threads,
        }
        try:
            yield engine
        finally:
            engine.close()


# -- quantization ------------------------------------------------------------------------------------------------
def ftype_names() -> list[str]:
    """The llama_ftype names this llama-cpp-python knows (Q8_0, Q4_K_M, Q2_K, ...)."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    return sorted(n[len(prefix):] for n in dir(llama_cpp) if n.startswith(prefix))


def quantize_gguf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    ftype: str,
    *,
    allow_requantize: bool = True,
    nthread: int | None = None,
    pure: bool = False,
) -> dict[str, Any]:
    """Quantize GGUF src to dst with llama.cpp's quantizer (llama_model_quantize), e.g. ftype "Q8_0", "Q4_K_M".

    allow_requantize: the source may itself be quantized (the embedded model is Q4_1): its tensors are then
    dequantized and quantized again, compounding the errors of both formats. Tensors whose row length is not a
    multiple of a k-quant's 256-value super-block fall back to a legacy type (llama.cpp decides; see its log).
    Returns {"dst", "ftype", "seconds", "bytes", "tensor_types"}. Writes to a temporary file, renamed at the end.
    """
    why = llama_cpp_available()
    if why and "llama_cpp" in why:
        raise UsageError(f"cannot quantize: {why}")
    import llama_cpp

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_file():
        raise UsageError(f"{src}: no such GGUF file")
    name = ftype.upper()
    code = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if code is None:
        raise UsageError(f"quantization type {ftype!r}: expected one of {', '.join(ftype_names())}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = code
    params.allow_requantize = allow_requantize
    params.nthread = nthread or cpu_threads()
    params.pure = pure
    t0 = time.time()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        with contextlib.suppress(OSError):
            tmp.unlink()
        hint = "" if allow_requantize else " (a quantized source needs allow_requantize=True)"
        raise RuntimeFailure(f"llama.cpp could not quantize {src.name} to {name} (code {rc}){hint}")
    tmp.replace(dst)
    return {
        "dst": str(dst),
        "ftype": name,
        "seconds": round(time.time() - t0, 2),
        "bytes": dst.stat().st_size,
        "tensor_types": gguf_tensor_types(dst),
    }


def gguf_tensor_types(path: str | os.PathLike) -> dict[str, int]:
    """Count of tensors per quantization type in a GGUF (via the gguf package, a core dependency)."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        k = t.tensor_type.name
        counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items()))

