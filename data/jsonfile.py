"""JSON files read value by value, each value with the line it starts on (data/records.py's input).

A file is JSONL, gzipped JSONL (detected by its magic bytes, not its name), or one JSON list;
"-" reads stdin, and a UTF-8 byte-order mark is dropped. A value that is not valid JSON or not
UTF-8 becomes a DataError naming its line, so that a reader can skip it or stop on it. A file
that cannot be read at all raises one: corrupt gzip, UTF-16 or -32, JSON objects over many lines
(one pretty-printed record, records wrapped as {"data": [...]}, `jq .` output), whose every line
read as JSONL would be an error of its own. A JSON list over many lines with a syntax error names
the line json stopped at (its first record's error), then reads as JSONL. An object that gives a
key twice comes back as a RepeatedKey, which the record parser refuses: json would silently keep
the last value.
"""
import gzip
import json
import sys
import zlib
from pathlib import Path
from typing import Iterator, Optional, Tuple


class DataError(ValueError):
    """A malformed record. The message reads `FILE:line N: field 'F': problem`."""

    def __init__(self, where: str, field_name: Optional[str], problem: str):
        what = f"field {field_name!r}: " if field_name else ""
        super().__init__(f"{where}: {what}{problem}")


def _read_bytes(path: str) -> bytes:
    raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:   # zlib.error: a corrupt deflate body
            raise DataError(path, None, f"corrupt gzip stream ({e})") from None
    for bom, codec in ((b"\xff\xfe\0\0", "utf-32-le"), (b"\0\0\xfe\xff", "utf-32-be"),
                       (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if raw.startswith(bom) and _decodes(raw[len(bom):], codec):   # else: bad bytes, named line by line
            raise DataError(path, None, f"{codec.upper()} text (byte-order mark {bom.hex(' ')}): "
                            "save it as UTF-8")
    return raw[3:] if raw[:3] == b"\xef\xbb\xbf" else raw   # a UTF-8 byte-order mark is not data


def _decodes(raw: bytes, codec: str) -> bool:
    try:
        raw.decode(codec)
        return True
    except UnicodeDecodeError:
        return False


class RepeatedKey(dict):
    """A JSON object that gave a key twice: json keeps the last value; parse_record refuses it."""
    duplicate: str = ""


def _object(pairs):
    """json's hook for each object, given its (key, value) pairs in file order."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen = set()
        obj = RepeatedKey(obj)
        for key, _ in pairs:
            if key in seen:
                obj.duplicate = key
                break
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_object)     # one for JSONL lines and list items alike


def iter_json_values(path: str) -> Iterator[Tuple[str, object]]:
    """(where, parsed value or DataError) for each record of a file, in order.

    A file whose whole text is one JSON list is read as a list (`where` names the line on
    which each item starts). Anything else is JSONL: one value per non-blank line.
    """
    name = "<stdin>" if path == "-" else path
    raw = _read_bytes(path)
    start = len(raw) - len(raw.lstrip())             # the first non-blank byte
    jsonl = _first_line_is_json(raw, start)          # a JSONL file's: nothing spans lines
    broken_list = None
    if raw[start:start + 1] == b"{" and not jsonl:
        _refuse_multiline_object(name, raw)
    if raw[start:start + 1] == b"[":
        try:
            text = raw.decode("utf-8")
            is_list = isinstance(json.loads(text), list)
        except json.JSONDecodeError as e:
            broken_list, is_list = None if jsonl else _broken_list(name, text, e), False
        except (ValueError, UnicodeDecodeError, RecursionError):
            is_list = False  # not one JSON list: read it as JSONL, which names the bad line
        if is_list:
            yield from _list_items(name, text)
            return
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{name}:line {lineno}"
        if broken_list:            # the list's first line, not JSON alone: its error names the real line
            yield where, broken_list
            broken_list = None
            continue
        try:
            yield where, _DECODER.decode(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield where, DataError(where, None, f"not UTF-8 text ({e.reason} at byte {e.start})")
        except ValueError as e:
            yield where, DataError(where, None, f"not valid JSON ({str(e)[:100]})")
        except RecursionError:
            yield where, DataError(where, None, "not valid JSON (nested too deeply)")


def _first_line_is_json(raw: bytes, start: int) -> bool:
    """Whether the line at `start` is a JSON value of its own, as a JSONL file's first line is."""
    end = raw.find(b"\n", start)
    try:
        _DECODER.decode(raw[start:end if end >= 0 else len(raw)].decode("utf-8"))
        return True
    except (ValueError, RecursionError):          # UnicodeDecodeError is a ValueError
        return False


def _refuse_multiline_object(name: str, raw: bytes):
    """Raises the one error of a file that starts with a JSON object over many lines (its first
    line is not JSON of its own), if it is the file's only value or the next value spans many
    lines too (pretty-printed objects, as `jq .` writes them). Anything else is left to the JSONL
    reader, which names the bad line (a broken object; a JSONL record broken over two lines, which
    --skip-bad may skip)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return
    first = _multiline_value(text, 0)
    if first is None:
        return
    expected = "expected JSONL (one record per line) or a JSON list of records"
    if text[first[1]:].strip():
        if _multiline_value(text, first[1]) is not None:
            raise DataError(name, None, f"JSON objects over many lines (pretty-printed); {expected}")
        return
    key = wrapped_records(first[0])
    raise DataError(name, None, f"one JSON object over many lines; {expected}"
                    + (f': the records seem to be under "{key}": give that list' if key else ""))


def _multiline_value(text: str, pos: int) -> Optional[Tuple[object, int]]:
    """(value, end) of the JSON value after `pos` (and whitespace) if it spans many lines, else None."""
    start = len(text) - len(text[pos:].lstrip())
    try:
        value, end = _DECODER.raw_decode(text, start)
    except (ValueError, RecursionError):
        return None
    return (value, end) if "\n" in text[start:end] else None


def wrapped_records(obj) -> Optional[str]:
    """The key of an object that wraps a list of records, {"data": [{"prompt": ...}, ...]}, or None."""
    looks_like_record = lambda x: isinstance(x, dict) and {"prompt", "chosen", "responses"} & x.keys()
    if not isinstance(obj, dict):
        return None
    return next((key for key, value in obj.items()
                 if isinstance(value, list) and value and all(map(looks_like_record, value))), None)


def _broken_list(name: str, text: str, error: json.JSONDecodeError) -> Optional[DataError]:
    """The error of a file that starts with "[" and is not JSON, when it is one JSON list over many
    lines (its first line is no value of its own) and the error lies past that line. Read as
    JSONL, its first line would be the error (line 1); this names the line json stopped at."""
    start = len(text) - len(text.lstrip())
    if error.lineno == text.count("\n", 0, start) + 1:
        return None                              # the first line itself: JSONL names it
    return DataError(f"{name}:line {error.lineno}", None,
                     f"not valid JSON ({error.msg} at column {error.colno}) in this file's JSON list")


def _list_items(name: str, text: str) -> Iterator[Tuple[str, object]]:
    """Walks a JSON list (already known to parse) item by item, counting lines as it goes."""
    pos, line, counted = text.index("[") + 1, 1, 0
    while True:
        while text[pos] in " \t\r\n,":
            pos += 1
        if text[pos] == "]":
            return
        line += text.count("\n", counted, pos)
        counted = pos
        value, pos = _DECODER.raw_decode(text, pos)
        yield f"{name}:line {line}", value
