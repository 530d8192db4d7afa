"""One definition per option: the stage schemas hold every default; CLI flags derive from them."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from dbr_builder import pipeline
from dbr_builder.cli import build_parser
from dbr_builder.config import add_option, options_from_args, resolve, schema_defaults, stage_schema

ROOT = Path(__file__).resolve().parents[1]

# Flags that are about this invocation, not stage options (where to work, what to read, how to show it).
CLI_ONLY = {
    "synth": {"root", "force"},
    "download": {"dataset", "root"},
    "index": {"dataset", "root", "workdir"},
    "generate": {"dataset", "workdir", "merge_from", "no_progress"},
    "filter": {"dataset", "workdir", "config"},
    "publish": {"workdir", "no_write"},
    "train": {"config", "workdir", "push", "private", "dry_run"},
    "eval": {"config", "workdir", "model", "adapter", "name", "no_progress"},
    "view": {"workdir"},
}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("verb", list(pipeline.STAGES))
def test_every_flag_maps_to_a_schema_option(verb: str) -> None:
    p = _subparsers()[verb]
    registry = p.__dict__.get("_dbr_options", {})
    props = stage_schema(verb)["properties"]
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.dest in registry:
            _stage, key, _flag = registry[action.dest]
            assert key.split(".")[0] in props, f"dbr {verb} {action.option_strings}: {key} not in the schema"
            # the default lives in the schema only: the flag's own default means "not given"
            assert action.default is None, f"dbr {verb} {action.option_strings}: default {action.default!r}"
        else:
            assert action.dest in CLI_ONLY[verb], (
                f"dbr {verb} {action.option_strings or action.dest}: not a schema option; define it in "
                f"schemas/stages/{verb}.schema.json and add it with config.add_option")


def _prop_defaults(schema: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in schema.get("properties", {}).items():
        if "default" in v:
            out.append(prefix + k)
        out += _prop_defaults(v, f"{prefix}{k}.")
    return out


@pytest.mark.parametrize("verb", list(pipeline.STAGES))
def test_schema_defaults_are_valid_and_the_only_ones(verb: str) -> None:
    import jsonschema

    schema = stage_schema(verb)
    defaults = schema_defaults(verb)
    # each default satisfies its own property schema (a default out of its own range would be a bug)
    for key, value in defaults.items():
        prop = {"$defs": schema.get("$defs", {}), **schema["properties"][key]}
        errors = [e.message for e in jsonschema.Draft202012Validator(prop).iter_errors(value)]
        assert not errors, f"{verb}.{key}: default {value!r}: {errors}"
    assert resolve(verb, {}) == defaults


def test_no_stage_module_keeps_its_own_defaults_table() -> None:
    """A ``DEFAULTS = {...}`` literal in a stage would be a second definition of the schema's defaults."""
    offenders = []
    for path in [*(ROOT / "dbr_builder" / "stages").rglob("*.py"), *(ROOT / "trainers").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
                if any(n.endswith("DEFAULTS") for n in names) and isinstance(node.value, ast.Dict):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_add_option_derives_type_choices_help_and_leaves_the_default_to_the_schema() -> None:
    p = argparse.ArgumentParser()
    add_option(p, "generate", "n")
    add_option(p, "generate", "prompt")
    add_option(p, "generate", "splits")
    add_option(p, "filter", "rationalize.n", "--rationalize-n")
    n = next(a for a in p._actions if a.dest == "n")
    assert n.type is int and n.default is None and "(default 4)" in n.help
    assert next(a for a in p._actions if a.dest == "prompt").choices == ["teacher", "rationalize"]
    args = p.parse_args(["--n", "3", "--splits", "in", "out", "--rationalize-n", "5"])
    assert options_from_args(args) == {"n": 3, "splits": ["in", "out"], "rationalize": {"n": 5}}
    assert resolve("filter", options_from_args(args))["rationalize"] == {"enabled": False, "teacher": None, "n": 5}
    with pytest.raises(SystemExit):
        p.parse_args(["--prompt", "nope"])


def test_nan_and_inf_are_refused_at_parse_time(capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    add_option(p, "generate", "temperature")
    for bad in ("nan", "inf", "-inf"):
        with pytest.raises(SystemExit):
            p.parse_args(["--temperature", bad])
    assert "invalid number value" in capsys.readouterr().err
