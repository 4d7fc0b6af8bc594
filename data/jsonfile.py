"""JSON files read value by value, each value with the line it starts on (data/records.py's input).

A file is JSONL, gzipped JSONL (detected by its magic bytes, not its name), or one JSON list;
"-" reads stdin, and a UTF-8 byte-order mark is dropped. A value that is not valid JSON or not
UTF-8 becomes a DataError naming its line, so that a reader can skip it or stop on it. An
object that gives a key twice comes back as a RepeatedKey, which the record parser refuses:
json would silently keep the last value.
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
    return raw[3:] if raw[:3] == b"\xef\xbb\xbf" else raw   # a UTF-8 byte-order mark is not data


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
    if raw.lstrip()[:1] == b"[":
        try:
            text = raw.decode("utf-8")
            is_list = isinstance(json.loads(text), list)
        except (ValueError, UnicodeDecodeError, RecursionError):
            is_list = False  # not one JSON list: read it as JSONL, which names the bad line
        if is_list:
            yield from _list_items(name, text)
            return
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{name}:line {lineno}"
        try:
            yield where, _DECODER.decode(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield where, DataError(where, None, f"not UTF-8 text ({e.reason} at byte {e.start})")
        except ValueError as e:
            yield where, DataError(where, None, f"not valid JSON ({str(e)[:100]})")
        except RecursionError:
            yield where, DataError(where, None, "not valid JSON (nested too deeply)")


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
