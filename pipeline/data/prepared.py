"""Prepared data: a data file tokenised (and packed) once, cached on disk as Arrow files, memory-mapped at run time.

The cache (``data.cache_dir``, default ``$LORAPLUS_CACHE/data``) holds one directory per preparation, named by
its key: a hash of the data's content, the tokenizer's files (the chat template included), ``data.format``,
``data.split``, ``train.seq_len``, the packing and truncation settings, the validation set and
:data:`PREP_VERSION`. Any change to one of them is another key, so a cache can never be read under the wrong
settings, and the key is also the data fingerprint a resumed run checks.

    <cache_dir>/<key>/
        manifest.json          what was built, from what, the report, and every file's size and edge digests
        train/tokens/          datasets.save_to_disk: input_ids, labels, length, loss_tokens, source (row read)
        train/rows/            packing only: each row's segments (doc, start, length) into train/tokens
        val/tokens/, val/rows/ the validation set, the same way
    <cache_dir>/<key>.lock     flock: one process builds, every other (rank, node, job) waits for it
    <cache_dir>/<key>.error    the bad-data error of the last build, so that the processes waiting on it stop
                               with the same line instead of tokenising again one after another
    <cache_dir>/stat/          content digests of data files by (path, size, mtime, inode): not rehashed per start

A build works in ``<cache_dir>/.build-<key>-<pid>`` and is renamed into place only when complete, so a killed
build is never read. A cache that fails its check (a file missing, truncated or overwritten) is rebuilt after one
warning line. Everything here runs before the process group exists: no collective waits on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.data.formats import (
    IGNORE_INDEX,
    DataError,
    Sample,
    fit_to_length,
    loss_tokens,
    pack_plan,
    tokenize_records,
)
from pipeline.files import atomic_write_text, locked

#: Bump when what a build writes changes meaning: every older cache then gets a new key.
PREP_VERSION = 1

#: Files whose content defines a tokenizer (and its chat template).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")

VAL_SPLIT_SEED = 0  # data.val_fraction: the same held-out samples whatever the run's seed
EDGE = 1 << 20  # bytes of each file's head and tail digested in the manifest
SMALL = 20_000  # rows below which one process tokenises (starting workers costs more than it saves)


@dataclass(frozen=True)
class Prepared:
    """The data a run trains on. ``key`` is the cache key (the resume fingerprint); ``report`` the log lines."""

    key: str
    directory: Path
    train: "Rows"
    val: "Rows | None"
    report: list[str]


def default_cache_dir() -> Path:
    from pipeline.files import cache_dir

    return cache_dir() / "data"


# ----------------------------------------------------------------------------------------------------------
# The key


def file_digest(path: Path, cache: Path) -> str:
    """xxh3-128 of a file's (or a directory's files') content, remembered under ``cache/stat`` by path, size,
    mtime and inode so that a 100 GB corpus is hashed once, not on every start of every rank."""
    import xxhash

    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [(str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ino) for f in files for st in [f.stat()]]
    memo = cache / "stat" / hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:32]
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    h = xxhash.xxh3_128()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else "").encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(memo, digest)  # concurrent writers write the same digest; the rename keeps it whole
    return digest


def tokenizer_digest(tokenizer_dir: str) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = Path(tokenizer_dir) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def cache_key(data_cfg, tokenizer_dir: str, seq_len: int, cache: Path) -> tuple[str, dict]:
    """The key of a preparation and the facts it is made of (kept in the manifest)."""
    for key, path in (("data.path", data_cfg.path), ("data.val_path", data_cfg.val_path)):
        if path and not Path(path).exists():
            raise DataError(f"data file not found: {path} (config key '{key}')")
    facts = {
        "version": PREP_VERSION,
        "data": file_digest(Path(data_cfg.path), cache),
        "split": data_cfg.split,
        "format": data_cfg.format,
        "tokenizer": tokenizer_digest(tokenizer_dir),
        "seq_len": seq_len,
        "packing": data_cfg.packing,
        "too_long": data_cfg.too_long,
        "val_data": file_digest(Path(data_cfg.val_path), cache) if data_cfg.val_path else None,
        "val_fraction": data_cfg.val_fraction,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24], facts


# ----------------------------------------------------------------------------------------------------------
# Preparing (the entry point)


def prepare(data_cfg, tokenizer, tokenizer_dir: str, seq_len: int, log: Callable[[str], None] | None = None,
            announce: bool = True) -> Prepared:
    """The prepared train (and validation) rows of ``data_cfg``: from the cache, or built into it first.

    Args:
        log: where progress and the report go (None: nowhere).
        announce: whether this process prints the report and its waiting (rank 0); a process that builds prints
            its progress whatever its rank.
    Raises:
        DataError: bad data (file and line named), an empty validation set, an unusable ``data.cache_dir``.
    """
    say = log or (lambda _msg: None)
    cache = Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else default_cache_dir()
    _check_writable(cache)
    key, facts = cache_key(data_cfg, tokenizer_dir, seq_len, cache)
    target = cache / key
    problem = verify(target)
    built, waited = False, bool(problem)
    if problem:
        asked = time.time()
        failed = cache / f"{key}.error"
        with _build_lock(cache / f"{key}.lock", say if announce else (lambda _msg: None)):
            problem = verify(target)  # another process may have built it while this one waited
            if problem and failed.is_file() and failed.stat().st_mtime >= asked - 1:
                # The build this process waited for found bad data: the same inputs give the same error, so
                # repeating it (once per rank, serially) would only delay the one line the user needs.
                raise _shared_error(failed)
            if problem:
                if problem != "absent":
                    say(f"data: warning: the cache {target} is unusable ({problem}); rebuilding it")
                    _discard(target)
                clock = time.perf_counter()
                try:
                    _build(data_cfg, tokenizer, seq_len, cache, key, facts, say)
                except DataError as e:
                    atomic_write_text(failed, json.dumps({"message": str(e), "reported": [_job()]}))
                    e.printed = "here"  # this process alone found it; its job's other ranks stop without a word
                    raise
                say(f"data: cache built in {time.perf_counter() - clock:.1f} s: {target}")
                built = True
                problem = verify(target)
                if problem:
                    raise DataError(f"{target}: the cache just built does not verify ({problem}); is "
                                    f"data.cache_dir on a filesystem that loses writes?")
    manifest = json.loads((target / "manifest.json").read_text())
    prepared = Prepared(key, target, Rows(target / "train", data_cfg.packing),
                        Rows(target / "val", data_cfg.packing) if manifest["val"] else None,
                        report_lines(manifest, data_cfg))
    if announce and not built:
        how = "built by another process while this one waited" if waited else "prepared earlier"
        say(f"data: cache {target} ({how}; nothing tokenised)")
    if announce:
        for line in prepared.report:
            say(line)
    return prepared


def _job() -> str:
    """This process's job: its launcher's rendezvous address (shared by every rank, on every node), or itself."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    return f"{socket.gethostname()} pid {os.getpid()}"


def _shared_error(failed: Path) -> DataError:
    """The error of the build this process waited for (the lock is held), printed once per job: by its first
    process to read it; the job's other ranks exit without repeating it."""
    record = json.loads(failed.read_text())
    error = DataError(record["message"])
    if _job() in record["reported"]:
        error.printed = "elsewhere"
    else:
        error.printed = "here"
        atomic_write_text(failed, json.dumps({**record, "reported": [*record["reported"], _job()]}))
    return error


def _check_writable(cache: Path) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / f".probe-{socket.gethostname()}-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise DataError(f"data.cache_dir: cannot write to {cache} ({e.strerror or e}); set data.cache_dir to a "
                        f"writable directory (on a cluster, a shared filesystem)") from None


class _build_lock:
    """The key's flock, waited for with a progress line (the holder's host and pid, the wait so far)."""

    def __init__(self, path: Path, say: Callable[[str], None]):
        self.path, self.say = path, say
        self._cm = None

    def __enter__(self):
        start = last = time.monotonic()
        while True:
            cm = locked(self.path, blocking=False)
            if cm.__enter__():
                self._cm = cm
                self.path.write_text(f"{socket.gethostname()} pid {os.getpid()}\n")
                return self
            cm.__exit__(None, None, None)
            now = time.monotonic()
            if now == start or now - last >= 30:
                try:
                    holder = self.path.read_text().strip() or "another process"
                except OSError:
                    holder = "another process"
                self.say(f"data: waiting for {holder} to finish preparing this data ({now - start:.0f} s so far)")
                last = now
            time.sleep(0.5)

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)


def _discard(path: Path) -> None:
    aside = path.with_name(f".discard-{path.name}-{os.getpid()}")
    try:
        os.replace(path, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Building


def _progress_bars(on: bool) -> None:
    import datasets

    (datasets.enable_progress_bars if on else datasets.disable_progress_bars)()


def _build(data_cfg, tokenizer, seq_len: int, cache: Path, key: str, facts: dict, say) -> None:
    work = cache / f".build-{key}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    _progress_bars(sys.stderr.isatty())
    try:
        fit = None if data_cfg.packing else seq_len
        train, counts = _tokenize_file(data_cfg.path, data_cfg.split, data_cfg.format, tokenizer, fit,
                                       data_cfg.too_long, data_cfg.num_proc, work / "scratch", "train", say)
        val, val_counts = None, None
        if data_cfg.val_path:
            val, val_counts = _tokenize_file(data_cfg.val_path, data_cfg.split, data_cfg.format, tokenizer, fit,
                                             data_cfg.too_long, data_cfg.num_proc, work / "scratch", "val", say)
        elif data_cfg.val_fraction:
            n_val = int(round(data_cfg.val_fraction * len(train)))
            if n_val < 1:
                raise DataError(f"data.val_fraction={data_cfg.val_fraction} of {len(train)} samples holds out no "
                                f"sample: the validation set would be empty; raise it or use data.val_path")
            order = np.random.default_rng(VAL_SPLIT_SEED).permutation(len(train))
            val, train = train.select(np.sort(order[:n_val])), train.select(np.sort(order[n_val:]))
            val_counts = {"read": n_val, "truncated": int(np.sum(val["truncated"])), "dropped": 0}
            counts = {**counts, "truncated": counts["truncated"] - val_counts["truncated"]}
        if val is not None and len(val) == 0:
            where = f"data.val_path={data_cfg.val_path}" if data_cfg.val_path else "data.val_fraction"
            raise DataError(f"{where}: the validation set is empty (no sample with a label left)")
        parts = {"train": (train, counts)}
        if val is not None:
            parts["val"] = (val, val_counts)
        manifest: dict[str, Any] = {"key": key, "facts": facts, "seq_len": seq_len, "packing": data_cfg.packing,
                                    "val": val is not None, "created": time.time()}
        for name, (ds, c) in parts.items():
            manifest[name] = _write_part(ds, c, work / name, seq_len, data_cfg.packing, say)
        shutil.rmtree(work / "scratch", ignore_errors=True)
        manifest["files"] = {str(f.relative_to(work)): _file_check(f) for f in sorted(work.rglob("*")) if f.is_file()}
        atomic_write_text(work / "manifest.json", json.dumps(manifest, indent=1) + "\n", fsync=True)
        try:
            os.rename(work, cache / key)
        except OSError:  # a process on a filesystem without flock got there first: its copy is as good
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        _progress_bars(True)


def _write_part(ds, counts: dict, out: Path, seq_len: int, packing: bool, say) -> dict:
    """Save one split's tokens (and packing plan); return its report numbers."""
    import datasets
    import pyarrow as pa

    lengths = np.asarray(ds["length"], dtype=np.int64)
    loss = int(np.sum(np.asarray(ds["loss_tokens"], dtype=np.int64)))
    ds = ds.remove_columns(["truncated"])
    ds.save_to_disk(str(out / "tokens"))
    info = {"samples": len(ds), "tokens": int(lengths.sum()), "loss_tokens": loss, **counts}
    if packing:
        clock = time.perf_counter()
        offsets, doc, start, length = pack_plan(lengths, seq_len)
        table = pa.table({name: pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values))
                          for name, values in (("doc", doc), ("start", start), ("length", length))})
        datasets.Dataset(table).save_to_disk(str(out / "rows"))
        info.update(rows=len(offsets) - 1, packing_efficiency=float(lengths.sum()) / ((len(offsets) - 1) * seq_len))
        say(f"data: packed {len(ds):,} samples into {info['rows']:,} rows in {time.perf_counter() - clock:.1f} s")
    else:
        info["rows"] = len(ds)
    return info


class _Where:
    """Names row ``i`` of a data file for an error message (picklable: it travels to ``map`` workers)."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind = path, kind

    def __call__(self, i: int) -> str:
        if self.kind == "lines":
            return f"{self.path}:{i + 1}"
        return f"{self.path} {'item' if self.kind == 'json' else 'row'} {i}"


def _read(path: Path, split: str, scratch: Path, key: str):
    """The file as a ``datasets.Dataset``: one row per line (``.jsonl``, column ``line``), per item (``.json``),
    or the file's own rows (``.parquet``, ``save_to_disk``); and how to name a row."""
    import datasets

    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(f"{path}: a directory, but not one written by datasets.save_to_disk") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split '{split}' (has {', '.join(ds)}); set data.split")
            ds = ds[split]
        return ds, _Where(path, "rows")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the dataset is empty (config key '{key}')")
        try:
            ds = datasets.Dataset.from_text(str(path), cache_dir=str(scratch / "read"), keep_linebreaks=False)
        except Exception as e:  # the text builder fails on bytes that are not UTF-8, without a line number
            if isinstance(e, UnicodeDecodeError) or isinstance(e.__cause__, UnicodeDecodeError):
                raise DataError(_first_bad_utf8(path)) from None
            raise
        return ds.rename_column("text", "line"), _Where(path, "lines")
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{path}: not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of samples (or {{\"data\": [...]}})")
        return datasets.Dataset.from_dict({"line": [json.dumps(r) for r in data]}), _Where(path, "json")
    if suffix == ".parquet":
        try:
            return datasets.Dataset.from_parquet(str(path), cache_dir=str(scratch / "read")), _Where(path, "rows")
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read parquet ({e})") from None
    raise DataError(f"{path}: unsupported data file type '{suffix}' (use .jsonl, .json, .parquet or a "
                    f"datasets.save_to_disk directory)")


def _first_bad_utf8(path: Path) -> str:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line)"
    return f"{path}: not valid UTF-8"


def _tokenize_batch(batch: dict, indices: list[int], *, fmt: str, tokenizer, seq_len: int | None, too_long: str,
                    where: _Where) -> dict:
    """``datasets.map`` body: records in, one token row per record out (blank lines leave none); a sample with
    no label left after truncation is marked ``kept=False`` and removed after the map."""
    if "line" in batch:
        records = []
        for i, line in zip(indices, batch["line"]):
            if not line.strip():
                continue
            try:
                records.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{where(i)}: malformed JSON line ({e.msg} at column {e.colno})") from None
    else:
        keys = list(batch)
        records = [(i, {k: batch[k][j] for k in keys}) for j, i in enumerate(indices)]
    samples = tokenize_records([(where(i), r) for i, r in records], fmt, tokenizer)
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "length", "loss_tokens", "truncated", "kept",
                                            "source")}
    for (i, _), s in zip(records, samples):
        kept, truncated = fit_to_length(s, where(i), seq_len, too_long)
        out["input_ids"].append(kept.input_ids if kept else [])
        out["labels"].append(kept.labels if kept else [])
        out["length"].append(len(kept.input_ids) if kept else 0)
        out["loss_tokens"].append(loss_tokens(kept.labels) if kept else 0)
        out["truncated"].append(truncated)
        out["kept"].append(kept is not None)
        out["source"].append(i)
    return out


def _tokenize_file(path: str, split: str, fmt: str, tokenizer, seq_len: int | None, too_long: str, num_proc: int,
                   scratch: Path, name: str, say):
    """Tokenise one data file into a ``datasets.Dataset`` of token rows, and its counts."""
    import datasets

    key = "data.path" if name == "train" else "data.val_path"
    raw, where = _read(Path(path), split, scratch, key)
    procs = num_proc or (1 if raw.num_rows < SMALL else min(8, os.cpu_count() or 1))
    procs = max(1, min(procs, raw.num_rows))
    say(f"data: tokenising {raw.num_rows:,} {'lines' if where.kind == 'lines' else 'rows'} of {path} "
        f"({name}, format {fmt}, {procs} process{'es' if procs > 1 else ''})")
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32")),
                                  "length": datasets.Value("int32"), "loss_tokens": datasets.Value("int32"),
                                  "truncated": datasets.Value("bool"), "kept": datasets.Value("bool"),
                                  "source": datasets.Value("int64")})
    if raw.num_rows:
        ds = raw.map(_tokenize_batch, batched=True, batch_size=1000, with_indices=True,
                     num_proc=procs if procs > 1 else None, remove_columns=raw.column_names, features=features,
                     desc=f"tokenise {name}", cache_file_name=str(scratch / f"{name}.arrow"),
                     new_fingerprint=f"{name}-tokens", load_from_cache_file=False,
                     fn_kwargs={"fmt": fmt, "tokenizer": tokenizer, "seq_len": seq_len, "too_long": too_long,
                                "where": where})
    if not raw.num_rows or not len(ds):
        raise DataError(f"{path}: the dataset is empty (config key '{key}')")
    kept = np.asarray(ds["kept"], dtype=bool)
    read = len(ds)
    if not kept.all():
        ds = ds.select(np.flatnonzero(kept))
    if len(ds) == 0:
        raise DataError(f"{path}: no sample has a response token within train.seq_len={seq_len}; raise "
                        f"train.seq_len (config key '{key}')")
    ds = ds.remove_columns(["kept"])
    return ds, {"read": read, "truncated": int(np.sum(ds["truncated"])), "dropped": read - len(ds)}


# ----------------------------------------------------------------------------------------------------------
# Checking and reading


def _file_check(f: Path) -> dict:
    import xxhash

    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(EDGE)
        fh.seek(max(0, size - EDGE))
        tail = fh.read(EDGE)
    return {"size": size, "edges": xxhash.xxh3_64(head + tail).hexdigest()}


def verify(directory: Path) -> str | None:
    """None if ``directory`` holds a complete cache; else what is wrong (``"absent"`` if nothing is there).

    Checks the manifest, then every file it lists: present, of its size, with the same first and last MiB (a
    truncated, zero-filled or rewritten file fails). Cheap: it reads at most 2 MiB a file."""
    manifest_path = directory / "manifest.json"
    if not directory.exists():
        return "absent"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "manifest.json missing or unreadable"
    if manifest.get("facts", {}).get("version") != PREP_VERSION:
        return "written by another version of the preparation code"
    for name, want in files.items():
        f = directory / name
        try:
            if _file_check(f) != want:
                return f"{name} differs from what was written (size {f.stat().st_size:,}, expected {want['size']:,})"
        except OSError:
            return f"{name} is missing"
    return None


class _ListColumn:
    """Zero-copy random access to a list column of memory-mapped Arrow record batches: ``col[i]`` is row ``i``'s
    values as a NumPy view of the file (nothing is read until it is touched)."""

    def __init__(self, chunks):
        self.starts = np.cumsum([0] + [len(c) for c in chunks])
        self.offsets = [c.offsets.to_numpy() for c in chunks]
        self.values = [c.values.to_numpy() for c in chunks]

    def __getitem__(self, i: int) -> np.ndarray:
        c = int(np.searchsorted(self.starts, i, side="right")) - 1
        j = i - self.starts[c]
        return self.values[c][self.offsets[c][j]:self.offsets[c][j + 1]]


def _memory_map(directory: Path):
    """The Arrow table of a ``save_to_disk`` directory, memory-mapped with pyarrow alone (importing ``datasets``
    costs a start about 2 s)."""
    import pyarrow as pa

    files = json.loads((directory / "state.json").read_text())["_data_files"]
    tables = [pa.ipc.open_stream(pa.memory_map(str(directory / f["filename"]), "r")).read_all() for f in files]
    return pa.concat_tables(tables)


class Rows:
    """The rows of one split, memory-mapped: ``len(rows)`` and ``rows[i]`` (a :class:`Sample`). Unpacked, a row
    is one sample; packed, the segments of its plan, each document's first label masked (nothing before it in
    the row may predict it)."""

    def __init__(self, directory: Path, packing: bool):
        self.table = _memory_map(directory / "tokens")
        self.ids = _ListColumn(self.table.column("input_ids").chunks)
        self.labels = _ListColumn(self.table.column("labels").chunks)
        self.plan = None
        if packing:
            plan = _memory_map(directory / "rows")
            self.plan = [_ListColumn(plan.column(name).chunks) for name in ("doc", "start", "length")]
            self._rows = plan.num_rows

    def __len__(self) -> int:
        return self._rows if self.plan is not None else self.table.num_rows

    def __getitem__(self, i: int) -> Sample:
        i = int(i)
        if self.plan is None:
            return Sample(self.ids[i], self.labels[i])
        docs, starts, lengths = (col[i] for col in self.plan)
        ids, labels = [], []
        for d, start, n in zip(docs.tolist(), starts.tolist(), lengths.tolist()):
            ids.append(self.ids[d][start:start + n])
            lab = self.labels[d][start:start + n].copy()
            lab[0] = IGNORE_INDEX
            labels.append(lab)
        return Sample(np.concatenate(ids), np.concatenate(labels), tuple(lengths.tolist()))

    def column(self, name: str) -> np.ndarray:
        """A scalar column of the samples (``source``: the row of the data file each came from; ``length``)."""
        return self.table.column(name).to_numpy()


def report_lines(manifest: dict, data_cfg) -> list[str]:
    out = []
    for name in ("train", "val"):
        info = manifest.get(name)
        if not info:
            continue
        source = data_cfg.val_path if name == "val" and data_cfg.val_path else data_cfg.path
        if name == "val" and not data_cfg.val_path:
            source = f"{data_cfg.path}, held out (data.val_fraction={data_cfg.val_fraction})"
        line = (f"{'data' if name == 'train' else 'validation'}: {info['samples']:,} samples, {info['tokens']:,} "
                f"tokens from {source} (format {data_cfg.format}); "
                f"{info['loss_tokens'] / max(1, info['tokens']):.1%} of tokens carry loss; ")
        if manifest["packing"]:
            line += (f"packed into {info['rows']:,} rows of up to {manifest['seq_len']} tokens "
                     f"({info['packing_efficiency']:.1%} full)")
        else:
            line += f"{info['truncated']} truncated to {manifest['seq_len']} tokens"
        line += f", {info['dropped']} dropped with no response left"
        out.append(line)
    return out
