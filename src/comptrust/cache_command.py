"""`comptrust cache info|clear`: what comptrust keeps in $COMPTRUST_HOME for later runs, and a way to drop it."""

from __future__ import annotations

import json
import shutil

import typer

from comptrust.paths import home

HELP = """What comptrust keeps in $COMPTRUST_HOME between runs.

  study-cache/  checkpoints and generations shared by studies,
                keyed by fingerprints (COMPTRUST_STUDY_CACHE=off
                turns it off for a run)
  llama-cpp/    llama.cpp libraries built by scripts/llamacpp.sh
  models/       converted GGUF models (not cleared here)

[bold]Examples[/bold]
  comptrust cache info
  comptrust cache clear               # the study cache
  comptrust cache clear --llama-cpp   # and the llama.cpp builds
"""

cache_app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False)


def _llama_dir():
    return home() / "llama-cpp"


def _size(p) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


@cache_app.command("info")
def info_command(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """What the caches hold."""
    from comptrust.study import reuse

    d = reuse.describe()
    d["llama_cpp_builds"] = sorted(p.name for p in _llama_dir().glob("*") if p.is_dir())
    d["llama_cpp_bytes"] = _size(_llama_dir())
    if as_json:
        print(json.dumps(d, indent=2))
        return
    gens = "unreadable" if d["generations"] is None else d["generations"]
    print(f"study cache {d['root']}: {d['checkpoints']} checkpoints, {gens} generations, "
          f"{d['bytes'] / 2**20:.1f} MiB")
    print(f"llama.cpp builds {_llama_dir()}: {len(d['llama_cpp_builds'])} ({d['llama_cpp_bytes'] / 2**20:.1f} MiB)")


@cache_app.command("clear")
def clear_command(
    llama_cpp: bool = typer.Option(False, "--llama-cpp", help="Also remove the compiled llama.cpp libraries."),
) -> None:
    """Empty the study cache (studies that used a cached checkpoint keep their own copy)."""
    from comptrust.study import reuse

    was = reuse.clear()
    gens = "unreadable" if was["generations"] is None else was["generations"]
    print(f"cleared {was['root']}: {was['checkpoints']} checkpoints, {gens} generations, "
          f"{was['bytes'] / 2**20:.1f} MiB")
    if llama_cpp:
        n = _size(_llama_dir())
        shutil.rmtree(_llama_dir(), ignore_errors=True)
        print(f"cleared {_llama_dir()}: {n / 2**20:.1f} MiB")


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")
