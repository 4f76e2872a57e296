"""Print the data files that the lite profile reads, relative to a shared data folder holding decodingtrust/ and
mmlu/ (one per line): what a machine without the full data needs to carry.

    python bench/lite_files.py ../shared/data > files.txt

Found by loading every perspective with an audit hook on open(), so the list follows the loaders as they change.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data").resolve()
    opened: set[str] = set()

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            p = os.path.abspath(os.fsdecode(args[0]))
            if p.startswith(str(root) + os.sep):
                opened.add(p)

    sys.addaudithook(hook)
    from comptrust import perspectives as registry
    from comptrust.evaluate import load_perspectives
    from comptrust.perspectives.base import EvalOptions

    opts = EvalOptions(data_dir=root / "decodingtrust", profile="lite", mmlu_dir=root / "mmlu")
    loaded, not_run = load_perspectives(list(registry.REGISTRY), opts)
    for name, why in not_run.items():
        print(f"warning: {name} not loaded: {why}", file=sys.stderr)
    print(f"{sum(len(ld.items) for _, ld, _ in loaded.values())} items in {len(loaded)} perspectives",
          file=sys.stderr)
    for p in sorted(opened):
        if os.path.isfile(p):
            print(os.path.relpath(p, root))


if __name__ == "__main__":
    main()
