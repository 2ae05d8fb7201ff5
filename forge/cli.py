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

# rich_markup_mode=None: plain help, so a help text's "[default: ...]" is shown, not read as rich markup
app = typer.Typer(name="forge", no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="Turn a TOML experiment spec into a guarded Phase 1 training run.")
spec_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                       help="Inspect specs: resolved view, differences, schema.")
app.add_typer(spec_app, name="spec")
patch_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Spec patches written by forge diagnose --apply.")
app.add_typer(patch_app, name="patch")

SetOption = typer.Option(None, "--set", "-s", metavar="KEY=VALUE",
                         help="Override a spec key, typed by the schema (repeatable), e.g. optim.grokfast.lam=0.1")
JsonOption = typer.Option(False, "--json", help="Print JSON instead of tables.")
DataDirOption = typer.Option(None, "--data-dir", help="Root of local data sources [default: $FORGE_DATA_DIR or data/].")


@app.command()
def check(spec: Path = typer.Argument(..., help="Spec TOML file."),
          overrides: Optional[List[str]] = SetOption,
          as_json: bool = JsonOption,
          data_dir: Optional[Path] = DataDirOption,
          device: Optional[str] = typer.Option(None, "--device", metavar="cpu|cuda",
                                               help="Judge the memory estimate (B1) for this device "
                                                    "[default: the spec's train.device here]."),
          memory_gb: Optional[float] = typer.Option(None, "--memory-gb", min=0.01, metavar="G",
                                                    help="Memory budget of that device in GB [default: its "
                                                         "memory: total RAM, or the GPU's total memory]."),
          only: Optional[str] = typer.Option(None, "--only", metavar="ID[,ID...]",
                                             help="Run only these checklist items (e.g. B1-param-budget); "
                                                  "the verdict then covers just them.")) -> None:
    """Validate SPEC, then run its before-first-run checklist (exit 1 if a critical item fails)."""
    from forge.checklist.runner import run_checklist
    from forge.spec.budget import check_memory_budget
    from forge.spec.load import load_spec

    if device not in (None, "cpu", "cuda"):
        raise typer.BadParameter(f"--device must be cpu or cuda (got {device!r})", param_hint="--device")
    resolved = load_spec(spec, overrides or [])
    check_memory_budget(resolved.spec)    # before the checklist allocates the model
    ids = [i.strip() for i in only.split(",") if i.strip()] if only is not None else None
    result = run_checklist(resolved, data_dir=data_dir, device=device, memory_gb=memory_gb, only=ids)
    if as_json:
        ui.print_json({"spec": str(spec), "spec_hash": resolved.hash, **result.to_json()})
    else:
        ui.render_checklist(result, str(spec), resolved.hash)
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def train(spec: Optional[Path] = typer.Argument(None, help="Spec TOML file (not needed with --resume)."),
          overrides: Optional[List[str]] = SetOption,
          run_id: Optional[str] = typer.Option(None, "--run-id", help="Run id [default: <name>-<date>-<hex>]."),
          resume: Optional[str] = typer.Option(None, "--resume", metavar="RUN_ID",
                                               help="Continue RUN_ID from its newest valid checkpoint."),
          from_step: Optional[int] = typer.Option(None, "--from-step", min=0, metavar="N",
                                                  help="With --resume: continue from the checkpoint at step N "
                                                       "(later checkpoints move to <run>/abandoned/)."),
          max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1,
                                                  help="Stop at this step (the lr schedule still follows "
                                                       "train.max_steps)."),
          nproc: Optional[int] = typer.Option(None, "--nproc", min=1,
                                              help="Train on N processes of this machine (torch DDP through "
                                                   "torchrun; one GPU each on CUDA). Results do not depend on N."),
          force: bool = typer.Option(False, "--force", help="Launch even if a critical checklist item fails "
                                                            "(recorded in the run's lineage)."),
          heal: bool = typer.Option(False, "--heal", help="Self-healing run (train.heal.enabled = true, recorded as "
                                                          "an override): a critical finding of the debugging tree "
                                                          "rolls back, applies its remedy as a recorded patch, "
                                                          "continues (README, \"Self-healing runs\")."),
          data_dir: Optional[Path] = DataDirOption,
          attach: Optional[Path] = typer.Option(None, "--attach", hidden=True,
                                                help="(internal) a worker of `--nproc`: the run directory.")) -> None:
    """Gate SPEC with its checklist, then train; metrics, checkpoints and status go to runs/<run-id>/.

    Several processes: `forge train SPEC --nproc N` on one machine; on several machines, start
    `torchrun --nnodes ... -m forge train SPEC` on each (see README, "Training on several processes")."""
    from forge.distributed import exit_worker
    from forge.train.run import TrainRequest, run_training

    request = TrainRequest(spec, overrides or [], run_id, resume, from_step, max_steps, nproc, force, data_dir, attach,
                           heal)
    outcome = run_training(request)
    outcome.render()
    if outcome.worker:
        exit_worker(outcome.exit_code)
    raise typer.Exit(outcome.exit_code)


@app.command()
def runs(output_dir: Path = typer.Option(Path("runs"), "--output-dir", help="Directory that holds the runs."),
         watch: bool = typer.Option(False, "--watch", help="Redraw the table every --every seconds (Ctrl-C ends)."),
         every: float = typer.Option(2.0, "--every", min=0.1, help="Seconds between redraws with --watch."),
         as_json: bool = JsonOption) -> None:
    """List runs: id, spec, spec hash, overrides, status, step, last loss, validation perplexity and bpb."""
    from forge.train.runs import list_runs

    if as_json:
        ui.print_json(list_runs(output_dir))
    elif watch:
        ui.watch_runs(lambda: list_runs(output_dir), output_dir, every)
    else:
        ui.render_runs(list_runs(output_dir), output_dir)


@app.command("merge-preview")
def merge_preview(run_id: str = typer.Argument(..., help="Run id."),
                  step_a: int = typer.Option(..., "--a", help="Step of the first checkpoint."),
                  step_b: int = typer.Option(..., "--b", help="Step of the second checkpoint."),
                  method: str = typer.Option("slerp", "--method", help="slerp or linear."),
                  t: float = typer.Option(0.5, "--t", min=0.0, max=1.0, help="Interpolation factor towards --b."),
                  output_dir: Path = typer.Option(Path("runs"), "--output-dir", help="Directory that holds the runs."),
                  data_dir: Optional[Path] = DataDirOption,
                  as_json: bool = JsonOption) -> None:
    """Merge two checkpoints of a run (Phase 2 preview) and compare perplexities on its held-out data."""
    from forge.checklist.context import default_data_dir
    from forge.errors import ForgeError
    from forge.train.evaluate import merge_checkpoints
    from forge.train.run_dir import RunDir

    if method not in ("slerp", "linear"):
        raise ForgeError(f"--method must be slerp or linear (got {method!r})")
    run = RunDir.open(output_dir, run_id)
    scores = merge_checkpoints(run.path, step_a, step_b, method, t, data_dir or default_data_dir())
    if as_json:
        ui.print_json(scores)
    else:
        ui.render_merge(run_id, step_a, step_b, method, t, scores)


@app.command()
def sample(run_id: str = typer.Argument(..., help="Run id."),
           step: Optional[int] = typer.Option(None, "--step", min=0, help="Checkpoint step [default: newest valid]."),
           prompt: str = typer.Option("", "--prompt", help="Text to continue [default: a document's start]."),
           n: int = typer.Option(1, "--n", min=1, help="Samples."),
           max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1,
                                                    help="Tokens per sample [default: probes.sample_new_tokens]."),
           temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0,
                                                       help="0 = greedy [default: probes.sample_temperature]."),
           top_k: Optional[int] = typer.Option(None, "--top-k", min=0, help="0 = whole vocabulary "
                                                                            "[default: probes.sample_top_k]."),
           seed: int = typer.Option(0, "--seed", help="Sampling seed (same seed, same text)."),
           full_depth: bool = typer.Option(False, "--full-depth", help="Run every TRM step (no ACT halting)."),
           no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole prefix per token "
                                                                   "(slow; the cached decoder gives the same text)."),
           skip_halted: bool = typer.Option(False, "--skip-halted", help="Halted tokens skip the later TRM steps "
                                                                         "(faster; approximates the model)."),
           output_dir: Path = typer.Option(Path("runs"), "--output-dir", help="Directory that holds the runs."),
           as_json: bool = JsonOption) -> None:
    """Generate text from a checkpoint of RUN_ID, with ACT halting (avg steps per token reported)."""
    from dataclasses import asdict

    from forge.probes.from_run import sample_run
    from forge.train.run_dir import RunDir

    run = RunDir.open(output_dir, run_id)
    result = sample_run(run.path, step=step, prompt=prompt, n=n, max_tokens=max_tokens, temperature=temperature,
                        top_k=top_k, seed=seed, full_depth=full_depth, cached=not no_cache,
                        skip_halted=skip_halted)
    if as_json:
        ui.print_json(asdict(result))
    else:
        ui.render_samples(result)


@app.command()
def export(run_id: str = typer.Argument(..., help="Run id."),
           out: Path = typer.Argument(..., help="New (or empty) folder to write."),
           step: Optional[int] = typer.Option(None, "--step", min=0, help="Checkpoint step [default: newest valid]."),
           output_dir: Path = typer.Option(Path("runs"), "--output-dir",
                                           help="Directory that holds the runs.")) -> None:
    """Export a checkpoint of RUN_ID as a Hugging Face style folder: model.safetensors (with metadata),
    config.json, tokenizer files with eos/pad, the spec and a model card; load it with forge.model.load_export."""
    from forge.train.export import write_export
    from forge.train.run_dir import RunDir

    run = RunDir.open(output_dir, run_id)
    ui.print_text(f"wrote {write_export(run.path, out, step)}")


@app.command()
def diagnose(target: str = typer.Argument(..., metavar="RUN_ID|PATH.jsonl",
                                          help="Run id (a directory under --output-dir), or a plain metrics JSONL "
                                               "(forge's or the design's metric names)."),
             output_dir: Path = typer.Option(Path("runs"), "--output-dir", help="Directory that holds the runs."),
             spec: Optional[Path] = typer.Option(None, "--spec", help="With a metrics JSONL: the spec it ran "
                                                                      "(default: specs/phase1.toml, the design's)."),
             apply: bool = typer.Option(False, "--apply", help="Write the top finding's remedy as a new spec that "
                                                               "extends the run's spec (without it: dry run)."),
             finding: Optional[str] = typer.Option(None, "--finding", help="Apply this finding's remedy instead of "
                                                                           "the top finding's."),
             remedy: int = typer.Option(1, "--remedy", min=1, help="Which of the finding's remedies (1 = first)."),
             show_all: bool = typer.Option(False, "--all", help="Also list rules that do not apply to this spec."),
             as_json: bool = JsonOption) -> None:
    """Walk the debugging tree over a run's evidence; suggest (or --apply) spec patches.
    Exit 0 healthy (every applicable rule clear), 1 findings, 3 undecidable, 2 bad input."""
    from forge.diagnose.patch import apply_finding
    from forge.diagnose.render import diagnosis_json, render_diagnosis
    from forge.diagnose.run import diagnose_file, diagnose_run
    from forge.errors import ForgeError
    from forge.train.run_dir import RunDir

    written = None
    if target.endswith(".jsonl") or Path(target).is_file():
        if apply:
            raise ForgeError(f"--apply needs a run directory (its spec and lineage); {target} is a metrics file")
        result = diagnose_file(Path(target), spec)
    else:
        if spec is not None:
            raise ForgeError("--spec goes with a metrics JSONL; a run directory carries its own spec")
        run = RunDir.open(output_dir, target)
        result = diagnose_run(run)
        if apply:
            written = apply_finding(result, finding, remedy, run.run_id, run.read("lineage.json"))
    if as_json:
        ui.print_json(diagnosis_json(result, written))
    else:
        render_diagnosis(result, written, show_all)
    raise typer.Exit(result.exit_code)


@app.command()
def compare(specs: Optional[List[Path]] = typer.Argument(None, help="Spec TOML files: each one a variant (times "
                                                                     "the --vary combinations)."),
            vary: Optional[List[str]] = typer.Option(None, "--vary", metavar="KEY=V1,V2",
                                                     help="Variants: one per value (repeatable: every "
                                                          "combination), e.g. optim.grokfast.enabled=true,false"),
            overrides: Optional[List[str]] = SetOption,
            budget: Optional[str] = typer.Option(None, "--budget", metavar="tokens=N|minutes=M",
                                                 help="The same training tokens, or the same training minutes "
                                                      "(steps alone, no evaluation), for every variant."),
            serial: bool = typer.Option(False, "--serial", help="Train the variants one after another "
                                                                "[default: in turns, a slice each]."),
            seeds: int = typer.Option(1, "--seeds", min=1, help="Repeat every variant with N seeds "
                                                                "(run.seed, +1, ...): noise across seeds."),
            resume: Optional[str] = typer.Option(None, "--resume", metavar="ID", help="Continue comparison ID."),
            comparison_id: Optional[str] = typer.Option(None, "--id", help="Comparison id [default: "
                                                                           "cmp-<date>-<hex>]."),
            html_path: Optional[Path] = typer.Option(None, "--html", metavar="PATH",
                                                     help="Write the page here [default: "
                                                          "<output-dir>/<id>/comparison.html]."),
            output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Directory of the runs "
                                                                                 "[default: run.output_dir]."),
            nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Not supported by compare (exit 2)."),
            force: bool = typer.Option(False, "--force", help="Launch variants whose checklist fails."),
            data_dir: Optional[Path] = DataDirOption,
            as_json: bool = JsonOption) -> None:
    """Train variants against each other (each an ordinary run, runs/<id>-<variant>/) at an equal budget; print
    the ranked table (held-out bits/byte overall and per source, difference to the first variant and its
    noise), write the page with overlaid curves. Exit 0 finished, 130 interrupted (--resume ID), 1 a failure."""
    import contextlib

    from forge.compare.run import Request, run_comparison
    from forge.compare.view import comparison_view, render_terminal, write_html

    request = Request(list(specs or []), list(vary or []), list(overrides or []), budget, seeds, serial,
                      comparison_id, resume, output_dir, force, nproc, data_dir)
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():   # stdout: the JSON
        outcome = run_comparison(request)
    view = comparison_view(outcome.path, outcome.record)
    page = write_html(view, html_path or outcome.path / "comparison.html")
    if as_json:
        ui.print_json({"id": outcome.record["id"], "status": outcome.status, "html": str(page), **view.to_json()})
    else:
        render_terminal(view)
        ui.print_text(f"wrote {page}")
        if outcome.status == "interrupted":
            ui.print_text(f"continue with: forge compare --resume {outcome.record['id']}")
    raise typer.Exit(outcome.exit_code)


@app.command()
def report(run_ids: List[str] = typer.Argument(..., help="One run id, or several to compare side by side."),
           output_dir: Path = typer.Option(Path("runs"), "--output-dir", help="Directory that holds the runs."),
           write_html: bool = typer.Option(False, "--html", help="Also write <run>/report.html (self-contained)."),
           as_json: bool = JsonOption) -> None:
    """The design's success-criteria table, curves as sparklines and PNGs (<run>/plots/). Several runs: the
    comparison view of forge compare (steps, tokens, bits/byte per source, spec diff, overlaid curves with
    --html in <first run>/comparison.html) and the criteria side by side."""
    from dataclasses import asdict

    from forge.compare.view import build_view, read_run, render_terminal as render_view, write_html as comparison_html
    from forge.report.criteria import RunRecord, success_criteria
    from forge.report.render import render_comparison, render_terminal, write_html as html_page, write_plots
    from forge.train.run_dir import RunDir

    if len(run_ids) > 1:
        runs = [RunDir.open(output_dir, r) for r in run_ids]
        view = build_view([read_run(run) for run in runs], f"forge report {' '.join(run_ids)}")
        if as_json:
            ui.print_json(view.to_json())
            return
        render_view(view)
        render_comparison([RunRecord.load(run) for run in runs])
        if write_html:
            ui.print_text(f"wrote {comparison_html(view, runs[0].path / 'comparison.html')}")
        return
    recs = [RunRecord.load(RunDir.open(output_dir, r)) for r in run_ids]
    if as_json:
        ui.print_json({rec.run.run_id: [asdict(c) for c in success_criteria(rec)] for rec in recs})
        return
    plots = write_plots(recs[0])
    render_terminal(recs[0], plots)
    if write_html:
        ui.print_text(f"wrote {html_page(recs[0], plots)}")


@patch_app.command("show")
def patch_show(patch: Path = typer.Argument(..., help="Patch record (specs/patches/*.json).")) -> None:
    """Print a patch record: run, rule, evidence, operations."""
    from forge.diagnose.patch import read_patch

    ui.print_json(read_patch(patch))


@patch_app.command("apply")
def patch_apply(patch: Path = typer.Argument(..., help="Patch record (specs/patches/*.json).")) -> None:
    """Write a new spec from a recorded patch (refused if the base spec changed since the run)."""
    from forge.diagnose.patch import read_patch, write_patched_spec

    written = write_patched_spec(read_patch(patch))
    ui.print_text(f"wrote {written.spec_path} (patch record {written.path})")


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


def _register_groups() -> None:
    from forge.cli_data import app as data_app

    app.add_typer(data_app, name="data")


def _plain_forge_warnings() -> None:
    """forge's own warnings (a checkpoint skipped, a stray directory ignored) as `warning: ...` lines."""
    import warnings

    shown = warnings.showwarning
    if getattr(shown, "forge_plain", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if category is UserWarning and f"{os.sep}forge{os.sep}" in filename:
            sys.stderr.write(f"warning: {message}\n")
        else:
            shown(message, category, filename, lineno, file, line)

    show.forge_plain = True
    warnings.showwarning = show


def main(argv: Optional[list[str]] = None) -> None:
    """The error boundary: bad input (ForgeError), and what the filesystem or the machine refuses while reading
    or writing specs, data, run directories and checkpoints (OSError, UnicodeError, MemoryError), end with
    one message naming the path and what to do, and exit code 2; FORGE_DEBUG=1 shows the traceback."""
    from forge.errors import ForgeError, environment_error

    _register_groups()
    _plain_forge_warnings()
    try:
        app(args=argv)  # Typer handles usage errors (exit 2) and typer.Exit itself
    except (ForgeError, OSError, UnicodeError, MemoryError) as err:
        if os.environ.get("FORGE_DEBUG"):
            raise
        ui.print_error(str(err) if isinstance(err, ForgeError) else environment_error(err))
        sys.exit(err.exit_code if isinstance(err, ForgeError) else 2)
