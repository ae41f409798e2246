"""Backfill CLI: stream an NDJSON file of historical Segment calls to `POST /v1/import`.

    python -m services.ingest.backfill events.ndjson --url http://127.0.0.1:8001 --write-key wk_...

One call per line, each with its `type` and its historical `timestamp`. The file is streamed (never
held in memory), with its progress on stderr; the server's summary is printed on stdout as JSON.
Exit status: 0 all lines accepted, 1 some lines rejected (see the summary's errors), 2 the import
did not complete (run it again: lines already imported are recognized and not published twice).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import httpx
import orjson

CHUNK = 256 * 1024


class Progress:
    def __init__(self, total: int | None, out: IO[str]) -> None:
        self.total = total
        self.out = out
        self.sent = 0
        self.started = time.monotonic()
        self._last = 0.0

    def advance(self, n: int, *, force: bool = False) -> None:
        self.sent += n
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        rate = self.sent / max(now - self.started, 1e-6) / 1e6
        share = f" ({100 * self.sent / self.total:5.1f}%)" if self.total else ""
        total = f" / {self.total / 1e6:.1f}" if self.total else ""
        self.out.write(f"\rsent {self.sent / 1e6:.1f}{total} MB{share} at {rate:.1f} MB/s")
        self.out.flush()

    def server(self, line: dict[str, Any]) -> None:
        self.out.write(
            f"\rserver: {line.get('lines', 0)} lines, {line.get('accepted', 0)} accepted "
            f"({line.get('duplicates', 0)} duplicates), {line.get('rejected', 0)} rejected\n"
        )
        self.out.flush()


def file_chunks(source: IO[bytes], progress: Progress, gzip: bool) -> Iterator[bytes]:
    deflater = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if gzip else None
    while chunk := source.read(CHUNK):
        progress.advance(len(chunk))
        yield deflater.compress(chunk) if deflater is not None else chunk
    progress.advance(0, force=True)
    if deflater is not None:
        yield deflater.flush()


def run(
    path: str,
    url: str,
    *,
    write_key: str | None,
    admin_token: str | None,
    gzip: bool = True,
    stderr: IO[str] = sys.stderr,
) -> tuple[int, dict[str, Any] | None]:
    """Import one file; (exit status, the server's summary)."""
    if write_key:
        headers = {"Authorization": f"Bearer {write_key}"}
    elif admin_token:
        headers = {"Authorization": f"Bearer {admin_token}"}
    else:
        raise SystemExit("a --write-key or an --admin-token is required")
    headers["Content-Type"] = "application/x-ndjson"
    if gzip:
        headers["Content-Encoding"] = "gzip"
    source = sys.stdin.buffer if path == "-" else Path(path).open("rb")  # noqa: SIM115 (closed below)
    progress = Progress(None if path == "-" else Path(path).stat().st_size, stderr)
    summary: dict[str, Any] | None = None
    timeout = httpx.Timeout(connect=10, read=None, write=120, pool=10)
    try:
        with (
            httpx.Client(timeout=timeout) as client,
            client.stream(
                "POST",
                url.rstrip("/") + "/v1/import",
                content=file_chunks(source, progress, gzip),
                headers=headers,
            ) as response,
        ):
            stderr.write("\n")
            if response.status_code != 200:
                stderr.write(
                    f"import refused: {response.status_code} {response.read().decode(errors='replace')}\n"
                )
                return 2, None
            for raw in response.iter_lines():
                if not raw.strip():
                    continue
                line = orjson.loads(raw)
                progress.server(line)
                if line.get("type") == "summary":
                    summary = line
    except httpx.HTTPError as exc:
        stderr.write(f"\nimport interrupted: {exc!r}\n")
        return 2, summary
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    if summary is None or not summary.get("complete"):
        return 2, summary
    return (1 if summary.get("rejected") else 0), summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.ingest.backfill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", help="NDJSON file, one Segment call per line ('-' for stdin)")
    parser.add_argument("--url", default=os.environ.get("CLM_INGEST_URL", "http://127.0.0.1:8001"))
    parser.add_argument("--write-key", default=os.environ.get("CLM_WRITE_KEY"))
    parser.add_argument("--admin-token", default=os.environ.get("CLM_ADMIN_TOKEN"))
    parser.add_argument("--no-gzip", action="store_true", help="send the file uncompressed")
    args = parser.parse_args(argv)
    status, summary = run(
        args.file, args.url, write_key=args.write_key, admin_token=args.admin_token, gzip=not args.no_gzip
    )
    if summary is not None:
        sys.stdout.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
