"""Reading a source's documents as text: local files, pulled hub splits, the built-in corpus.

Every source resolves to a fingerprint (cheap: file sizes and times, the pulled hub commit, the
built-in documents' hash) and, when the cache misses, to its documents as `Texts`: read in batches,
backed by Arrow tables (memory-mapped, so a large hub split never has to fit in memory) or lists.

Hub sources are pulled once (`forge data pull`, or on first use when the hub is reachable) into the
cache with `datasets.save_to_disk`; afterwards they load with `load_from_disk`, which never touches
the network. The download goes through the user's own Hugging Face cache (HF_DATASETS_CACHE / HF_HOME:
what other tools downloaded is reused, and kept for them), except for a dataset larger than the cache
budget ($FORGE_HF_CACHE_BUDGET_GB, default 20): that one is streamed straight into forge's copy. The
commit the hub served is recorded (pulled.json, and the run's lineage.json: `hub_commits`). Without
network and without a pulled copy, loading fails at once with a ForgeError that names the source and
how to point the spec at local files instead.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from forge.data.builtin import builtin_documents
from forge.data.cache import atomic_dir, fingerprint, write_json
from forge.errors import ForgeError
from forge.spec.data import BuiltinSource, HubSource, LocalSource, Source

HUB_TIMEOUT_S = 10.0   # seconds to wait for the hub's answer before treating it as unreachable
HF_CACHE_BUDGET_GB = 20.0   # default of $FORGE_HF_CACHE_BUDGET_GB: larger datasets stream past the HF cache
_LOADERS = {"jsonl": "json", "text": "text", "parquet": "parquet"}


# ------------------------------------------------------------------------------------------ texts

class _ListPart:
    def __init__(self, texts: list[str]):
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def rows(self, start: int, stop: int) -> list[str]:
        return self.texts[start:stop]

    def take(self, indices: list[int]) -> list[str]:
        return [self.texts[i] for i in indices]


class _ArrowPart:
    """A datasets.Dataset whose text is one field or a template over several."""

    def __init__(self, dataset, fields: list[str], template: Optional[str]):
        self.dataset = dataset.select_columns(fields)
        self.fields, self.template = fields, template

    def __len__(self) -> int:
        return len(self.dataset)

    def _texts(self, columns: dict) -> list[str]:
        rows = zip(*(columns[f] for f in self.fields))
        if self.template is None:
            return ["" if v is None else str(v) for (v,) in rows]
        return [self.template.format_map({f: "" if v is None else v for f, v in zip(self.fields, r)}) for r in rows]

    def rows(self, start: int, stop: int) -> list[str]:
        return self._texts(self.dataset[start:stop])

    def take(self, indices: list[int]) -> list[str]:
        return self._texts(self.dataset.select(indices)[:]) if indices else []


class Texts:
    """The documents of one split of a source, as text, in a fixed order."""

    def __init__(self, parts: Sequence[_ListPart | _ArrowPart]):
        self.parts = list(parts)
        self._starts = [0]
        for part in self.parts:
            self._starts.append(self._starts[-1] + len(part))

    @classmethod
    def of(cls, texts: list[str]) -> "Texts":
        return cls([_ListPart(texts)])

    def __len__(self) -> int:
        return self._starts[-1]

    def batch(self, start: int, stop: int) -> list[str]:
        out: list[str] = []
        for part, base in zip(self.parts, self._starts):
            lo, hi = max(start - base, 0), min(stop - base, len(part))
            if lo < hi:
                out.extend(part.rows(lo, hi))
        return out

    def take(self, indices: Sequence[int]) -> list[str]:
        """The documents at these (ascending) indices."""
        out: list[str] = []
        for part, base in zip(self.parts, self._starts):
            local = [i - base for i in indices if base <= i < base + len(part)]
            out.extend(part.take(local))
        return out


@dataclass(frozen=True)
class OpenedSource:
    name: str
    train: Texts
    eval: Optional[Texts]   # None: hold out data.eval.fraction of the training documents


# ----------------------------------------------------------------------------------- fingerprints

def source_fingerprint(source: Source, data_dir: Path, cache_dir: Path) -> str:
    """What the source's documents depend on; cheap (no document is parsed for local or hub sources)."""
    if isinstance(source, LocalSource):
        def stats(paths: list[Path]) -> list:
            return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]

        return fingerprint("local", source.format, source.text_fields(), source.text_template,
                           stats(local_files(source, data_dir)), stats(local_files(source, data_dir, held_out=True)))
    if isinstance(source, HubSource):
        pulled = ensure_pulled(source, cache_dir)
        return fingerprint("hub", source.dataset, source.config, source.split, source.eval_split, pulled,
                           source.text_fields(), source.text_template)
    digest = hashlib.sha256()
    for name, text in builtin_documents(source.corpus, source.max_documents):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    return fingerprint("builtin", source.corpus, source.max_documents, digest.hexdigest())


def open_source(source: Source, data_dir: Path, cache_dir: Path) -> OpenedSource:
    """The source's training (and explicit held-out) documents as Texts."""
    if isinstance(source, BuiltinSource):
        return OpenedSource(source.name, Texts.of([t for _, t in builtin_documents(source.corpus,
                                                                                 source.max_documents)]), None)
    if isinstance(source, LocalSource):
        train = _local_texts(source, local_files(source, data_dir), cache_dir)
        held = local_files(source, data_dir, held_out=True)
        return OpenedSource(source.name, train, _local_texts(source, held, cache_dir) if held else None)
    ensure_pulled(source, cache_dir)
    splits = [source.split] + ([source.eval_split] if source.eval_split else [])
    texts = [_hub_texts(source, cache_dir, split) for split in splits]
    return OpenedSource(source.name, texts[0], texts[1] if len(texts) > 1 else None)


# ------------------------------------------------------------------------------------------ local

def local_files(source: LocalSource, data_dir: Path, held_out: bool = False) -> list[Path]:
    """The files a local source's globs match under the data root, sorted; ForgeError if a glob matches none."""
    patterns = source.eval_paths if held_out else source.paths
    key = "eval_paths" if held_out else "paths"
    files: list[Path] = []
    for pattern in patterns:
        matched = sorted(Path(p) for p in glob.glob(str(Path(data_dir) / pattern), recursive=True)
                         if Path(p).is_file())
        if not matched:
            raise ForgeError(f"data source {source.name!r}: {key} pattern {pattern!r} matches no file under the "
                             f"data root {data_dir} (set --data-dir or $FORGE_DATA_DIR to the folder that holds "
                             f"the files, e.g. FORGE_DATA_DIR=../shared/data)")
        files.extend(m for m in matched if m not in files)
    if held_out:
        shared = set(files) & set(local_files(source, data_dir))
        if shared:
            raise ForgeError(f"data source {source.name!r}: {', '.join(map(str, sorted(shared)))} is both in "
                             "paths and eval_paths; a held-out file must not be trained on")
    return files


def _local_texts(source: LocalSource, files: list[Path], cache_dir: Path) -> Texts:
    datasets = _datasets()
    parts = []
    for path in files:
        extra = {"sample_by": "document"} if source.format == "text" else {}
        if path.stat().st_size == 0:
            raise ForgeError(f"data source {source.name!r}: {path} is empty; remove it or fix the source's paths")
        try:
            table = datasets.load_dataset(_LOADERS[source.format], data_files=[str(path)], split="train",
                                          cache_dir=str(cache_dir / "hf"), **extra)
        except Exception as err:  # datasets wraps parse errors in several types; all are bad input here
            decode = _cause(err, UnicodeDecodeError)
            why = (f"not UTF-8 text (byte {decode.start} of a block: {decode.object[decode.start:decode.start + 1]!r})"
                   if decode else f"{type(err).__name__}: {_first_line(err)}")
            raise ForgeError(f"data source {source.name!r}: cannot read {path} as {source.format}: {why}") from None
        parts.append(_arrow_part(source, table, str(path)))
    return Texts(parts)


def _cause(err: BaseException, kind: type) -> BaseException | None:
    """The first exception of type `kind` in err's chain of causes (datasets wraps the reader's error)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _arrow_part(source: Source, table, where: str) -> _ArrowPart:
    missing = [f for f in source.text_fields() if f not in table.column_names]
    if missing:
        key = "text_template" if source.text_template else "text_field"
        raise ForgeError(f"data source {source.name!r}: {where} has no field {', '.join(map(repr, missing))} "
                         f"(fields: {', '.join(table.column_names)}); set data.sources {key} accordingly")
    return _ArrowPart(table, source.text_fields(), source.text_template)


# -------------------------------------------------------------------------------------------- hub

def hub_dir(source: HubSource, cache_dir: Path) -> Path:
    """Where a hub source's pulled splits live: hub/<dataset>/<config>/<revision>/."""
    return (Path(cache_dir) / "hub" / source.dataset.replace("/", "__") / (source.config or "default")
            / (source.revision or "latest"))


def pulled_info(source: HubSource, cache_dir: Path) -> Optional[dict]:
    """The record `pull_hub_source` wrote ({"sha", "splits": {split: rows}}), or None if not pulled."""
    marker = hub_dir(source, cache_dir) / "pulled.json"
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    wanted = {source.split, source.eval_split} - {None}
    return info if wanted <= set(info["splits"]) else None


def ensure_pulled(source: HubSource, cache_dir: Path) -> dict:
    """The pulled record, pulling now (cached on first use) when there is none."""
    return pulled_info(source, cache_dir) or pull_hub_source(source, cache_dir)


def pull_hub_source(source: HubSource, cache_dir: Path, refresh: bool = False) -> dict:
    """Download the source's split(s) from the hub into the cache; ForgeError naming the source if the
    hub is unreachable (answered within HUB_TIMEOUT_S) or the dataset does not exist."""
    if not refresh and (info := pulled_info(source, cache_dir)):
        return info
    sha = _hub_revision(source, cache_dir)
    datasets = _datasets()
    target = hub_dir(source, cache_dir)
    size = _hub_bytes(source, sha)
    stream = size is not None and size > hf_cache_budget_bytes()
    splits = {}
    for split in [source.split] + ([source.eval_split] if source.eval_split else []):
        try:
            if stream:   # rows straight from the hub into forge's copy; nothing in the HF cache
                rows = datasets.load_dataset(source.dataset, source.config, split=split, revision=sha, streaming=True)
                table = datasets.Dataset.from_generator(lambda rows=rows: iter(rows), cache_dir=str(target / ".stream"))
            else:        # through the user's HF cache (None: HF_DATASETS_CACHE / HF_HOME, as `datasets` resolves it)
                table = datasets.load_dataset(source.dataset, source.config, split=split, revision=sha, cache_dir=None)
        except Exception as err:
            raise ForgeError(f"hub source {source.name!r} ({_hub_name(source)}): could not download split "
                             f"{split!r}: {type(err).__name__}: {_first_line(err)}") from None
        _arrow_part(source, table, f"{_hub_name(source)} split {split!r}")  # the text fields exist
        if (target / split).exists():
            shutil.rmtree(target / split)
        with atomic_dir(target / split) as tmp:
            table.save_to_disk(str(tmp))
        splits[split] = len(table)
    shutil.rmtree(target / ".stream", ignore_errors=True)  # the saved copy is self-contained
    info = {"dataset": source.dataset, "config": source.config, "sha": sha, "splits": splits,
            "bytes_on_hub": size, "streamed": stream}
    write_json(target / "pulled.json", info)
    return info


def _hub_texts(source: HubSource, cache_dir: Path, split: str) -> Texts:
    table = _datasets().load_from_disk(str(hub_dir(source, cache_dir) / split))
    return Texts([_arrow_part(source, table, f"{_hub_name(source)} split {split!r}")])


def hf_cache_budget_bytes() -> float:
    return float(os.environ.get("FORGE_HF_CACHE_BUDGET_GB", HF_CACHE_BUDGET_GB)) * 1e9


def hub_commits(sources: Sequence[Source], cache_dir: Path) -> dict[str, dict]:
    """For lineage.json: per pulled hub source, the dataset, config, the revision asked for and the commit the
    hub served (what `datasets` loaded). Sources not pulled yet are left out."""
    out = {}
    for source in sources:
        if isinstance(source, HubSource) and (info := pulled_info(source, cache_dir)):
            out[source.name] = {"dataset": source.dataset, "config": source.config, "revision": source.revision,
                                "commit": info["sha"]}
    return out


def _hub_bytes(source: HubSource, sha: str) -> Optional[int]:
    """The size of the dataset's files at commit `sha` (the hub's file metadata), None if the hub does not say."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=os.environ.get("HF_ENDPOINT")).dataset_info(source.dataset, revision=sha,
                                                                         files_metadata=True, timeout=HUB_TIMEOUT_S)
        sizes = [f.size for f in info.siblings or [] if f.size is not None]
        return sum(sizes) if sizes else None
    except Exception:   # the commit lookup just succeeded: a missing size only means "do not stream"
        return None


def _hub_revision(source: HubSource, cache_dir: Path) -> str:
    """The commit the hub serves for the source (one HTTP request, time-bounded)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"))  # read now: the library reads it once, at import
    try:
        return api.dataset_info(source.dataset, revision=source.revision, timeout=HUB_TIMEOUT_S).sha
    except GatedRepoError:
        raise ForgeError(f"hub source {source.name!r}: {source.dataset} is gated; accept its terms on the hub "
                         "and log in (`hf auth login`), then run `forge data pull SPEC`") from None
    except RevisionNotFoundError:
        raise ForgeError(f"hub source {source.name!r}: revision {source.revision!r} of {source.dataset} does "
                         "not exist; fix data.sources revision") from None
    except RepositoryNotFoundError:
        raise ForgeError(f"hub source {source.name!r}: no dataset {source.dataset!r} on the hub; fix "
                         "data.sources dataset") from None
    except Exception as err:  # connection refused, DNS failure, timeout, proxy error...
        raise ForgeError(
            f"hub source {source.name!r} ({_hub_name(source)}): the Hugging Face hub is unreachable "
            f"({type(err).__name__}: {_first_line(err)}) and the source is not in the cache "
            f"({hub_dir(source, cache_dir)}). Run `forge data pull SPEC` where the hub is reachable (and copy "
            f"{Path(cache_dir) / 'hub'} along), or point the spec at local files: in [[data.sources]] set "
            'type = "local" and paths = ["<glob under the data root>"] (see specs/local.toml)') from None


# ---------------------------------------------------------------------------------------- helpers

def _hub_name(source: HubSource) -> str:
    return source.dataset + (f", config {source.config}" if source.config else "")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


def _datasets():
    """`datasets`, imported on first use (heavy), quiet."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets
