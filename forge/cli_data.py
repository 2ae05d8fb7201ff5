"""`forge data ...`: pull a spec's hub sources into the cache; show what the pipeline makes of its sources.

Errors are ForgeErrors (exit 2, one message, no traceback) raised to the main CLI.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from forge import ui

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                  help="Data sources: pull hub datasets into the cache, per-source statistics.")

_SET = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help="Override a spec key (repeatable).")


@app.command()
def pull(spec: Path = typer.Argument(..., help="Spec TOML file."),
         overrides: Optional[List[str]] = _SET,
         refresh: bool = typer.Option(False, "--refresh", help="Download again even if already pulled.")) -> None:
    """Download and cache every hub source of SPEC, so later runs work offline ($FORGE_CACHE_DIR)."""
    from forge.data.cache import default_cache_dir
    from forge.data.sources import pull_hub_source
    from forge.spec.load import load_spec

    sources = [s for s in load_spec(spec, overrides or []).spec.data.sources if s.type == "hub"]
    if not sources:
        ui.print_text(f"{spec}: no hub sources, nothing to pull")
        return
    for source in sources:
        info = pull_hub_source(source, default_cache_dir(), refresh=refresh)
        rows = ", ".join(f"{split} {n:,} rows" for split, n in info["splits"].items())
        ui.print_text(f"{source.name}: {source.dataset} at {info['sha'][:12]}: {rows}")


@app.command()
def stats(spec: Path = typer.Argument(..., help="Spec TOML file."),
          overrides: Optional[List[str]] = _SET,
          data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Root of local data sources "
                                                  "[default: $FORGE_DATA_DIR or data/]."),
          batches: int = typer.Option(20, "--batches", min=1, help="Training batches to measure the mixture over."),
          as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables.")) -> None:
    """Prepare SPEC's data (or load it from the cache); show documents, filter drops, tokens per source,
    the realised mixture and the loader's time per batch."""
    from forge.data import build_data
    from forge.spec.load import load_spec

    resolved = load_spec(spec, overrides or [])
    start = time.perf_counter()
    data = build_data(resolved.spec.data, vocab_size=resolved.spec.model.vocab_size, seed=resolved.spec.run.seed,
                      data_dir=data_dir)
    report = {"spec": str(spec), "prepare_seconds": time.perf_counter() - start, "sources": data.report(),
              "mixture": data.mixture_report(batches)}
    if as_json:
        ui.print_json(report)
    else:
        _render(report)


def _render(report: dict) -> None:
    from rich.table import Table

    mixture = report["mixture"]
    table = Table(title=f"data of {report['spec']} (prepared or loaded in {report['prepare_seconds']:.1f} s)",
                  title_justify="left")
    for column in ("source", "docs read", "dropped quality", "dropped overlap", "dropped min_length", "packed",
                   "train tokens", "eval tokens", "bytes/token", f"share of {mixture['batches']} batches", "spec"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for row in report["sources"]:
        train, held = row["train"], row["eval"]
        realised = mixture["sources"][row["name"]]
        table.add_row(row["name"], f"{train['documents']:,}", f"{train['dropped_quality']:,}",
                      f"{train['dropped_overlap']:,}", f"{train['dropped_min_length']:,}", f"{train['kept']:,}",
                      f"{train['tokens']:,}", f"{held['tokens']:,}", f"{row['bytes_per_token']:.2f}",
                      f"{100 * realised['share']:.1f}%", f"{100 * realised['target']:g}%")
    out = ui.console()
    out.print(table)
    out.print(f"loader: {mixture['loader_ms_per_batch']:.2f} ms per batch")
