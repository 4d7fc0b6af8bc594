"""A run folder's records: one sub-folder per stage, its stage.json and metrics.jsonl.

stage.json holds the inputs a stage ran with, which run of the stage before it built on
(`upstream`), whether it finished (a run cut short by --max-steps or --max-minutes did not),
and its summary. open_stage reads it and says whether the stage is run fresh, resumed or
reused; anything it cannot trust is one line (Fatal) that names what changed.
"""
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from model.parallel import barrier

from .records import DataError, load_records, parse_data_spec

log = logging.getLogger("rmlab.train").info


class Fatal(Exception):
    """One clear line for the user and a non-zero exit; no traceback."""


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)          # atomic: a reader sees the old file or the new one


def read_json(path):
    """The object in `path`, or None when there is no such file."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise Fatal(f"{path}: unreadable ({e}); use --redo")


def read_data_files(spec, skip_bad):
    """The records of train.py's --data (a comma list of [tag=]PATH, checked by its parser) and
    the sha256 of the files' bytes, an input of every stage. stdin cannot be hashed before it is
    read: it gets a random hash, so that its stages are never reused."""
    records, sha = [], hashlib.sha256()
    for tag, path in map(parse_data_spec, spec.split(",")):
        sha.update(Path(path).read_bytes() if path != "-" else uuid.uuid4().bytes)
        recs, stats = load_records(path, skip_bad=skip_bad, tag=tag)
        records += recs
        log(f"data: {path}: {stats.summary()}")
    if not records:
        raise DataError("--data", None, "no usable records")           # bad input: exit 2
    return records, sha.hexdigest()


# Flags that name files: their content is an input too (a checkpoint replaced at the same path).
FILE_INPUTS = ("init_from", "tokenizer", "policy")


@functools.lru_cache(maxsize=None)
def content_sha256(path):
    """sha256 of a file, or of a directory's files: their names relative to it and their bytes, in
    sorted order, hidden ones (.git, .cache) left out."""
    files = [path] if os.path.isfile(path) else []
    for folder, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(folder, n) for n in sorted(names) if not n.startswith(".")]
    sha = hashlib.sha256()
    for file in files:
        sha.update(os.path.relpath(file, path).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                sha.update(block)
    return sha.hexdigest()


def stage_inputs(parser, args, name, data_sha256):
    """What a stage's result depends on, derived from the parser, whose groups follow `data` in
    stage order: the `data` group, the stage's own group and every earlier stage's group, and the
    data files' content, and the content of the files FILE_INPUTS name. Never a `run` flag: those
    say how to run, not what is computed."""
    groups = [(g.title, [a.dest for a in g._group_actions]) for g in parser._action_groups]
    titles = [title for title, _ in groups]
    keys = [k for _, dests in groups[titles.index("data"):titles.index(name) + 1] for k in dests]
    inputs = {k: getattr(args, k) for k in keys}
    inputs.update({f"{k}_sha256": content_sha256(inputs[k]) for k in FILE_INPUTS if inputs.get(k)})
    return json.loads(json.dumps({**inputs, "data_sha256": data_sha256}))


_LOCKS = {}                        # run folder -> the open file that holds its lock, for the process's life


def _lock_run(out):
    """One train.py per run folder: a second one would interleave checkpoints and metrics. Rank 0
    holds an flock on OUT/.lock until it exits (the kernel lets go even after kill -9)."""
    if out not in _LOCKS:
        f = open(os.path.join(out, ".lock"), "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise Fatal(f"{out}: another train.py is running on this --out; wait for it, or use another")
        _LOCKS[out] = f


def _is_record(saved) -> bool:
    """Whether a stage.json holds what open_stage and finish_stage write (a hand-edit may not)."""
    types = {"inputs": dict, "upstream": str, "id": str, "done": bool}
    return isinstance(saved, dict) and all(isinstance(saved.get(k), t) for k, t in types.items())


def open_stage(folder, name, inputs, upstream, rank, redo, resume):
    """The stage's record, with mode "fresh", "resume" or "reuse". `upstream` names the run of
    the stage before and whether it finished: a stage built on another run of it is stale. A
    resumed stage gets a new id, as it will train on: what was built on its earlier run is stale."""
    if rank == 0:
        _lock_run(os.path.dirname(os.path.abspath(folder)))
    barrier()                          # every rank reads the record before rank 0 rewrites it
    record = os.path.join(folder, "stage.json")
    saved, mode = read_json(record), "fresh"
    if saved is not None and not redo:
        if not _is_record(saved):
            raise Fatal(f"stage {name}: {record} is not a stage record of this train.py; use --redo {name}")
        before = saved["inputs"]
        changed = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
        dashed = lambda k: "--" + k.removesuffix("_sha256").replace("_", "-")
        flag = lambda k: ("the data files' sha256" if k == "data_sha256" else
                          dashed(k) + "'s sha256" if k.endswith("_sha256") else dashed(k))
        if changed:
            said = "; ".join(f"{flag(k)} was {before.get(k)!r}, now {inputs.get(k)!r}" for k in changed)
            raise Fatal(f"stage {name}: {folder} was made with other inputs ({said}). "
                        f"Pass --redo {name} to run it again, or use another --out")
        if saved["upstream"] != upstream:
            log(f"[{name}] the stage before it ran again since; running {name} again")
        elif saved["done"]:
            mode = "reuse"
        elif resume:
            mode = "resume"
        else:
            why = saved.get("cut_short") or "stopped"
            raise Fatal(f"stage {name}: {folder} holds an unfinished run ({why}); pass --resume to "
                        f"continue it or --redo {name} to start over")
    if mode == "resume" and rank == 0:     # it trains on, so what later stages built on it is stale
        write_json(record, {**saved, "id": uuid.uuid4().hex})
    barrier()
    if mode == "fresh" and rank == 0:
        if os.path.exists(record):        # first: a kill mid-delete leaves no finished stage without a model
            os.remove(record)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        write_json(record, {"inputs": inputs, "upstream": upstream, "id": uuid.uuid4().hex, "done": False})
    barrier()
    log(f"[{name}] {'reusing the finished stage in' if mode == 'reuse' else mode + ' run in'} {folder}")
    return {**read_json(record), "mode": mode, "dir": folder, "name": name, "rank": rank, "t0": time.time()}


def finish_stage(st, summary, cut_short=None):
    """Marks the stage done, unless --max-steps or --max-minutes cut it short."""
    st.update(summary={**summary, "seconds": round(time.time() - st["t0"], 1)}, done=not cut_short,
              cut_short=cut_short)
    if st["rank"] == 0:
        keys = ("inputs", "upstream", "id", "done", "cut_short", "summary")
        write_json(os.path.join(st["dir"], "stage.json"), {k: st[k] for k in keys})
    barrier()
    if cut_short:
        log(f"[{st['name']}] {cut_short}: not marked finished; --resume continues it")


def _metrics_row(line):
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def keep_metrics(path, upto):
    """metrics.jsonl cut back to the rows up to a checkpoint, so a resumed run logs each step once.
    A kill during a write can tear the last line: it is dropped (its step is after the last
    checkpoint, which is saved after the row). A bad line before it means a damaged file."""
    text = Path(path).read_text() if os.path.exists(path) else ""
    rows = [_metrics_row(line) for line in text.splitlines()]
    if None in rows[:-1]:
        raise Fatal(f"{path}:line {rows.index(None) + 1}: not a metrics row; --redo this stage")
    rows = [r for r in rows if r is not None and r["step"] <= upto]
    write_metrics(path + ".tmp", rows, mode="w")
    os.replace(path + ".tmp", path)            # atomic: a kill here keeps every logged step
    return rows


def write_metrics(path, rows, mode="a"):
    """Appends `rows` to metrics.jsonl, one JSON line each (mode "w": they replace it)."""
    with open(path, mode) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
