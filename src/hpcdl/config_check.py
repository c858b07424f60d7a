"""Validation of the workflow configuration against workflow/schemas/config.schema.yaml, with short errors.

Why not only snakemake.utils.validate: on a bad value it prints jsonschema's whole message, which embeds the
schema of the offending section (about 200 lines for one wrong key). Users need one line per problem: the key,
the value they gave and what is allowed. The Snakefile calls `check_config` first, then Snakemake's `validate`,
which fills in the schema's defaults."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match


class ConfigError(ValueError):
    """The configuration breaks the schema; the message lists every problem, one line each."""


def load_schema(path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _key(path) -> str:
    return ".".join(str(part) for part in path) or "(top level)"


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_NAMES = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "true or false", "null": "null"}


def _allowed_keys(schema: dict) -> str:
    return ", ".join(sorted(schema.get("properties", {})))


def describe(error: ValidationError) -> str:
    """One line for one schema violation: key, offending value, what is allowed."""
    while error.context:  # oneOf/anyOf: the branch that got deepest into the value says the most
        deepest = max(error.context, key=lambda e: len(e.absolute_path))
        error = deepest if len(deepest.absolute_path) > len(error.absolute_path) else best_match(error.context)
    key, value, rule = _key(error.absolute_path), error.instance, error.validator
    if rule == "additionalProperties":
        extra = sorted(set(value) - set(error.schema.get("properties", {})))
        prefix = f"{key}." if error.absolute_path else ""
        return "; ".join(f"{prefix}{name}: unknown key (allowed: {_allowed_keys(error.schema)})" for name in extra)
    if rule == "enum":
        return f"{key}: {_show(value)} is not allowed (allowed: {', '.join(map(str, error.validator_value))})"
    if rule == "required":
        missing = error.message.split("'")[1]
        prefix = f"{key}." if error.absolute_path else ""
        return f"{prefix}{missing}: missing (required)"
    if rule == "not":
        return f"{key}: {_show(value)} is not allowed here"
    if rule == "type":
        types = [error.validator_value] if isinstance(error.validator_value, str) else error.validator_value
        return f"{key}: {_show(value)} is not {' or '.join(_TYPE_NAMES[t] for t in types)}"
    if rule in {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}:
        sign = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[rule]
        return f"{key}: {_show(value)} is out of range (allowed: {sign} {error.validator_value})"
    if rule == "pattern":
        return f"{key}: {_show(value)} does not match {error.validator_value}"
    if rule == "uniqueItems":
        return f"{key}: {_show(value)} repeats an item"
    if rule == "minItems":
        return f"{key}: {_show(value)} is empty (allowed: a list of at least {error.validator_value} value{'s' if error.validator_value > 1 else ''})"
    return f"{key}: {_show(value)}: {error.message.splitlines()[0][:120]}"


def rule_errors(config: dict) -> list[str]:
    """What a JSON schema cannot say: relations between keys."""
    lines = []
    for stage in ("train", "autoencode", "finetune"):
        section = config.get(stage)
        if isinstance(section, dict) and isinstance(section.get("ranks"), int) and isinstance(section.get("nodes"), int):
            if section["ranks"] % section["nodes"]:
                lines.append(f"{stage}.ranks: {section['ranks']} is not a multiple of {stage}.nodes ({section['nodes']}): "
                             "the ranks are spread evenly over the nodes")
    train, grid = config.get("train"), (config.get("sweep") or {}).get("grid") or {}
    if isinstance(train, dict) and isinstance(train.get("nodes"), int):  # a sweep's ranks spread over train.nodes
        for ranks in grid.get("train.ranks", []):
            if isinstance(ranks, int) and ranks % train["nodes"]:
                lines.append(f"sweep.grid.train.ranks: {ranks} is not a multiple of train.nodes ({train['nodes']}): "
                             "the ranks are spread evenly over the nodes")
    if isinstance(train, dict) and train.get("compression", "none") != "none":  # a setting that would do nothing
        backends = [train.get("backend")] + list(grid.get("train.backend", []))
        if "torch" in backends:
            lines.append(f"train.compression: {_show(train['compression'])} needs train.backend horovod "
                         "(allowed with torch: none; torch.distributed's gradients are not compressed)")
    return lines


def config_errors(config: dict, schema: dict) -> list[str]:
    validator = Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    lines = []
    for error in errors:
        line = describe(error)
        if line not in lines:
            lines.append(line)
    return lines or rule_errors(config)


def check_config(config: dict, schema_path) -> None:
    """Raise ConfigError naming every bad key, value and the allowed values (nothing else)."""
    problems = config_errors(config, load_schema(schema_path))
    if problems:
        raise ConfigError(f"invalid configuration ({schema_path}):\n" + "\n".join(f"  {p}" for p in problems))


def schema_defaults(schema: dict) -> dict:
    """The configuration the schema's defaults describe (what config/config.yaml must hold)."""

    def walk(node: dict):
        if "properties" in node and node.get("type") == "object":
            out = {}
            for name, sub in node["properties"].items():
                value = walk(sub)
                if value is not _MISSING:
                    out[name] = value
            return out if out or "default" not in node else node["default"]
        return node.get("default", _MISSING)

    return walk(schema)


_MISSING = object()
