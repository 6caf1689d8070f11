"""Read WARC and WET files record by record, and keep reading after damage.

A WARC record is a header (a ``WARC/1.0`` or ``WARC/1.1`` line, ``Name: value`` lines, a blank
line), a block of ``Content-Length`` bytes and the separator ``\\r\\n\\r\\n``. A file is plain, one
gzip member per record (as Common Crawl writes it) or one gzip stream; its magic bytes tell which.
warcio trusts every length, so one wrong Content-Length ends the file. Here a record is kept only
if its block ends in the separator; after damage the reader finds the next record and goes on,
so a damaged record costs that record alone:

- in plain bytes (a plain file, or inside a gzip member): the next ``WARC/1.`` header that
  parses (WARC-Type, numeric Content-Length), searched from just after the damaged record's header;
- between gzip members: a member's end ends its records, and after a member that does not
  decompress, the next gzip member that decompresses to ``WARC/1.`` in the compressed bytes.

It streams. A gzip member's output is handed on once its CRC is checked (a member of more than
FLUSH bytes, e.g. a whole-file stream, as it comes), and a block over ``max_bytes`` is skipped
unread (in a plain file, read again from its start to resync if its length proves wrong).
"""

from __future__ import annotations

import io
import re
import zlib
from collections import Counter
from datetime import datetime, timezone
from typing import Iterator

import fsspec
from warcio.bufferedreaders import BufferedReader, ChunkedDataReader

from tasks.pages import non_document
from tasks.readers import media_type

DOC_TYPES = ("text/html", "application/xhtml+xml", "text/plain")
SEP, HEAD, MAGIC = b"\r\n\r\n", b"WARC/1.", b"\x1f\x8b\x08"
READ, FEED, FLUSH, HEADER_MAX = 1 << 20, 1 << 16, 1 << 20, 1 << 16
EOF, END = ("eof", "", 0), ("end", "", 0)     # what ends a segment of bytes: the file, a gzip member
HTTP_END = re.compile(rb"\r?\n\r?\n")


def read_warc(path: str, max_bytes: int = 10_000_000) -> Iterator[tuple]:
    """``("keep", fields)`` for each document, ``("drop", fields, reason)`` for each other record
    and each stretch of damage, in file order, then one ``("summary", counts)``.

    Records that are not documents (request, metadata, warcinfo, revisit, dns:) get no row and are
    counted as ``skipped``; records = kept + dropped + skipped. A ``warc_bad_header`` row for bytes
    between records that are not one (they do not start with ``WARC/``) is in ``damaged`` but is
    no record, so it is not in ``dropped``.
    """
    n, damaged, types = Counter(), Counter(), Counter()
    with fsspec.open(path, "rb") as f:
        raw = bytearray(f.read(READ))
        gz = raw[:2] == MAGIC[:2]
        s = _Stream(_gzip(f, raw) if gz else _plain(f, raw), None if gz else lambda at: (f.seek(at), _plain(f))[1])
        for row in _records(s, path, max_bytes, types):
            n[row[0]] += 1
            if row[0] in ("drop", "junk") and row[2].startswith("warc_"):
                damaged[row[2]] += 1
            if row[0] != "skip":
                yield ("drop", *row[1:]) if row[0] == "junk" else row
    yield "summary", {"path": path, "records": n["keep"] + n["drop"] + n["skip"], "kept": n["keep"],
                      "dropped": n["drop"], "skipped": n["skip"], "damaged": dict(damaged), "types": dict(types)}


def _records(s: _Stream, path: str, max_bytes: int, types: Counter) -> Iterator[tuple]:
    """Rows in file order, with ("skip",) for a record that is not a document and ("junk", fields,
    "warc_bad_header") for bytes between records that are not one."""
    source = f"warc:{path}"

    def damage(reason, error, h, at, kind="drop"):  # what the header told, else where it happened
        return kind, {"source": source, "url": h.get("warc-target-uri", f"{path}#{at}"), "status": None,
                      "content_type": None, "fetched_at": _date(h.get("warc-date")),
                      "record_id": h.get("warc-record-id"), "error": error}, reason

    while True:
        while s.fill(1) and s.buf[0] in b"\r\n":    # blank lines between records
            s.consume(1)
        at, parsed = s.offset, _header(s)
        h = parsed[0] if parsed else {}
        if not s.buf:                                 # a segment ends: the file, a gzip member
            edge, why, raw_at = s.next_segment()
            if edge == "eof":
                return
            if edge != "end":                         # junk, bad_gzip, cut: a member's trouble
                reason = {"junk": "warc_bad_header", "cut": "warc_truncated"}.get(edge, "warc_bad_gzip")
                yield damage(reason, why, {}, raw_at, "junk" if edge == "junk" else "drop")
            continue
        if not (parsed and _usable(h)):
            record = parsed is not None or s.buf.startswith(b"WARC/")     # a damaged record, not junk
            what = "a record header without WARC-Type or numeric Content-Length" if parsed else "not a record header"
            skipped = s.resync(1)
            edge, why, _ = s.next_segment() if skipped is None else (None, "", 0)
            if edge == "bad_gzip":
                yield damage("warc_bad_gzip", why, h, at)
            elif edge == "eof" and record and not parsed:
                yield damage("warc_truncated", f"the file ends inside the record header at byte {at}", h, at)
            else:
                rest = f"{skipped} bytes" if skipped is not None else \
                    f"the rest of the {'gzip member' if edge == 'end' else 'file'}"
                where = f"{'' if s.reopen else 'uncompressed '}byte {at}"
                yield damage("warc_bad_header", f"{what} at {where}; {rest} skipped", h, at,
                             "drop" if record else "junk")
            continue
        s.consume(parsed[1])
        kind, length, block_at = h["warc-type"], int(h["content-length"]), s.offset
        types[kind] += 1
        if big := length > max_bytes:               # skipped as it streams by, never held
            have, end = s.skip(length), 0
        else:
            s.fill(length + 4)
            have, end = min(length, len(s.buf)), length
        complete = have == length and s.fill(end + 4)
        if complete and s.buf[end:end + 4] == SEP:
            block = None if big else bytes(s.buf[:length])
            s.consume(end + 4)
            yield _row(kind, h, block, source, max_bytes) or ("skip",)
            continue
        # the block does not end where it says: look for the next record from the block's start
        rewound = big and s.rewind(block_at)
        skipped = s.resync(0)
        edge, why, _ = s.next_segment() if skipped is None else (None, "", 0)
        if edge == "bad_gzip":
            yield damage("warc_bad_gzip", why, h, at)
        elif edge == "eof" and not complete:
            yield damage("warc_truncated", f"the file ends {have} bytes into its {length}-byte block", h, at)
        else:
            real = None if skipped is None else skipped + (length if big and not rewound else 0)
            yield damage("warc_bad_length", f"declared Content-Length {length}, but " + (
                f"the record ends after {real} bytes" if real is not None else
                f"its gzip member ends after {have} bytes" if not complete else
                "neither a record separator nor another record follows"), h, at)


def _row(kind: str, h: dict, block: bytes | None, source: str, max_bytes: int) -> tuple | None:
    """keep or drop for a record that ends where it says; None if it is not a document."""
    url = h.get("warc-target-uri", "")
    if kind not in ("response", "resource", "conversion") or \
            kind == "response" and not url.startswith(("http:", "https:")):
        return None                                   # request, metadata, ..., and dns: responses
    ctype, charset = media_type(h.get("content-type")) if kind == "resource" else ("text/plain", "utf-8")
    meta = {"source": source, "url": url, "status": None if kind == "response" else 200,   # HTTP's: in the block
            "content_type": None if kind == "response" else ctype, "fetched_at": _date(h.get("warc-date")),
            "record_id": h.get("warc-record-id")}
    why = non_document(url)
    if why:
        return "drop", {**meta, "error": why}, "not_document"
    if block is None:
        error = f"block of {h['content-length']} bytes, over max_bytes {max_bytes}"
        return "drop", {**meta, "error": error}, "too_large"
    body = block
    if kind == "response":
        status, headers, body = _http(block)
        meta["status"], (meta["content_type"], charset) = status, media_type(headers.get("content-type"))
        if status is None:
            return "drop", {**meta, "error": f"no HTTP status line: {block[:80]!r}"}, "http_invalid"
        if (body := _decode(body, headers, max_bytes)) is None:
            return "drop", {**meta, "error": f"payload decodes to over max_bytes {max_bytes}"}, "too_large"
    if meta["status"] != 200:
        return "drop", {**meta, "error": f"HTTP {meta['status']}"}, f"http_{meta['status']}"
    if meta["content_type"] not in DOC_TYPES:
        return "drop", {**meta, "error": f"content type {meta['content_type']!r}"}, "not_html"
    if not body or body.isspace():
        return "drop", {**meta, "error": "empty payload"}, "empty_body"
    return "keep", {**meta, "charset": charset, "body": body, "wet": kind == "conversion"}


def _http(block: bytes) -> tuple[int | None, dict, bytes]:
    """(status, headers with lowercased names, payload) of an HTTP response; lines may end in \\n."""
    m = HTTP_END.search(block)
    head, payload = (block[:m.start()], block[m.end():]) if m else (block, b"")
    lines = head.decode("latin-1").split("\n")
    status = lines[0].split(None, 2)
    headers = dict((k.strip().lower(), v.strip()) for k, colon, v in (x.partition(":") for x in lines[1:]) if colon)
    ok = len(status) > 1 and status[0].upper().startswith("HTTP/") and status[1].isdigit()
    return int(status[1]) if ok else None, headers, payload


def _decode(payload: bytes, headers: dict, max_bytes: int) -> bytes | None:
    """The payload with Transfer-Encoding chunked and Content-Encoding undone by warcio's readers,
    as its ``content_stream()`` does; None if that is over max_bytes."""
    encoding = headers.get("content-encoding", "").lower()
    encoding = encoding if encoding in BufferedReader.get_supported_decompressors() else None
    if headers.get("transfer-encoding") == "chunked":
        payload = ChunkedDataReader(io.BytesIO(payload), decomp_type=encoding).read(max_bytes + 1)
    elif encoding:
        payload = BufferedReader(io.BytesIO(payload), decomp_type=encoding).read(max_bytes + 1)
    return None if len(payload) > max_bytes else payload


class _Stream:
    """Look-ahead over decompressed bytes, one segment (the file, a gzip member) at a time.

    ``edge``: what ended the segment, once the buffer has reached it: EOF, END, or (kind, why,
    file offset) for "bad_gzip" (a member that does not decompress), "cut" (a member the file ends
    in before it gave a byte) and "junk" (bytes between members that are not one). ``offset``:
    bytes consumed before ``buf``. ``reopen(offset)``: a plain file's bytes from there on.
    """

    def __init__(self, chunks: Iterator, reopen=None):
        self.chunks, self.reopen, self.buf, self.edge, self.offset = chunks, reopen, bytearray(), None, 0

    def fill(self, n: int) -> bool:
        """Buffer at least n bytes of this segment; False if it ends first."""
        while len(self.buf) < n and self.edge is None:
            chunk = next(self.chunks, EOF)
            if isinstance(chunk, tuple):
                self.edge = chunk
            else:
                self.buf += chunk
        return len(self.buf) >= n

    def consume(self, n: int) -> None:
        del self.buf[:n]
        self.offset += n

    def skip(self, n: int) -> int:
        """Consume n bytes, not holding them; fewer if the segment ends first."""
        done = 0
        while done < n and self.fill(1):
            k = min(n - done, len(self.buf))
            self.consume(k)
            done += k
        return done

    def rewind(self, offset: int) -> bool:
        """Go back to an earlier offset of a plain file; False if it cannot (gzip, not seekable)."""
        if self.reopen is None:
            return False
        try:
            self.chunks = self.reopen(offset)
        except (OSError, ValueError):               # io.UnsupportedOperation is both
            return False
        self.buf, self.edge, self.offset = bytearray(), None, offset
        return True

    def next_segment(self) -> tuple:
        """Drop the rest of this segment; what ended it."""
        self.consume(len(self.buf))
        edge, self.edge = self.edge or EOF, None
        return edge

    def resync(self, start: int) -> int | None:
        """Consume up to the next record header at or after buf[start]; how many bytes the damaged
        stretch has (less a separator before that header), or None if the segment ends first."""
        dropped = 0
        while True:
            i = self.buf.find(HEAD, start)
            if i < 0:
                k = max(start, len(self.buf) - len(HEAD))   # a header may start in the last bytes
                self.consume(k)
                dropped, start = dropped + k, 0
                if not self.fill(len(self.buf) + 1):
                    self.consume(len(self.buf))
                    return None
            elif (found := _header(self, i)) and _usable(found[0]):
                end = dropped + i - (len(SEP) if self.buf[max(i - len(SEP), 0):i] == SEP else 0)
                self.consume(i)
                return end
            else:
                start = i + 1


def _header(s: _Stream, at: int = 0) -> tuple[dict, int] | None:
    """(fields with lowercased names, length) of the record header at buf[at:], or None."""
    if not s.fill(at + len(HEAD)) or s.buf[at:at + len(HEAD)] != HEAD:
        return None
    while (end := s.buf.find(SEP, at, at + HEADER_MAX)) < 0:
        if len(s.buf) >= at + HEADER_MAX or not s.fill(len(s.buf) + 1):
            return None
    head = s.buf[at:end]
    try:
        lines = head.decode().split("\r\n")
    except UnicodeDecodeError:
        lines = head.decode("latin-1").split("\r\n")
    if lines[0] not in ("WARC/1.0", "WARC/1.1"):
        return None
    h = dict((k.strip().lower(), v.strip()) for k, colon, v in (x.partition(":") for x in lines[1:]) if colon)
    return h, end + len(SEP) - at


def _usable(h: dict) -> bool:
    return "warc-type" in h and h.get("content-length", "").isdecimal()


def _plain(f, raw: bytes = b"") -> Iterator[bytes]:
    yield bytes(raw)
    while chunk := f.read(READ):
        yield chunk


def _gzip(f, raw: bytearray) -> Iterator:
    """Each gzip member's decompressed bytes, then END; or an edge for trouble (see _Stream)."""
    at = 0                                            # file offset of raw[0]
    while True:
        if len(raw) < len(MAGIC):
            raw += f.read(FEED)
        if not raw:
            return
        if raw[:len(MAGIC)] != MAGIC:
            skipped = _next_member(f, raw, 0)
            yield "junk", f"{skipped} bytes at byte {at} are not a gzip member", at
            at += skipped
            continue
        d, pos, start, out, size, gave = zlib.decompressobj(31), 0, 1, [], 0, False
        try:
            while not d.eof:
                if pos == len(raw) and not (more := f.read(FEED)):    # the file ends in this member
                    yield b"".join(out) if size or gave else \
                        ("cut", f"the file ends in the gzip member at byte {at}", at)
                    return
                if pos == len(raw):
                    raw += more
                piece = raw[pos:pos + FEED]
                out.append(d.decompress(piece))
                size, pos = size + len(out[-1]), pos + len(piece) - len(d.unused_data)
                if size > FLUSH:                      # a big member: handed on as it comes
                    chunk, out, size, gave = b"".join(out), [], 0, True
                    yield chunk
                if pos > 4 * FEED:                    # hold only so much of a big member
                    del raw[:pos]
                    at, pos, start = at + pos, 0, 0
        except zlib.error as e:                       # its output, unchecked, is dropped
            yield "bad_gzip", f"gzip member at byte {at} does not decompress: {e}", at
            at += _next_member(f, raw, start)
            continue
        del raw[:pos]
        at += pos
        yield b"".join(out)
        yield END


def _next_member(f, raw: bytearray, start: int) -> int:
    """Drop bytes from raw, reading on from f, up to the next gzip member at or after raw[start]
    that decompresses to ``WARC/1.``; how many were dropped (all of them at the end of the file)."""
    dropped = 0
    while True:
        i = raw.find(MAGIC, start)
        if i < 0:
            k = max(start, len(raw) - len(MAGIC) + 1)
            del raw[:k]
            dropped, start = dropped + k, 0
            if not (more := f.read(FEED)):
                dropped += len(raw)
                raw.clear()
                return dropped
            raw += more
            continue
        while len(raw) < i + FEED and (more := f.read(FEED)):
            raw += more
        try:
            if zlib.decompressobj(31).decompress(raw[i:i + FEED], len(HEAD)) == HEAD:
                del raw[:i]
                return dropped + i
        except zlib.error:
            pass
        start = i + 1


def _date(value: str | None) -> datetime | None:
    try:
        d = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return None
    return (d if d.tzinfo else d.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
