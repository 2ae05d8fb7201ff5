"""What a person watching the run sees: a rich progress display on a terminal, plain log lines
otherwise (CI, pipes, files). Reads the metrics records the loop logs; computes nothing itself."""
from __future__ import annotations

import sys
import time
from typing import Any


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class LiveView:
    def __init__(self, run_id: str, start_step: int, max_steps: int, tty: bool | None = None, quiet: bool = False):
        """quiet: print nothing (the processes of a distributed run other than rank 0)."""
        self.run_id, self.start_step, self.max_steps, self.quiet = run_id, start_step, max_steps, quiet
        self.tty = not quiet and (sys.stdout.isatty() if tty is None else tty)
        self.t0 = time.perf_counter()
        self.warnings: list[str] = []
        self._latest: dict[str, float] = {}
        self._progress = None
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                      TextColumn("[yellow]{task.fields[warning]}"), transient=False)
            self._task = self._progress.add_task(run_id, total=max_steps, completed=start_step, stats="",
                                                 warning="")
            self._progress.start()
        else:
            self._line(f"run {run_id}: steps {start_step}..{max_steps}")

    def restart(self, step: int) -> None:
        """Training goes on from `step` again (a heal rolled back): the ETA counts from here."""
        self.start_step, self.t0 = step, time.perf_counter()

    def _line(self, text: str) -> None:
        if self.quiet:
            return
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    # (metric, label, format): the composite objective, the cross-entropy users compare with ln(vocab), the
    # throughput, and the newest validation bits per byte (kept between evaluations)
    LINE = (("loss/total", "loss", "{:.3f}"), ("loss/ce", "ce", "{:.3f}"), ("perf/tokens_per_sec", "tok/s", "{:,.0f}"),
            ("valid/bits_per_byte", "val bpb", "{:.3f}"))

    def _stats(self, record: dict[str, Any]) -> str:
        self._latest.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
        return "  ".join(f"{label} {fmt.format(self._latest[key])}" for key, label, fmt in self.LINE
                         if key in self._latest)

    def step(self, step: int, record: dict[str, Any] | None = None) -> None:
        """Called after every optimizer step; `record` is the logged metrics on logging steps. A record with an
        evaluation in it is announced on a line of its own."""
        if record and isinstance(record.get("valid/perplexity"), (int, float)):
            halt = record.get("valid/halt/perplexity")
            self.note(f"eval step {step}: valid ppl {record['valid/perplexity']:.2f}  "
                      f"bpb {record.get('valid/bits_per_byte', float('nan')):.3f}"
                      + (f"  (ACT halting: ppl {halt:.2f})" if isinstance(halt, (int, float)) else ""))
        if self._progress is not None:
            fields = {"stats": self._stats(record)} if record else {}
            self._progress.update(self._task, completed=step, **fields)
        elif record:
            done = step - self.start_step
            elapsed = time.perf_counter() - self.t0
            eta = _eta(elapsed / done * (self.max_steps - step)) if done else "?"
            self._line(f"step {step}/{self.max_steps}  {self._stats(record)}  eta {eta}")

    def note(self, text: str) -> None:
        """Informational line (evaluation results, checkpoints)."""
        if self._progress is not None:
            self._progress.console.print(text, highlight=False, markup=False)
        else:
            self._line(text)

    def checkpoint(self, step: int, path, background: bool) -> None:
        self.note(f"checkpoint step {step}: {'writing in the background to ' if background else 'wrote '}{path}")

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        if self._progress is not None:
            self._progress.update(self._task, warning=text[:60])
            self._progress.console.print(f"[yellow]warning:[/] {text}", highlight=False)
        else:
            self._line(f"warning: {text}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
