"""llm-compressor recipes (``comptrust compress --recipe recipe.yaml``; a study variant ``{recipe: FILE}``).

A recipe is checked before any model loads: the YAML is parsed with line numbers, each modifier is built with
llm-compressor's own ModifierFactory (the one its Recipe loader uses; it needs no model), and then the whole
recipe goes through ``Recipe.from_dict`` (its ordering rules, e.g. AWQ needs a later quantization modifier).
A bad recipe is one line, ``FILE:LINE: what is wrong``.

Identity: a recipe is known by its content, not its path. The fingerprint is the sha256 of the normalised text:
the parsed YAML written as canonical JSON (sorted keys, no spacing), so comments, key order and indentation do
not change it, and any changed value does. Checkpoints and study units are keyed by it.

Nominal size: where the recipe states it, the weight bits and group size (a ``scheme`` preset such as W4A16 or
``config_groups``) and the sparsity and N:M structure (``sparsity`` / ``mask_structure`` of a pruning
modifier) are read for the report's curves; what it does not state stays unknown (None).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from comptrust.errors import UsageError

_PRUNING_HINT = "Pruning"  # llm-compressor's pruning modifiers: SparseGPTModifier, WandaPruningModifier, ...


@dataclass
class RecipeInfo:
    path: str
    text: str
    sha256: str
    modifiers: list[str] = field(default_factory=list)
    bits: int | None = None
    group_size: int | None = None  # 0 = one scale per output row
    sparsity: float | None = None
    structure: str | None = None  # comptrust's N:M meaning (at most N nonzero per M) or "unstructured"
    quantizes: bool = False
    prunes: bool = False


def normalised_sha256(data: Any) -> str:
    body = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def _line(node: yaml.Node | None) -> int:
    return node.start_mark.line + 1 if node is not None else 1


def _children(node: yaml.Node | None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:240]


def _validation_message(e: Exception) -> tuple[str | None, str]:
    """(the argument at fault, a one-line message) of a pydantic ValidationError or any other error."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            err = errors()[0]
            loc = [str(x) for x in err.get("loc", ())]
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            return (loc[0] if loc else None), (f"{'.'.join(loc)}: {msg}" if loc else msg)
        except Exception:  # noqa: BLE001 - fall back to the text
            pass
    return None, _first_line(e)


def load_recipe(path: str | Path) -> RecipeInfo:
    """Read, parse and validate an llm-compressor recipe; UsageError ``FILE:LINE: ...`` if it is bad."""
    p = Path(path).expanduser()
    where = str(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--recipe {where} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"--recipe {where} is a directory, not a recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--recipe {where}: cannot read it ({e})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or _first_line(e)
        raise UsageError(f"{where}{line}: malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where}:{_line(root)}: expected a mapping of stages such as "
                         "'quant_stage: {quant_modifiers: {GPTQModifier: {...}}}'")

    from comptrust.compress.quantize import _quiet_llmcompressor
    from comptrust.extras import require

    require(f"--recipe {where}", "compress")  # the recipe is read by llm-compressor itself
    _quiet_llmcompressor()
    from llmcompressor.modifiers.factory import ModifierFactory
    from llmcompressor.recipe import Recipe

    if not ModifierFactory._loaded:
        ModifierFactory.refresh()
    known = sorted({*ModifierFactory._main_registry, *ModifierFactory._experimental_registry,
                    *ModifierFactory._registered_registry})
    info = RecipeInfo(path=where, text=text, sha256=normalised_sha256(data))
    built: list[Any] = []
    stages = _children(root)
    for stage_key, (sk, sv) in stages.items():
        if not stage_key.endswith("_stage"):
            continue
        if not isinstance(sv, yaml.MappingNode):
            raise UsageError(f"{where}:{_line(sk)}: {stage_key}: expected a mapping of '<name>_modifiers' groups")
        for group_key, (gk, gv) in _children(sv).items():
            if not group_key.endswith("_modifiers"):
                continue
            if not isinstance(gv, yaml.MappingNode):
                raise UsageError(f"{where}:{_line(gk)}: {group_key}: expected a mapping of modifiers "
                                 "(GPTQModifier: {...})")
            for mod_type, (mk, mv) in _children(gv).items():
                args = data[stage_key][group_key][mod_type]
                if args is None:
                    args = {}
                if not isinstance(args, dict):
                    raise UsageError(f"{where}:{_line(mk)}: {mod_type}: expected a mapping of its arguments")
                if mod_type not in known:
                    import difflib

                    hint = difflib.get_close_matches(mod_type, known, n=1)
                    did = f" (did you mean '{hint[0]}'?)" if hint else ""
                    raise UsageError(f"{where}:{_line(mk)}: unknown llm-compressor modifier '{mod_type}'{did}")
                arg_lines = {k: _line(kn) for k, (kn, _) in _children(mv).items()}
                try:
                    mod = ModifierFactory.create(mod_type, group=args.get("group", group_key[:-len("_modifiers")]),
                                                 allow_registered=True, allow_experimental=True,
                                                 **{k: v for k, v in args.items() if k != "group"})
                except Exception as e:  # noqa: BLE001 - pydantic or the modifier's own checks
                    arg, msg = _validation_message(e)
                    line = arg_lines.get(arg or "", _line(mk))
                    raise UsageError(f"{where}:{line}: {mod_type}: {msg}") from None
                _check_head(mod, mod_type, where, arg_lines.get("ignore", _line(mk)))
                built.append(mod)
                info.modifiers.append(mod_type)
                _derive(info, mod, mod_type, where, _line(mk))
    if not built:
        raise UsageError(f"{where}:{_line(root)}: no llm-compressor modifiers found; a recipe looks like "
                         "'quant_stage: {quant_modifiers: {GPTQModifier: {scheme: W4A16, targets: [Linear], "
                         "ignore: [lm_head]}}}'")
    try:
        Recipe.from_dict(data)
    except Exception as e:  # noqa: BLE001 - the library's whole-recipe rules
        _, msg = _validation_message(e)
        first = next(iter(stages.values()))[0]
        raise UsageError(f"{where}:{_line(first)}: {msg}") from None
    return info


def _check_head(mod: Any, mod_type: str, where: str, line: int) -> None:
    """comptrust keeps the output head dense (its checks refuse a changed one): say so before any model loads."""
    from llmcompressor.modifiers.quantization import QuantizationMixin

    if not isinstance(mod, QuantizationMixin):
        return
    ignore = mod.ignore or []
    if isinstance(ignore, str):
        ignore = [ignore]
    if not any("lm_head" in str(i) for i in ignore):
        raise UsageError(f"{where}:{line}: {mod_type}: add 'ignore: [lm_head]' (comptrust keeps the output head "
                         "and the embeddings dense, and refuses a checkpoint that changed them)")


def _scheme_weights(mod: Any) -> list[Any]:
    """The weight QuantizationArgs a quantization modifier states (scheme presets or config_groups)."""
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    out: list[Any] = []
    groups = getattr(mod, "config_groups", None) or {}
    for g in groups.values():
        s = g if isinstance(g, QuantizationScheme) else QuantizationScheme.model_validate(g)
        out.append(s.weights)
    scheme = getattr(mod, "scheme", None)
    if isinstance(scheme, str):
        scheme = {scheme: ["Linear"]}
    if isinstance(scheme, dict):
        for name, targets in scheme.items():
            if isinstance(targets, dict):  # an inline scheme
                out.append(QuantizationScheme.model_validate({"targets": ["Linear"], **targets}).weights)
            else:
                out.append(preset_name_to_scheme(str(name), list(targets) if targets else ["Linear"]).weights)
    return [w for w in out if w is not None]


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def _derive(info: RecipeInfo, mod: Any, mod_type: str, where: str, line: int) -> None:
    from llmcompressor.modifiers.quantization import QuantizationMixin

    if isinstance(mod, QuantizationMixin):
        info.quantizes = True
        try:
            weights = _scheme_weights(mod)
        except Exception as e:  # noqa: BLE001 - an unknown preset name
            raise UsageError(f"{where}:{line}: {mod_type}: {_first_line(e)}") from None
        bits = {int(w.num_bits) for w in weights}
        groups = {0 if str(getattr(w.strategy, "value", w.strategy)) == "channel" else w.group_size for w in weights}
        if len(bits) == 1:
            info.bits = bits.pop()
        if len(groups) == 1 and None not in groups:
            info.group_size = groups.pop()
    sparsity = getattr(mod, "sparsity", None)
    if _PRUNING_HINT in mod_type or "SparseGPT" in mod_type or sparsity is not None:
        if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
            info.prunes = True
            info.sparsity = float(sparsity)
            mask = str(getattr(mod, "mask_structure", "0:0") or "0:0")
            m = _NM.match(mask)
            if m and int(m.group(2)) > 0 and int(m.group(1)) > 0:
                zeros, size = int(m.group(1)), int(m.group(2))
                # llm-compressor's mask_structure counts zeros ("2:4": 2 zeros in 4); comptrust counts nonzeros
                info.structure = f"{size - zeros}:{size}"
                info.sparsity = zeros / size
            else:
                info.structure = "unstructured"
