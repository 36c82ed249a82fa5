"""A local stand-in for the Hub's file endpoints, served over real HTTP for a child process (`HF_ENDPOINT`).

It serves the snapshots of a huggingface_hub cache folder (`models--owner--name/snapshots/<commit>/` with
`refs/<revision>` naming the commits, as `test_teacher_revisions.py` builds them; `datasets--owner--name` for
dataset repositories), so a child with a fresh, empty
`HF_HUB_CACHE` downloads through huggingface_hub's own client, headers, redirects and error mapping, and what it
asks for is logged. Routes, as the Hub answers them:

- `HEAD` / `GET [/datasets]/{owner}/{name}/resolve/{revision}/{path}`: the file, with `X-Repo-Commit` (the revision's commit)
  and `ETag`; a missing file is a 404 with `X-Error-Code: EntryNotFound`, an unknown revision `RevisionNotFound`,
  an unknown repository `RepoNotFound`.
- `GET /api/{models,datasets}/{owner}/{name}[/revision/{revision}]`: the repository's id, commit and file list.
- `GET /api/{models,datasets}/{owner}/{name}/tree/{revision}`: every file and folder, in one page
  (`snapshot_download` lists a revision this way).

Anything else is a 404 the log keeps, so a test sees a request it did not expect.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

RESOLVE = re.compile(r"^/(?P<kind>datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
REPO_INFO = re.compile(r"^/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<revision>[^/]+))?$")
TREE = re.compile(r"^/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)/tree/(?P<revision>[^/]+)$")


class LocalHub:
    """Serves the huggingface_hub cache in `cache` on 127.0.0.1 until `close()`; `requests` logs (method, path)."""

    def __init__(self, cache: Path):
        self.cache, self.requests = Path(cache), []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):  # noqa: N802 (http.server's name)
                hub._answer(self, body=False)

            def do_GET(self):  # noqa: N802
                hub._answer(self, body=True)

            def log_message(self, *args):  # quiet: the test reads `requests`
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _commit(self, repo: str, revision: str, kind: str = "models") -> tuple[int, str | Path]:
        """(200, snapshot folder), or (404, the Hub's error code)."""
        root = self.cache / f"{kind}--{repo.replace('/', '--')}"
        if not root.is_dir():
            return 404, "RepoNotFound"
        ref = root / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else revision
        snapshot = root / "snapshots" / commit
        return (200, snapshot) if snapshot.is_dir() else (404, "RevisionNotFound")

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append((handler.command, path))
        status, headers, content = self._route(path)
        handler.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(content))}.items():
            handler.send_header(name, value)
        handler.end_headers()
        if body:
            handler.wfile.write(content)

    def _route(self, path: str) -> tuple[int, dict, bytes]:
        match = RESOLVE.match(path)
        if match:
            status, found = self._commit(match["repo"], match["revision"], "datasets" if match["kind"] else "models")
            if status != 200:
                return status, {"X-Error-Code": found}, b"{}"
            file = found / match["path"]
            if not file.is_file():
                return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": found.name}, b"{}"
            content = file.read_bytes()
            etag = hashlib.sha256(content).hexdigest()
            return 200, {"X-Repo-Commit": found.name, "ETag": f'"{etag}"'}, content
        match = TREE.match(path)
        if match:
            status, found = self._commit(match["repo"], match["revision"], match["kind"])
            if status != 200:
                return status, {"X-Error-Code": found}, b"{}"
            entries = [
                {"type": "file", "path": str(p.relative_to(found)), "size": p.stat().st_size,
                 "oid": hashlib.sha1(p.read_bytes()).hexdigest()} if p.is_file()
                else {"type": "directory", "path": str(p.relative_to(found)), "oid": "0" * 40, "size": 0}
                for p in sorted(found.rglob("*"))
            ]  # fmt: skip
            return 200, {"Content-Type": "application/json"}, json.dumps(entries).encode()
        match = REPO_INFO.match(path)
        if match:
            status, found = self._commit(match["repo"], match["revision"] or "main", match["kind"])
            if status != 200:
                return status, {"X-Error-Code": found}, b"{}"
            files = sorted(str(p.relative_to(found)) for p in found.rglob("*") if p.is_file())
            info = {"id": match["repo"], "sha": found.name, "siblings": [{"rfilename": f} for f in files]}
            return 200, {"Content-Type": "application/json"}, json.dumps(info).encode()
        return 404, {}, b"{}"
