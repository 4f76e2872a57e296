"""Error types that the CLI turns into one-line messages and exit codes.

UsageError (exit 2): the user gave something bad (unknown model, malformed file, bad option value).
RuntimeFailure (exit 1): the input was fine but the work failed (out of memory, NaN weights, server gone).
Both carry a message that names the bad thing; nothing already stored is rolled back by raising them.
"""


class ComptrustError(Exception):
    exit_code = 1


class UsageError(ComptrustError):
    exit_code = 2


class RuntimeFailure(ComptrustError):
    exit_code = 1


# -- interrupts that nothing may swallow ------------------------------------------------------------------------
import threading as _threading

INTERRUPTED = _threading.Event()
"""Set by the CLI's SIGINT / SIGTERM handlers before they raise KeyboardInterrupt. A second line of defence: a
KeyboardInterrupt that lands inside a finalizer or a C library's callback is printed as "Exception ignored" and lost;
the flag is not, and check_interrupted() at every unit boundary turns it back into the interrupt. (The study that
ran on and exited 0 in issue 21 had inherited SIGINT as ignored; cli.main now installs its handler over that.)"""


def check_interrupted() -> None:
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


# -- secrets never leave the process ---------------------------------------------------------------------------
import os as _os
import re as _re

REDACTED = "[redacted]"
# names of environment variables whose values are secrets (API keys of served models, Perspective, the Hub)
_SECRET_NAME = _re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH)", _re.IGNORECASE)
_SECRET_PATTERNS = [
    # header echoes: "Authorization: Bearer sk-...", "'authorization': 'Basic ...'", "x-api-key: ..."
    _re.compile(r"""(?i)((?:proxy-)?authorization["']?\s*[:=]\s*["']?)(?:(?:bearer|basic|token)\s+)?[^\s"',;}]+"""),
    _re.compile(r"""(?i)((?:x-)?api[-_]?key["']?\s*[:=]\s*["']?)[^\s"',;}&]+"""),
    _re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]{8,}"),
    _re.compile(r"(?i)([?&](?:api[-_]?key|key|token|access_token)=)[^&\s\"']+"),
    _re.compile(r"(://[^/\s:@]+:)[^@/\s]+(@)"),  # user:password@host in URLs
    _re.compile(r"()\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}"),  # OpenAI-style keys
    _re.compile(r"()\bhf_[A-Za-z0-9]{20,}"),  # Hugging Face tokens
]


def _secret_values() -> list[str]:
    return sorted(
        {v for k, v in _os.environ.items() if _SECRET_NAME.search(k) and v and len(v) >= 8}, key=len, reverse=True
    )


def redact(text: str) -> str:
    """`text` with secrets replaced by [redacted]: the values of secret-looking environment variables
    ($OPENAI_API_KEY, $PERSPECTIVE_API_KEY, $HF_TOKEN, ...) wherever they appear, and anything shaped like a
    credential (Authorization headers, api_key=..., Bearer tokens, sk-... keys, passwords in URLs). Applied to
    every error that comptrust prints or stores: a served model's error body may echo the request's headers."""
    if not text:
        return text
    for v in _secret_values():
        text = text.replace(v, REDACTED)
    for pat in _SECRET_PATTERNS:
        text = pat.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED
                       + (m.group(2) if (m.lastindex or 0) >= 2 else ""), text)
    return text


def one_line(text: str) -> str:
    """Error text flattened to one line (embedded newlines, e.g. from a library's message, become spaces)."""
    return " ".join(str(text).split())
