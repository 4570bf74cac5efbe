"""Files dynarank reads and writes (runs, adapters, checkpoints), with errors that name the file.

JSON, JSON Lines and YAML are read with their path in every error (a damaged file is one line, never a
traceback); JSON Lines logs tolerate the torn last line a kill leaves. Writes that fail (a full disk) say which
path failed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


class RunFileError(ValueError):
    """A file of a run or adapter (written by dynarank, read back) is damaged or of the wrong shape."""


def _kind(value) -> str:
    return {list: "a list", str: "text", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object held by ``path``; RunFileError names the file when it is not one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RunFileError(f"{path} is not UTF-8 text: the file is damaged.") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunFileError(
            f"{path} is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno}): the file is damaged."
        ) from None
    if not isinstance(value, dict):
        raise RunFileError(f"{path} must hold a JSON object, not {_kind(value)}: the file is damaged.")
    return value


class _RepeatedKey(Exception):
    """A YAML mapping's key met a second time: (key, 1-based line)."""


def _unique_key_loader():
    """PyYAML's safe loader, refusing a mapping that holds a key twice (the safe loader keeps the last silently:
    ``r: 2`` then ``r: 3`` would be r = 3), as a JSON object with a key twice is refused."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise _RepeatedKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def read_yaml(path: str | os.PathLike) -> dict:
    """The mapping held by the YAML file ``path`` (safe loader: no tags, no objects); errors name the file."""
    import yaml

    path = Path(path)
    try:
        value = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_unique_key_loader())
    except UnicodeDecodeError:
        raise RunFileError(f"{path} is not UTF-8 text.") from None
    except _RepeatedKey as exc:
        key, line = exc.args
        raise RunFileError(f"{path}, line {line}: the key {key!r} is given twice; keep one.") from None
    except yaml.YAMLError as exc:
        raise RunFileError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(value, dict):
        raise RunFileError(f"{path} must hold a mapping of option: value, not {_kind(value)}.")
    return value


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a JSON Lines log, one per line (blank lines skipped).

    A last line without its newline that does not parse is what a kill in the middle of a write leaves: it is
    dropped with a warning. Any other line that is not a JSON object raises RunFileError naming file and line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise RunFileError(f"{path} is not UTF-8 text: the file is damaged.") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: a torn write
                logger.warning("dynarank: %s: dropping its unfinished last line (cut off by a kill)", path)
                break
            raise RunFileError(f"{path}, line {number}: not valid JSON ({exc.msg}): the file is damaged.") from None
        if not isinstance(record, dict):
            raise RunFileError(f"{path}, line {number}: expected a JSON object, got {_kind(record)}.")
        records.append(record)
    return records


def read_safetensors(path: str | os.PathLike, error: type[Exception], sha256: str | None = None) -> dict:
    """The tensors of a safetensors file, read once: with ``sha256``, the bytes must match it before they are parsed,
    so what is verified is what is loaded. ``error`` (an exception class) names the file when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or exc}).") from None
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise error(f"{path} does not match its recorded checksum: the file is truncated, damaged or was modified.")
    try:
        return load(blob)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise error(f"{path} is not a readable safetensors file ({' '.join(str(exc).split())}).") from None


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (what read_safetensors checks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- writing
_OS_CODE = re.compile(r"code: (\d+)")


@contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Errors of the writes inside the block name ``path``: an OSError without a file name (a full disk is
    reported by write(), which has none) gets it, and a safetensors write error becomes that OSError."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from None
    except SafetensorError as exc:  # e.g. 'IoError(Os { code: 28, kind: StorageFull, message: "No space ..." })'
        code = _OS_CODE.search(str(exc))
        if code is None:
            raise OSError(0, f"cannot write it ({exc})", str(path)) from None
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def replace_file(path: str | os.PathLike, data: bytes) -> None:
    """Write ``path`` whole or not at all: ``data`` goes to a synced temporary sibling renamed over it, so a kill
    leaves the previous content (or no file), never a torn one. A failure names the path."""
    path = Path(path)
    staged = path.with_name(f".{path.name}.tmp")
    try:
        write_synced(staged, data)
        staged.replace(path)
    except OSError as exc:
        staged.unlink(missing_ok=True)
        if exc.filename == str(staged):
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def sibling_directory(target: str | os.PathLike) -> Path:
    """A new empty directory ``.<name>.<random>`` beside ``target``, to fill and rename into place.

    Unique as ``tempfile.mkdtemp``'s (the random part is hex: no dots), but made as an ordinary ``mkdir`` makes one,
    with the permissions the umask gives (mkdtemp's are 0700, which the directory keeps when it is renamed into
    place: a server running as another user could not read the adapter it holds).
    """
    target = Path(target)
    for _ in range(100):
        path = target.parent / f".{target.name}.{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no free temporary name beside it", str(target))


def write_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` and force it to disk (a rename is only as durable as the bytes it points at)."""
    with naming(path), open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
