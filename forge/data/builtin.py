"""The built-in offline corpus: real text that every Python installation carries.

python_stdlib: the standard library's own .py files (simple, well-written code), sorted by path
    relative to the library root, leaving out tests (test/, tests/, idle_test/), installed packages
    (site-packages/) and files that are not UTF-8.
pydoc_topics: the help topics of `pydoc_data.topics` (English technical prose), sorted by name.

With max_documents set, the documents taken are evenly spaced over that sorted list (the whole
library is represented, not just the files starting with "a"). The selection depends only on the
Python installation, so it is the same on every run; a different Python version is a different
corpus (the fingerprint hashes the documents themselves).
"""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Optional

STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def evenly_spaced(n: int, k: Optional[int]) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    return [i * n // k for i in range(k)]


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative posix path, path) of every candidate standard-library source file, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in STDLIB_SKIP_DIRS]  # prune: never list site-packages
        for name in files:
            path = Path(folder) / name
            if name.endswith(".py") and not path.is_symlink():
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def builtin_documents(corpus: str, max_documents: Optional[int] = None) -> list[tuple[str, str]]:
    """(name, text) of the selected documents of a built-in corpus, in their deterministic order."""
    if corpus == "python_stdlib":
        files = stdlib_files()
        docs = []
        for i in evenly_spaced(len(files), max_documents):
            name, path = files[i]
            try:
                docs.append((name, path.read_bytes().decode("utf-8")))
            except (UnicodeDecodeError, OSError):
                continue  # not UTF-8 or unreadable: not part of the corpus
        return docs
    if corpus == "pydoc_topics":
        from pydoc_data.topics import topics

        names = sorted(topics)
        return [(names[i], topics[names[i]]) for i in evenly_spaced(len(names), max_documents)]
    raise ValueError(f"unknown builtin corpus {corpus!r}")
