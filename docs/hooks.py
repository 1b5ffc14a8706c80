"""MkDocs hook: the reference pages' generated parts, made from the code at build time (sim/reference.py)."""
from sim.reference import cli_markdown, metrics_markdown, plan_markdown, schema_markdown

GENERATED = {"<!-- generated: workload schema -->": schema_markdown, "<!-- generated: command line -->": cli_markdown,
             "<!-- generated: metrics -->": metrics_markdown, "<!-- generated: plan schema -->": plan_markdown}


def on_page_markdown(markdown, page, config, files):
    for marker, make in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
