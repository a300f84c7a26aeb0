"""An HTTP server for tests that misbehaves on request, the way real servers and networks do.

Files under `root` are served at /<token>/<name>?<faults>. The token (any string) keeps each
test's request counters apart; faults are query parameters:

    times=N         how many responses the faults below apply to (default 1)
    status=CODE     answer CODE instead of the file
    drop_after=N    close the connection after N bytes of the body
    stall_after=N   stop sending after N bytes of the body for `stall` seconds (default 5)
    ranges=0        ignore Range and If-Range: always send the whole file
    etag=changing   a new ETag on every response (the object "is replaced")
    etag=weak       a weak ETag (W/"...") and a Last-Modified date
    html=1          answer 200 with an HTML page (Content-Type from `ctype`, default text/html)
    ctype=TYPE      Content-Type of the answer
    redirect=URL    answer 302 to URL (on every request); `self` redirects to itself
    retry_after=S   Retry-After header on error statuses
    rate=BYTES      send each response's body at most this many bytes per second, in writes of
                    at most an eighth of a second's worth (rate=1 trickles byte by byte)
    from_zero=1     answer every Range with 206 and that many bytes from byte 0, with a
                    Content-Range saying so (a broken cache); on every response
    echo=1          with `status`: a reason phrase quoting the request's headers, as some
                    proxies do
    s3_error=CODE   with `status`: an S3 XML error body naming CODE
    region=NAME     with `status`: the x-amz-bucket-region header S3 sends on a wrong region

Faults can also be set per token with `configure(token, **faults)`: that is how S3 clients,
which build their own URLs, get them (the token is the bucket, the file name the key).
An `If-Match` that is not the current ETag is answered 412, as S3 does.

Every request's method, path and headers are recorded in `requests[token]`.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MODIFIED = "Wed, 21 Oct 2015 07:28:00 GMT"
HTML = b"<!DOCTYPE html><html><head><title>Link expired</title></head><body>Sorry</body></html>\n"


class FaultServer:
    """Start on 127.0.0.1 on a free port; `url(token, name, **faults)` builds request URLs."""

    def __init__(self, root: str, *, tls: tuple[str, str] | None = None) -> None:
        self.root = root
        self.requests: dict[str, list[dict]] = defaultdict(list)
        self._configured: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.scheme = "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, token: str, name: str, host: str = "127.0.0.1", **faults: object) -> str:
        query = "&".join(f"{key}={value}" for key, value in faults.items())
        return f"{self.scheme}://{host}:{self.port}/{token}/{name}" + (f"?{query}" if query else "")

    def configure(self, token: str, **faults: object) -> None:
        self._configured[token] = {key: str(value) for key, value in faults.items()}

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(request.path)
        token, _, name = parts.path.lstrip("/").partition("/")
        faults = {key: values[0] for key, values in parse_qs(parts.query).items()}
        faults.update(self._configured.get(token, {}))
        with self._lock:
            seen = self.requests[token]
            seen.append({"path": request.path, "headers": dict(request.headers)})
            attempt = len(seen)
        faulty = attempt <= int(faults.get("times", 1))
        if "redirect" in faults:
            location = request.path if faults["redirect"] == "self" else faults["redirect"]
            self._send_head(request, 302, {"Location": location, "Content-Length": "0"})
            return
        if "status" in faults and faulty:
            body = b""
            if "s3_error" in faults:
                code = faults["s3_error"]
                body = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
            headers = {"Content-Length": str(len(body)), "Content-Type": "application/xml"}
            if "retry_after" in faults:
                headers["Retry-After"] = faults["retry_after"]
            if "region" in faults:
                headers["x-amz-bucket-region"] = faults["region"]
            echoed = "; ".join(f"{k}: {v}" for k, v in request.headers.items())
            reason = echoed if faults.get("echo") else None
            self._send_head(request, int(faults["status"]), headers, reason=reason)
            request.wfile.write(body)
            return
        if faults.get("html"):
            ctype = faults.get("ctype", "text/html")
            self._send_head(request, 200, {"Content-Type": ctype, "Content-Length": str(len(HTML))})
            request.wfile.write(HTML)
            return
        path = os.path.join(self.root, name)
        size = os.path.getsize(path)
        etag = f'"{os.path.getmtime(path)}-{size}"'
        if faults.get("etag") == "changing":
            etag = f'"v{attempt}"'
        if faults.get("etag") == "weak":
            etag = "W/" + etag
        if_match = request.headers.get("If-Match")
        if if_match is not None and if_match != etag:
            self._send_head(request, 412, {"Content-Length": "0"})
            return
        start, end, partial = 0, size, False
        range_header = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if faults.get("ranges") != "0" and range_header and if_range in (None, etag, MODIFIED):
            first, _, last = range_header.removeprefix("bytes=").partition("-")
            start, end, partial = int(first), int(last) + 1 if last else size, True
            if faults.get("from_zero"):
                start, end = 0, end - start
        headers = {
            "Content-Type": faults.get("ctype", "application/octet-stream"),
            "Content-Length": str(end - start),
            "ETag": etag,
            "Last-Modified": MODIFIED,
        }
        if faults.get("ranges") != "0":
            headers["Accept-Ranges"] = "bytes"
        if partial:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self._send_head(request, 206 if partial else 200, headers)
        drop_at = start + int(faults["drop_after"]) if "drop_after" in faults and faulty else None
        stall_at = (
            start + int(faults["stall_after"]) if "stall_after" in faults and faulty else None
        )
        rate = float(faults.get("rate", 0))
        most = min(64 << 10, max(1, int(rate / 8))) if rate else 64 << 10
        began = time.monotonic()
        with open(path, "rb") as data:
            data.seek(start)
            offset = start
            while True:
                # Stop each write at the next fault offset, so the fault hits the exact byte.
                limits = [x for x in (drop_at, stall_at, end) if x is not None and x >= offset]
                if offset == stall_at:
                    time.sleep(float(faults.get("stall", 5)))
                    stall_at = None
                    continue
                if offset == drop_at:
                    request.close_connection = True
                    return
                chunk = data.read(min([most] + [x - offset for x in limits]))
                if not chunk:
                    return
                try:
                    request.wfile.write(chunk)
                    request.wfile.flush()
                except OSError:
                    return
                offset += len(chunk)
                if rate:  # pace this connection, like a per-connection bandwidth cap
                    time.sleep(max(0.0, began + (offset - start) / rate - time.monotonic()))

    @staticmethod
    def _send_head(
        request: BaseHTTPRequestHandler,
        status: int,
        headers: dict[str, str],
        *,
        reason: str | None = None,
    ) -> None:
        request.send_response(status, reason)
        for key, value in headers.items():
            request.send_header(key, value)
        request.end_headers()
