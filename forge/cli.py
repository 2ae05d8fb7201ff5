"""The `forge` command line. Commands are thin: parse, call the library, render.

Exit codes: 0 ok; 1 a critical checklist item failed (or findings); 2 bad input (spec, arguments,
data, checkpoint). Heavy libraries are imported inside the commands that need them.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from forge import ui

app = typer.Typer(name="forge", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Turn a TOML experiment spec into a guarded Phase 1 training run.")
spec_app = typer.Typer(no_args_is_help=True, help="Inspect specs: resolved view, differences, schema.")
app.add_typer(spec_app, name="spec")

SetOption = typer.Option(None, "--set", "-s", metavar="KEY=VALUE",
                         help="Override a spec key, typed by the schema (repeatable), e.g. optim.grokfast.lam=0.1")
JsonOption = typer.Option(False, "--json", help="Print JSON instead of tables.")
DataDirOption = typer.Option(None, "--data-dir", help="Root of local data sources [default: $FORGE_DATA_DIR or data/].")


@app.command()
def check(spec: Path = typer.Argument(..., help="Spec TOML file."),
          overrides: Optional[List[str]] = SetOption,
          as_json: bool = JsonOption,
          data_dir: Optional[Path] = DataDirOption) -> None:
    """Validate SPEC, then run its before-first-run checklist (exit 1 if a critical item fails)."""
    from forge.checklist.runner import run_checklist
    from forge.spec.load import load_spec

    resolved = load_spec(spec, overrides or [])
    result = run_checklist(resolved, data_dir=data_dir)
    if as_json:
        ui.print_json({"spec": str(spec), "spec_hash": resolved.hash, **result.to_json()})
    else:
        ui.render_checklist(result, str(spec), resolved.hash)
    raise typer.Exit(0 if result.ok else 1)


@spec_app.command("show")
def spec_show(spec: Path = typer.Argument(..., help="Spec TOML file."),
              overrides: Optional[List[str]] = SetOption,
              as_json: bool = JsonOption) -> None:
    """Print the fully resolved spec (extends and --set applied) as TOML."""
    from forge.spec.load import load_spec
    from forge.spec.render import resolved_toml

    resolved = load_spec(spec, overrides or [])
    if as_json:
        ui.print_json({"spec_hash": resolved.hash, "chain": [str(p) for p in resolved.chain],
                       "overrides": list(resolved.overrides), "spec": resolved.spec.model_dump(mode="json")})
    else:
        ui.print_text(resolved_toml(resolved))


@spec_app.command("diff")
def spec_diff(left: Path = typer.Argument(..., help="First spec."),
              right: Path = typer.Argument(..., help="Second spec."),
              overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", metavar="KEY=VALUE",
                                                            help="Override applied to the second spec."),
              as_json: bool = JsonOption) -> None:
    """Show exactly the keys whose resolved values differ between two specs."""
    from forge.spec.load import load_spec
    from forge.spec.render import MISSING, spec_diff as diff

    changes = diff(load_spec(left), load_spec(right, overrides or []))
    if as_json:
        unset = None
        ui.print_json([{"key": c.key, "before": unset if c.before is MISSING else c.before,
                        "after": unset if c.after is MISSING else c.after} for c in changes])
    else:
        ui.render_diff(changes, str(left), str(right))


@spec_app.command("schema")
def spec_schema() -> None:
    """Print the JSON Schema of the spec (every field with its description)."""
    from forge.spec.schema import Spec

    ui.print_json(Spec.model_json_schema())


def main(argv: Optional[list[str]] = None) -> None:
    from forge.errors import ForgeError

    try:
        app(args=argv)  # Typer handles usage errors (exit 2) and typer.Exit itself
    except ForgeError as err:
        if os.environ.get("FORGE_DEBUG"):
            raise
        ui.print_error(str(err))
        sys.exit(err.exit_code)
