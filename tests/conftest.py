"""Shared test fixtures: paths of the repository, its specs and the real data samples."""
from __future__ import annotations

import os
from pathlib import Path

# Test shapes are tiny: on a 2-core machine torch's second thread costs more than it gives, and other
# processes make it erratic. One thread, set before torch is imported (subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "specs"


def shared_data_dir() -> Path | None:
    """$FORGE_DATA_DIR, else ../shared/data beside the repository; None when neither exists."""
    for candidate in (os.environ.get("FORGE_DATA_DIR"), REPO.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def data_dir() -> Path:
    return require_data_dir()


def require_data_dir() -> Path:
    """The real data samples for a test that needs them: skipped without them, failed under CI."""
    found = shared_data_dir()
    if found is None:
        why = "real data samples not found: set FORGE_DATA_DIR or put shared/ beside the repository"
        if os.environ.get("FORGE_REQUIRE_DATA"):   # CI (.ci/run): the real-data tests must run, never skip
            pytest.fail(why)
        pytest.skip(why)
    return found


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run `forge ARGS...` in-process; returns (exit_code, stdout, stderr)."""
    from forge.cli import main

    def run(*argv: str, cwd: Path | None = None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        with pytest.raises(SystemExit) as exit_info:
            main(list(argv))
        out, err = capsys.readouterr()
        code = exit_info.value.code
        return (0 if code is None else code), out, err

    return run
