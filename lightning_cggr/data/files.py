"""The user's data files, read and checked before anything is built, and the cache folder.

Only the standard library: :func:`lightning_cggr.config.validate` reads the data files named in a
config through these functions, so that a mistake in one is reported before torch's heavier
companions (Lightning, transformers) are imported.

- text files (``data.source=files``): UTF-8, not binary, not empty; ``data.paths`` may also name
  folders and patterns (:func:`expand_paths`);
- chat files (``data.source=chat``): JSONL, one ``{"messages": [{"role": ..., "content": ...}]}``
  per non-blank line.
"""

from __future__ import annotations

import codecs
import functools
import json
import lzma
import os
import zlib
from pathlib import Path

from ..errors import DataError

Conversation = list[dict[str, str]]


def cache_dir(override: str | None = None) -> Path:
    """Where trained tokenizers and tokenized corpora are cached: ``override`` (``data.cache_dir``),
    else ``$LIGHTNING_CGGR_CACHE``, else ``~/.cache/lightning_cggr`` (``~`` expanded in each);
    created if missing. A folder that cannot be created is a :class:`DataError` naming both settings."""
    root = override or os.environ.get("LIGHTNING_CGGR_CACHE") or Path.home() / ".cache" / "lightning_cggr"
    path = Path(root).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the cache folder {path} ({err.strerror or err}); set data.cache_dir (or "
                        f"$LIGHTNING_CGGR_CACHE) to a writable folder") from err
    return path



def expand_paths(paths: list[str | Path]) -> list[str]:
    """``data.paths`` as the files they name, in order: a file as it is; a folder, the files under it
    (in subfolders too; hidden ones skipped), sorted; a pattern with ``*``, ``?`` or ``[...]`` (``**``
    for any depth), the files it matches, sorted. A folder without files or a pattern matching none
    is a :class:`DataError` naming it, and so is a file named twice (also through a folder, a pattern
    or another spelling of its path); a missing file is left for the reader to name."""
    import glob

    files: list[str] = []
    seen: dict[Path, str] = {}  # each file (as the system resolves it) by the entry that named it first
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(str(f) for f in path.rglob("*")
                           if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))
            if not found:
                hidden = sum(1 for f in path.rglob("*") if f.is_file())
                skipped = (f" ({hidden} hidden file{'s' * (hidden > 1)}, under names starting with '.', "
                           "skipped: name one to read it)") if hidden else ""
                raise DataError(f"{raw} is a folder without files{skipped}; give a folder that holds the data "
                                "files, or the files")
        elif not path.exists() and any(c in str(raw) for c in "*?["):
            found = sorted(f for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
            if not found:
                raise DataError(f"{raw} matches no file")
        else:
            found = [str(raw)]
        for f in found:
            key = Path(f).expanduser().resolve()
            if key in seen:
                by = "" if str(raw) == seen[key] else f" (by {seen[key]} and by {raw})"
                raise DataError(f"{f} is named twice in data.paths{by}, and would be read twice; name each file once")
            seen[key] = str(raw)
        files += found
    return files


COMPRESSIONS = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
"""Compressed data files, told by their first bytes and read through the standard library."""
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BROKEN_ARCHIVE = (OSError, EOFError, lzma.LZMAError, zlib.error)
"""What reading a damaged or cut compressed file raises (gzip's and bz2's OSError, xz's LZMAError,
an inflate error, a stream that ends early)."""


def open_data_file(path: Path):
    """``path`` opened for reading bytes: a gzip, bzip2 or xz file (by its first bytes, whatever
    its name) through its decompressor, any other file as it is. A zstd file is a
    :class:`DataError` naming the command that decompresses it (the standard library has no zstd)."""
    import bz2
    import gzip

    with path.open("rb") as f:
        head = f.read(6)
    if head.startswith(ZSTD_MAGIC):
        raise DataError(f"{path} is zstd-compressed, which this reader cannot open; decompress it first "
                        f"(zstd -d {path.name}), or recompress it with gzip")
    kind = next((name for magic, name in COMPRESSIONS.items() if head.startswith(magic)), None)
    opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}.get(kind, open)
    return opener(path, "rb")


_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
              (codecs.BOM_UTF16_BE, "UTF-16"))
"""Byte-order marks of the encodings whose text holds NUL bytes (UTF-32's first: UTF-16 LE's is its prefix)."""


def _utf16_without_bom(data: bytes) -> str | None:
    """``UTF-16LE`` or ``UTF-16BE`` where the start of ``data`` has a NUL in (nearly) every odd or every
    even byte and none in the others, as mostly-ASCII text in UTF-16 has; else None."""
    head = data[:4096]
    head = head[: len(head) // 2 * 2]
    if len(head) < 8:
        return None
    even, odd = head[0::2].count(0) / (len(head) // 2), head[1::2].count(0) / (len(head) // 2)
    if odd > 0.9 and even < 0.05:
        return "UTF-16LE"
    if even > 0.9 and odd < 0.05:
        return "UTF-16BE"
    return None


def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of a data file (gzip, bzip2 or xz compressed ones decompressed); a missing,
    empty, binary or non-UTF-8 file is a :class:`DataError` naming the file, the line and the byte.
    Line ends are read as Python's text mode reads them (Windows' CRLF and old Macs' CR are
    newlines), and a leading byte-order mark (Windows editors write one) is dropped, so a text
    tokenizes alike whichever system saved it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    try:
        with open_data_file(path) as f:
            data = f.read()
    except _BROKEN_ARCHIVE as err:
        raise DataError(f"{path} cannot be decompressed ({err}); give the file whole, or decompressed") from err
    nul = data.find(b"\0")  # before decoding: a binary file is not "text in another encoding"
    if nul >= 0:
        for bom, encoding in _WIDE_BOMS:
            if data.startswith(bom):
                raise DataError(f"{path} is {encoding} text (by its byte-order mark); give UTF-8 text files "
                                f"(convert one with e.g. iconv -f {encoding} -t UTF-8)")
        if wide := _utf16_without_bom(data):
            raise DataError(f"{path} looks like {wide} text without a byte-order mark (a NUL byte every other "
                            f"byte); give UTF-8 text files (convert one with e.g. iconv -f {wide} -t UTF-8)")
        line = data.count(b"\n", 0, nul) + 1
        raise DataError(f"{path} is binary data, not text (a NUL byte at line {line}, byte offset {nul}); "
                        "give UTF-8 text files")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} at line {line}, byte offset {err.start}); "
            "give UTF-8 text files (convert one with e.g. iconv -f LATIN1 -t UTF-8)"
        ) from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise DataError(f"{path} is empty; give files with text in them")
    return text.replace("\r\n", "\n").replace("\r", "\n")


@functools.lru_cache(maxsize=256)
def _read_problem(read, path: str, mtime_ns: int, size: int) -> str | None:
    try:
        read(path)
    except DataError as err:
        return str(err)
    return None


def _file_problem(read, path: str | Path) -> str | None:
    """What ``read`` finds wrong with a data file, or None (remembered while the file is unchanged)."""
    path = Path(path).expanduser()
    if not path.is_file():
        return f"{path} does not exist or is not a file"
    st = path.stat()
    return _read_problem(read, str(path), st.st_mtime_ns, st.st_size)


def text_file_problem(path: str | Path) -> str | None:
    """What is wrong with a text data file, or None."""
    return _file_problem(read_text_file, path)


def read_chat_jsonl(path: str | Path) -> list[Conversation]:
    """Conversations of a JSONL file (gzip, bzip2 or xz compressed ones decompressed, see
    :func:`open_data_file`); a missing, empty, non-UTF-8 or malformed file is a :class:`DataError`
    naming the file and the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    conversations: list[Conversation] = []
    try:
        with open_data_file(path) as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(
                        f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x}); chat files must be UTF-8 JSONL"
                    ) from None
                if lineno == 1:  # a byte-order mark (Windows editors write one) is not JSON's
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f'{where}: not valid JSON ({err.msg}, column {err.colno}); each line must be one '
                        '{"messages": [{"role": ..., "content": ...}, ...]} object'
                    ) from None
                conversations.append(_validate_record(record, where))
    except _BROKEN_ARCHIVE as err:
        raise DataError(f"{path} cannot be decompressed ({err}); give the file whole, or decompressed") from err
    if not conversations:
        raise DataError(f"{path} has no conversations; give JSONL lines of {{\"messages\": [...]}}")
    return conversations


def chat_file_problem(path: str | Path) -> str | None:
    """What is wrong with a chat JSONL file, or None."""
    return _file_problem(read_chat_jsonl, path)


def _validate_record(record: object, where: str) -> Conversation:
    if not isinstance(record, dict) or "messages" not in record:
        raise DataError(f'{where}: expected an object with a "messages" list')
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list')
    out: Conversation = []
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: message {k} is not an object")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise DataError(f'{where}: message {k} needs a non-empty string "role"')
        if not isinstance(content, str):
            raise DataError(f'{where}: message {k} needs a string "content"')
        out.append({"role": role, "content": content})
    return out
