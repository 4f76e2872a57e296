"""A model folder's chat template, rendered in a sandbox with bounds.

A chat template is code that comes with the model (tokenizer_config.json or chat_template.jinja): Jinja with
loops, macros and string operations. transformers renders it in Jinja's ImmutableSandboxedEnvironment, which
stops attribute escapes, but sets no limit on work: two nested ``range(100000)`` loops hang the run before any
generation, and an escape attempt ends in a SecurityError traceback. Here the same template is rendered with
the same environment settings as transformers (trim_blocks, lstrip_blocks, loopcontrols, its ``tojson`` and
``raise_exception``, the tokenizer's special tokens as variables), so the text is identical (tested against
``apply_chat_template``), plus:

  * a work budget: every loop step over a ``range`` and every call counts; past MAX_STEPS the render stops;
  * a time budget (MAX_SECONDS, checked at every step);
  * bounded repetition (``'x' * n``, ``n ** m``) and ranges;
and every failure of the template (a bound, a sandbox refusal, an error the template raises) is one
UsageError line naming the model folder.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from typing import Any

from comptrust.errors import UsageError

MAX_STEPS = 1_000_000  # a chat template of a real model takes a few hundred steps for a DecodingTrust prompt
MAX_SECONDS = 10.0
MAX_RANGE = 100_000
MAX_REPEAT = 1_000_000  # characters / items a * may produce


class TemplateBudgetExceeded(Exception):
    pass


class _Budget:
    def __init__(self) -> None:
        self.steps = 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_STEPS:
            raise TemplateBudgetExceeded(f"more than {MAX_STEPS:,} steps")
        if self.steps % 64 == 0 and time.monotonic() > self.deadline:
            raise TemplateBudgetExceeded(f"more than {MAX_SECONDS:g} s")


_local = threading.local()  # the render in progress in this thread


def _budget() -> _Budget:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else _Budget()


@contextmanager
def _bounded() -> Iterator[None]:
    """The render's budget; in the main thread also a wall-clock alarm, which stops what no step counts (a loop
    over a long string nested in another)."""
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(_Budget())
    alarm = threading.current_thread() is threading.main_thread() and len(stack) == 1
    if alarm:
        def on_alarm(signum: int, frame: Any) -> None:
            raise TemplateBudgetExceeded(f"more than {MAX_SECONDS:g} s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, MAX_SECONDS)
    try:
        yield
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        stack.pop()


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 -- jinja's signature
            _budget().step()
            return super().call(__context, __obj, *args, **kwargs)

        def call_binop(self, context, operator, left, right):
            _budget().step()
            if operator == "**" and isinstance(right, int) and abs(right) > 64 and not isinstance(left, float):
                raise TemplateBudgetExceeded("an exponent above 64")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                        raise TemplateBudgetExceeded(f"a repetition of more than {MAX_REPEAT:,} items")
            return super().call_binop(context, operator, left, right)

    def bounded_range(*args: int) -> Any:
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise TemplateBudgetExceeded(f"a range of more than {MAX_RANGE:,} items")

        def steps():
            b = _budget()
            for i in r:
                b.step()
                yield i

        return steps()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # transformers' filter: no HTML escaping
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["range"] = bounded_range
    return env.from_string(source)


def render_chat(tok: Any, messages: list[dict[str, str]], where: str) -> str:
    """The prompt text of `messages` under tok's chat template, with the generation prompt; `where` (the
    model folder) names the template in errors."""
    import jinja2
    from jinja2.sandbox import SecurityError

    source = tok.chat_template
    if isinstance(source, dict):  # several named templates: transformers uses "default"
        source = source.get("default") or next(iter(source.values()))
    try:
        template = _compile(source)
    except jinja2.TemplateSyntaxError as e:
        raise UsageError(f"the chat template of {where} is malformed (line {e.lineno}: {e.message})") from None
    try:
        with _bounded():
            return template.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                   **tok.special_tokens_map)
    except TemplateBudgetExceeded as e:
        raise UsageError(f"the chat template of {where} was stopped: it needs {e} to render one prompt (a template "
                         "that loops without end, or one made to exhaust the machine)") from None
    except SecurityError as e:
        raise UsageError(f"the chat template of {where} tried something the sandbox forbids ({e}); comptrust does "
                         "not run it") from None
    except RecursionError:
        raise UsageError(f"the chat template of {where} recurses without end") from None
    except jinja2.TemplateError as e:
        raise UsageError(f"the chat template of {where} failed: {type(e).__name__}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError) as e:
        raise UsageError(f"the chat template of {where} failed: {type(e).__name__}: {e}") from None
