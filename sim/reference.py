"""Reference pages generated from the code, so they never drift from it: the workload schema (from the
pydantic models, through their JSON Schema), every command of the CLI (from its argparse parser) and the
summary's metrics (from sim/metrics/glossary.py).

The documentation site's build (docs/hooks.py) puts them into docs/reference/; tests check that every
field has help text and that the site builds.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Iterator

TOP = "Workload"


def workload_schema() -> dict:
    """The workload format's JSON Schema, as `llmsim schema` prints it."""
    from sim.config.schema import Workload

    return Workload.model_json_schema(by_alias=True)


def plan_schema() -> dict:
    """The plan file's JSON Schema."""
    from sim.experiments.plan.spec import Plan

    return Plan.model_json_schema(by_alias=True)


def _models(schema: dict) -> Iterator[tuple[str, dict]]:
    """(name, schema) of the top-level model, then every model it uses, in the order a reader meets them."""
    defs = schema.get("$defs", {})
    top = schema.get("title", TOP)
    seen, queue = {top}, [(top, schema)]
    while queue:
        name, model = queue.pop(0)
        yield name, model
        for ref in _refs(model.get("properties", {})):
            if ref not in seen and ref in defs:
                seen.add(ref)
                queue.append((ref, defs[ref]))


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"].rsplit("/", 1)[-1]
        for key, value in node.items():
            if key != "discriminator":
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _type(node: dict) -> str:
    """A property's type in words, with links to the models it names."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "enum" in node:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in node["enum"])
    for key in ("anyOf", "oneOf"):
        if key in node:
            kinds = [_type(option) for option in node[key] if option.get("type") != "null"]
            nullable = any(option.get("type") == "null" for option in node[key])
            return " or ".join(dict.fromkeys(kinds)) + (" (optional)" if nullable else "")
    kind = node.get("type")
    if kind == "array":
        return f"list of {_type(node.get('items', {}))}"
    if kind == "object":
        values = node.get("additionalProperties")
        return f"map of names to {_type(values)}" if isinstance(values, dict) else "object"
    return {"integer": "integer", "number": "number", "string": "text", "boolean": "true or false"}.get(kind, "any")


def _default(node: dict, required: bool) -> str:
    if required:
        return "required"
    if "default" not in node:
        return ""
    value = node["default"]
    return "none" if value is None else f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def schema_markdown(schema: dict | None = None) -> str:
    """A schema (the workload's by default) as Markdown: one section per model, a table row per field."""
    lines = []
    for name, model in _models(schema or workload_schema()):
        lines += [f"## {name}", "", _cell(model.get("description", "")).strip(), "",
                  "| field | type | default | meaning |", "| --- | --- | --- | --- |"]
        required = set(model.get("required", []))
        for field, node in model.get("properties", {}).items():
            lines.append(f"| `{field}` | {_cell(_type(node))} | {_default(node, field in required)} | "
                         f"{_cell(node.get('description', ''))} |")
        lines.append("")
    return "\n".join(lines)


def plan_markdown() -> str:
    """The plan file's schema as Markdown (docs/reference/plan.md)."""
    return schema_markdown(plan_schema())


def fields_without_help(schema: dict | None = None) -> list[str]:
    """`Model.field` of every schema field (the workload's by default) without a description (a discriminator's
    `kind` tag excepted: it is its model's name)."""
    out = []
    for name, model in _models(schema or workload_schema()):
        for field, node in model.get("properties", {}).items():
            if not node.get("description") and "const" not in node:
                out.append(f"{name}.{field}")
    return out


def metrics_markdown() -> str:
    """The summary's metrics: a table row per name (sim/metrics/glossary.py), with its unit and meaning."""
    from sim.metrics.glossary import METRICS

    rows = [f"| `{name}` | {unit} | {meaning} |" for name, unit, meaning in METRICS]
    return "\n".join(["| key | unit | meaning |", "| --- | --- | --- |", *rows])


def cli_markdown() -> str:
    """Every `llmsim` command: its usage, what it does, and each option with its help."""
    from sim.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    lines = [f"`{parser.prog} --version` prints the version.", ""]
    for name, command in sub.choices.items():
        usage = " ".join(command.format_usage().split())[len("usage: "):]
        lines += [f"## llmsim {name}", "", _cell(helps.get(name) or "").capitalize() + ".", "", "```text", usage,
                  "```", "", "| argument | meaning |", "| --- | --- |"]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = ", ".join(action.option_strings) or action.metavar or action.dest
            meaning = action.help or ""
            if action.choices and not isinstance(action.choices, dict):
                meaning += f" (one of: {', '.join(map(str, action.choices))})"
            lines.append(f"| `{label}` | {_cell(meaning)} |")
        lines.append("")
    return "\n".join(lines)
