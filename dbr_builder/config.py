"""Load and validate pipeline configs (YAML) against JSON Schemas in ``schemas/``.

The top level is checked against ``schemas/pipeline.schema.json``; each stage entry
is then checked against ``schemas/stages/<stage>.schema.json`` when that file exists.
Every error names the config file, the path of the bad field (``stages[2].n``)
and what is wrong, before any work starts.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from dbr_builder.errors import ConfigError
from dbr_builder.resources import data_dir, resource_path

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Never let a config pull a secret from the environment into files or logs.
_SECRET_VARS = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD)", re.I)


def _expand_env(value: Any, where: str) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in strings; an empty result becomes None."""
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if _SECRET_VARS.search(name):
            raise ConfigError(
                f"{where}: refusing to expand secret variable ${{{name}}} into a config; "
                "secrets are read from the environment by the code that needs them"
            )
        return os.environ.get(name) or (default or "")

    out = _ENV_RE.sub(repl, value)
    return out if out != "" else None


def format_path(parts: list[Any] | Any) -> str:
    """Render a jsonschema error path as ``stages[2].teacher``."""
    s = ""
    for p in parts:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s or "<top level>"


def load_schema(name: str) -> dict[str, Any]:
    """Load ``schemas/<name>`` as a dict."""
    return json.loads(resource_path("schemas", name).read_text(encoding="utf-8"))


def non_finite(obj: Any, path: list[Any] | None = None) -> list[tuple[list[Any], float]]:
    """``(path, value)`` of every NaN or infinite number in ``obj`` (JSON Schema's bounds let NaN pass)."""
    path = path or []
    if isinstance(obj, float) and not math.isfinite(obj):
        return [(path, obj)]
    if isinstance(obj, dict):
        return [hit for k, v in obj.items() for hit in non_finite(v, [*path, k])]
    if isinstance(obj, list):
        return [hit for i, v in enumerate(obj) for hit in non_finite(v, [*path, i])]
    return []


def _message(e: Any) -> str:
    """A schema error's message; a value that fails a ``pattern`` is not echoed (it may be a pasted key)."""
    if e.validator == "pattern" and isinstance(e.instance, str):
        return f"the value does not match {e.validator_value!r}"
    return e.message


def validate(obj: Any, schema: dict[str, Any], source: str, prefix: list[Any] | None = None) -> None:
    """Validate ``obj``; raise ConfigError listing every bad field by path (NaN / infinity refused)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    lines = [f"  {format_path((prefix or []) + p)}: {v} is not a finite number" for p, v in non_finite(obj)]
    lines += [f"  {format_path((prefix or []) + list(e.absolute_path))}: {_message(e)}" for e in errors[:20]]
    if lines:
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(lines))


def validate_options(opts: dict[str, Any], stage: str, source: str, flags: dict[str, str] | None = None) -> None:
    """Check a stage's options built from the command line against its schema (before any work).

    Only the keys present are checked (None = not given; ``required`` is not enforced, the
    stage reports missing essentials itself). ``flags`` maps option keys to the command-line
    flag that set them, so the message names what the user typed (``--max-new-tokens``).
    """
    import jsonschema

    schema = stage_schema(stage)
    if schema is None:
        return
    props = schema.get("properties", {})
    obj = {k: v for k, v in opts.items() if v is not None and k in props}
    schema = {k: v for k, v in schema.items() if k != "required"}
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(obj),
                    key=lambda e: list(map(str, e.absolute_path)))
    bad = [(p, f"{v} is not a finite number") for p, v in non_finite(opts)]
    bad += [(list(e.absolute_path), _message(e)) for e in errors[:20]]
    if bad:
        lines = []
        for path, msg in bad:
            where = format_path(path)
            if path and flags and path[0] in flags:
                where = flags[path[0]]  # e.g. trial_seeds[0] was set by --trial-seed
            lines.append(f"  {where}: {msg}")
        raise ConfigError(f"{source}: invalid option(s)\n" + "\n".join(lines))


def stage_schema(stage: str) -> dict[str, Any] | None:
    """The JSON Schema for one stage's options, or None if the stage has none yet."""
    path = data_dir("schemas") / "stages" / f"{stage}.schema.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """Read a YAML file with an error that names the file and line."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    if p.is_dir():
        raise ConfigError(f"{p}: is a folder; give a YAML config file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 text file ({e.reason} at byte {e.start}); give a YAML config file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        # PyYAML calls the source "<unicode string>"; name the file instead.
        raise ConfigError(f"{p}: not valid YAML: {str(e).replace('<unicode string>', str(p))}") from None


def load_pipeline(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load, env-expand and validate a pipeline config (top level and every stage)."""
    raw = load_yaml(path)
    cfg = _expand_env(raw, "")
    validate(cfg, load_schema("pipeline.schema.json"), str(path))
    for i, st in enumerate(cfg["stages"]):
        schema = stage_schema(st["stage"])
        if schema is not None:
            # `name` is the pipeline's own key (checked by the top-level schema), not a stage option
            validate({k: v for k, v in st.items() if k != "name"}, schema, str(path), ["stages", i])
    names = [st.get("name", st["stage"]) for st in cfg["stages"]]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(
            f"{path}: stage names must be unique; give repeated stages a `name:` ({', '.join(dup)})"
        )
    return cfg


def load_stage_config(path: str | os.PathLike[str], stage: str) -> dict[str, Any]:
    """Load a stand-alone stage config (``dbr train --config FILE``) and validate it.

    The file may be a whole pipeline (the first entry of that stage is used) or a
    mapping of that stage's options.
    """
    raw = _expand_env(load_yaml(path), "")
    if isinstance(raw, dict) and "stages" in raw:
        pipe = load_pipeline(path)
        for st in pipe["stages"]:
            if st["stage"] == stage:
                merged = {k: v for k, v in pipe.items() if k not in ("stages", "name", "description")}
                merged.update(st)
                return merged
        raise ConfigError(f"{path}: pipeline has no `{stage}` stage")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of {stage} options")
    raw.setdefault("stage", stage)
    schema = stage_schema(stage)
    if schema is not None:
        validate(raw, schema, str(path))
    return raw


# --- options: the stage schemas are the one definition of every option ------------------------
#
# A stage option is defined once, in ``schemas/stages/<stage>.schema.json`` (type, range, default,
# description). Stage code gets its options through :func:`resolve` (schema defaults filled in);
# CLI flags are made from the same schema by :func:`add_option`, so a default or a range is never
# written twice.


class Options(dict):
    """A stage's resolved options: a dict (JSON-able, hashable by ``stable_hash``) with attribute access."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _defaults_of(schema: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, prop in schema.get("properties", {}).items():
        if "default" in prop:
            out[key] = copy.deepcopy(prop["default"])
        elif prop.get("type") == "object" and "properties" in prop:
            nested = _defaults_of(prop)
            if nested:
                out[key] = nested
    return out


def schema_defaults(stage: str) -> dict[str, Any]:
    """Every default the stage schema states (nested objects as nested dicts)."""
    schema = stage_schema(stage)
    return _defaults_of(schema) if schema else {}


def _merge(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    for k, v in given.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        elif v is not None or k not in out:
            out[k] = v
    return out


def resolve(stage: str, cfg: dict[str, Any]) -> Options:
    """``cfg`` with the schema's defaults filled in (``None`` = not given, so the default applies)."""
    return Options(_merge(schema_defaults(stage), dict(cfg)))


def option_schema(stage: str, key: str) -> dict[str, Any]:
    """The schema of one option; ``key`` may be dotted for a nested option (``rationalize.n``)."""
    schema = stage_schema(stage) or {}
    prop: dict[str, Any] = schema
    for part in key.split("."):
        props = prop.get("properties", {})
        if part not in props:
            raise KeyError(f"{stage}: no option {key!r} in schemas/stages/{stage}.schema.json")
        prop = props[part]
    return prop


def _number(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(text)  # argparse reports "invalid _number value"; NaN would pass range checks
    return value


_number.__name__ = "number"
_TYPES = {"integer": int, "number": _number, "string": str}


def add_option(parser: Any, stage: str, key: str, *flags: str, **kwargs: Any) -> Any:
    """Add a CLI flag for the schema option ``key``: type, choices and help come from the schema.

    The flag's default is ``None`` (not given): the schema's default applies in :func:`resolve`.
    ``flags`` default to ``--key-with-dashes``; ``kwargs`` go to ``add_argument`` (e.g. ``action``).
    """
    prop = option_schema(stage, key)
    types = prop.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    item = prop.get("items", {}) if "array" in types else prop
    kw: dict[str, Any] = {"dest": key.replace(".", "__"), "default": None}
    enum = item.get("enum")
    if enum is not None:
        kw["choices"] = [e for e in enum if e is not None]
    if "boolean" in types and "array" not in types:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        item_types = item.get("type")
        item_types = [item_types] if isinstance(item_types, str) else list(item_types or [])
        conv = next((_TYPES[t] for t in ("integer", "number", "string") if t in item_types), None)
        if conv is not None and not (conv is str and enum):
            kw["type"] = conv
        if "array" in types and "action" not in kwargs:
            kw["nargs"] = "+"
    text = prop.get("description", "")
    if "default" in prop and prop["default"] not in (None, [], {}):
        d = prop["default"]
        text += f" (default {' '.join(map(str, d)) if isinstance(d, list) else d})"
    kw["help"] = text.strip() or None
    kw.update(kwargs)
    if kw.get("action") in ("append", "store_true", "store_false", argparse.BooleanOptionalAction):
        kw.pop("nargs", None)
    if kw.get("action") in ("store_true", "store_false"):
        kw.pop("type", None)
        kw.pop("choices", None)
    action = parser.add_argument(*(flags or ("--" + key.replace("_", "-").replace(".", "-"),)), **kw)
    # remember which option each flag sets (options_from_args, and the one-definition test)
    registry = parser.__dict__.setdefault("_dbr_options", {})
    registry[kw["dest"]] = (stage, key, action.option_strings[0] if action.option_strings else key)
    parser.set_defaults(_dbr_options=registry)
    return action


def options_from_args(args: Any) -> dict[str, Any]:
    """The schema options the user gave on the command line (nested by their dotted keys)."""
    out: dict[str, Any] = {}
    for dest, (_stage, key, _flag) in getattr(args, "_dbr_options", {}).items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def flags_of(args: Any) -> dict[str, str]:
    """Top-level option key -> the flag that sets it (for error messages naming what the user typed)."""
    return {key.split(".")[0]: flag for _s, key, flag in getattr(args, "_dbr_options", {}).values()}
