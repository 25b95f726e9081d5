"""Test infrastructure: a tiny stand-in for the Hugging Face Hub on 127.0.0.1, enough for the real
``huggingface_hub`` client to create a repo, upload a folder (regular, non-LFS uploads) and download files.
It records what arrived so tests can assert on it. Not product code."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import unquote


class HubState:
    def __init__(self) -> None:
        self.repos: dict[
            str, dict[str, Any]
        ] = {}  # repo_id -> {"private": bool, "files": {path: bytes}, "commits": [...]}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.unknown: list[str] = []
        self.validated_cards: list[dict] = []


class _Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def _send(
        self,
        code: int,
        body: bytes = b"",
        headers: Optional[dict[str, str]] = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj).encode())

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _record(self) -> None:
        self.state.requests.append((self.command, self.path, dict(self.headers)))

    def do_POST(self) -> None:  # noqa: N802
        self._record()
        path, body = unquote(self.path.split("?")[0]), self._body()
        if path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            private = req.get("visibility") == "private" or bool(req.get("private"))  # new and old clients
            self.state.repos.setdefault(repo_id, {"private": private, "files": {}, "commits": []})
            return self._json(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            import yaml

            content = json.loads(body)["content"]
            try:
                front = content.split("---")[1] if content.startswith("---") else ""
                meta = yaml.safe_load(front) or {}
                if not isinstance(meta, dict):
                    raise ValueError("metadata is not a mapping")
            except Exception as e:  # the real Hub answers 400 with the errors
                return self._json(400, {"errors": [{"message": str(e)}], "warnings": []})
            self.state.validated_cards.append(meta)
            return self._json(200, {"errors": [], "warnings": []})
        parts = path.strip("/").split("/")
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
            req = json.loads(body)
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in req["files"]]
            return self._json(200, {"files": files, "commitOid": "0" * 40})
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
            repo_id = "/".join(parts[2:4])
            repo = self.state.repos.get(repo_id)
            if repo is None:
                return self._json(404, {"error": f"Repository {repo_id} not found"})
            header = None
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    header = item["value"]
                elif item["key"] == "file":
                    repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            oid = hashlib.sha1(json.dumps(sorted(repo["files"])).encode() + body).hexdigest()
            repo["commits"].append(
                {"oid": oid, "summary": (header or {}).get("summary"), "user_agent": self.headers.get("user-agent", "")}
            )
            return self._json(
                200,
                {
                    "commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{oid}",
                    "commitOid": oid,
                    "pullRequestUrl": None,
                },
            )
        self.state.unknown.append(f"POST {path}")
        return self._json(404, {"error": "not implemented by the stand-in"})

    def _resolve(self) -> None:
        self._record()
        path = unquote(self.path.split("?")[0]).strip("/")
        parts = path.split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, filename = "/".join(parts[:2]), "/".join(parts[4:])
            repo = self.state.repos.get(repo_id)
            if repo is None:
                return self._send(404, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            if filename not in repo["files"]:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
            data = repo["files"][filename]
            commit = repo["commits"][-1]["oid"] if repo["commits"] else "0" * 40
            etag = hashlib.sha256(data).hexdigest()
            return self._send(
                200, data, {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}, content_type="application/octet-stream"
            )
        self.state.unknown.append(f"{self.command} {path}")
        return self._json(404, {"error": "not implemented by the stand-in"})

    do_GET = _resolve  # noqa: N815
    do_HEAD = _resolve  # noqa: N815


class HubStandIn:
    """``with HubStandIn() as hub: ... hub.url ... hub.state.repos``"""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
