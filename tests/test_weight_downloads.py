"""URL downloads (timm_anysize.weight_downloads): cached by URL, checked against a hash where one is given.

Served offline by a tiny HTTP server on 127.0.0.1: two different files under the same file name at two URLs.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import timm
import torch

import timm_anysize
from conftest import unique_name
from timm_anysize.core.errors import WeightsError
from timm_anysize.weight_downloads import download_url_weights, url_cache_path


class _Files(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    served: list[str] = []

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        body = self.files.get(self.path)
        self.served.append(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.fixture
def serve() -> Iterator[Any]:
    """``serve({'/a/w.pth': bytes, ...})`` -> base URL; every GET is recorded in ``serve.served``."""
    handler = type("Files", (_Files,), {"files": {}, "served": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()

    def start(files: dict[str, bytes]) -> str:
        handler.files.update(files)
        return f"http://127.0.0.1:{server.server_address[1]}"

    start.served = handler.served  # type: ignore[attr-defined]
    yield start
    server.shutdown()
    server.server_close()
    thread.join()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cached(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_two_urls_with_the_same_file_name_are_cached_apart(serve, tmp_path):
    url = serve({"/a/model.pth": b"first", "/b/model.pth": b"second"})
    a = download_url_weights(f"{url}/a/model.pth", cache_dir=tmp_path)
    b = download_url_weights(f"{url}/b/model.pth", cache_dir=tmp_path)
    assert (a.name, b.name) == ("model.pth", "model.pth") and a != b
    assert (a.read_bytes(), b.read_bytes()) == (b"first", b"second")
    # found in the cache the second time: nothing is fetched again
    assert download_url_weights(f"{url}/a/model.pth", cache_dir=tmp_path) == a
    assert serve.served == ["/a/model.pth", "/b/model.pth"]
    assert a == url_cache_path(f"{url}/a/model.pth", tmp_path)


def test_the_hash_in_the_file_name_is_checked(serve, tmp_path):
    data = b"weights"
    good, bad = f"/w-{_sha(data)[:8]}.pth", "/w-0123abcd.pth"
    url = serve({good: data, bad: data})
    assert download_url_weights(url + good, cache_dir=tmp_path).read_bytes() == data
    with pytest.raises(WeightsError) as e:
        download_url_weights(url + bad, cache_dir=tmp_path)
    assert str(e.value) == (
        f"url {url + bad}: the downloaded file's SHA-256 is {_sha(data)}, its file name says 0123abcd; the file at "
        f"the URL is not the one expected (changed or corrupted): check the URL and the hash, or download it "
        f"yourself and set pretrained.file (nothing was cached)"
    )
    assert _cached(tmp_path) == [url_cache_path(url + good, tmp_path).relative_to(tmp_path).as_posix()]


def test_a_sha256_from_the_cfg_is_checked(serve, tmp_path):
    data = b"weights"
    url = serve({"/model.pth": data}) + "/model.pth"
    with pytest.raises(WeightsError, match=rf"SHA-256 is {_sha(data)}, the pretrained cfg's sha256 says {'0' * 64}"):
        download_url_weights(url, sha256="0" * 64, cache_dir=tmp_path)
    assert _cached(tmp_path) == []  # no half-written or refused file left behind
    assert download_url_weights(url, sha256=_sha(data).upper(), cache_dir=tmp_path).read_bytes() == data


def test_a_failed_download_names_the_url_and_leaves_nothing(serve, tmp_path):
    url = serve({}) + "/missing.pth"
    with pytest.raises(WeightsError, match=rf"^url {url}: download failed \(HTTP Error 404"):
        download_url_weights(url, cache_dir=tmp_path)
    assert _cached(tmp_path) == []


def test_variants_whose_urls_share_a_file_name_load_their_own_weights(serve, tmp_path, monkeypatch, make_checkpoint):
    """The collision as a user meets it: two variants, each with its own URL ending in model.safetensors."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # torch's hub cache, the default for URLs
    (p1, m1), (p2, m2) = make_checkpoint("test_vit", seed=1), make_checkpoint("test_vit", seed=2)
    url = serve({"/one/model.safetensors": p1.read_bytes(), "/two/model.safetensors": p2.read_bytes()})
    for where, model in (("one", m1), ("two", m2)):
        name = timm_anysize.register_variant(
            unique_name(), base="test_vit", pretrained={"url": f"{url}/{where}/model.safetensors"}
        )
        loaded = timm.create_model(name, pretrained=True)
        assert torch.equal(loaded.state_dict()["pos_embed"], model.state_dict()["pos_embed"])
    assert len(list((tmp_path / "torch").rglob("model.safetensors"))) == 2
