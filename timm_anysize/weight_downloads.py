"""Fetching weights into a local cache: Hub repos through ``huggingface_hub``, URLs into torch's hub cache.

Each function returns the local path of a file (or the parsed ``config.json`` of a repo); what the file holds is read
by :mod:`timm_anysize.weight_files`. A URL's file is cached under a folder named by a hash of the whole URL, so two
URLs that end in the same file name never share a cache entry, and checked against a hash where one is given (the
file name's ``-<sha256 prefix>.`` suffix, torch.hub's convention, and a full SHA-256 from the pretrained cfg) before
it is moved into the cache: a file that fails the check is never cached.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Optional, Union
from urllib.parse import urlsplit

import torch

from timm_anysize.core.errors import WeightsError
from timm_anysize.core.version import __version__
from timm_anysize.weight_files import HUB_FILENAMES, transformers_config

__all__ = [
    "download_hub_weights",
    "download_hub_config",
    "download_url_weights",
    "url_cache_path",
    "name_hash_prefix",
]

# torch.hub's convention (load_state_dict_from_url(check_hash=True)): ``name-<hex>.ext`` names the first eight or
# more hex digits of the file's SHA-256.
_NAME_HASH = re.compile(r"-([a-f0-9]{8,64})\.")


def download_hub_weights(
    repo_id: str, filename: Optional[str] = None, revision: Optional[str] = None, cache_dir: Optional[str] = None
) -> Path:
    """Download (or find in the cache) a Hub weight file through ``huggingface_hub``.

    Honours ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT``; without ``filename`` tries ``model.safetensors`` then
    ``pytorch_model.bin`` as timm does.

    Raises:
        WeightsError: The repo or file cannot be reached and is not cached; says what to do.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    names = (filename,) if filename else HUB_FILENAMES
    last: Optional[Exception] = None
    for name in names:
        try:
            return Path(
                hf_hub_download(
                    repo_id,
                    name,
                    revision=revision,
                    cache_dir=cache_dir,
                    library_name="timm-anysize",
                    library_version=__version__,
                )
            )
        except EntryNotFoundError as e:
            last = e
        except LocalEntryNotFoundError as e:
            last = e
            break
        except (HfHubHTTPError, OSError, ValueError) as e:
            last = e
            break
    raise WeightsError(
        f"hf_hub_id {repo_id!r} (files tried: {', '.join(names)}): not downloadable and not in the cache "
        f"({type(last).__name__}: {str(last).splitlines()[0] if last else ''}); go online once to cache it, "
        f"or download the file and set pretrained.file"
    ) from last


def download_hub_config(
    repo_id: str, revision: Optional[str] = None, cache_dir: Optional[str] = None
) -> Optional[dict]:
    """The transformers ``config.json`` of a Hub repo (downloaded next to its weights in the cache), if it has one.

    Returns:
        The parsed config; None when the repo has no ``config.json``, has timm's (no ``model_type``), or cannot be
        reached (the weights' own download then says why).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(
            repo_id,
            "config.json",
            revision=revision,
            cache_dir=cache_dir,
            library_name="timm-anysize",
            library_version=__version__,
        )
    except (EntryNotFoundError, OSError, ValueError):  # not there, not cached, unreachable (HTTP errors are OSErrors)
        return None
    return transformers_config(path)


def url_cache_path(url: str, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Where a URL's file is cached: ``<cache>/timm-anysize/<hash of the URL>/<file name>``.

    The cache is ``cache_dir``, else torch's hub cache (``torch.hub.get_dir()/checkpoints``, as timm's URL downloads);
    the file keeps its name (its suffix says its format) in a folder of its own URL.

    Example:
        >>> a = url_cache_path("https://a.example/v1/model.pth", "/cache")
        >>> b = url_cache_path("https://b.example/v2/model.pth", "/cache")
        >>> a.name == b.name == "model.pth", a != b, a.parent.parent.as_posix()
        (True, True, '/cache/timm-anysize')
    """
    name = os.path.basename(urlsplit(url).path) or "weights"
    root = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    return root / "timm-anysize" / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def name_hash_prefix(url: str) -> Optional[str]:
    """The SHA-256 prefix a URL's file name carries by torch.hub's convention (``name-<8+ hex digits>.ext``).

    Example:
        >>> name_hash_prefix("https://x.example/jx_vit_base_p16_224-80ecf9dd.pth"), name_hash_prefix("x/model.pth")
        ('80ecf9dd', None)
    """
    found = _NAME_HASH.search(os.path.basename(urlsplit(url).path))
    return found.group(1) if found else None


def download_url_weights(
    url: str, sha256: Optional[str] = None, cache_dir: Optional[Union[str, os.PathLike]] = None
) -> Path:
    """Download a weight URL into the cache (:func:`url_cache_path`), or find it there.

    A fresh download is checked against the hash its file name carries (:func:`name_hash_prefix`) and against
    ``sha256`` when given, then moved into the cache; a cached file was checked when it was downloaded.

    Args:
        url: The file's URL.
        sha256: The file's SHA-256 (hex), where the pretrained cfg gives one.
        cache_dir: The cache folder (default: torch's hub cache).

    Raises:
        WeightsError: The download failed, or the file's hash differs from the one expected (naming the URL, both
            hashes and what to do); nothing is cached then.

    Example:
        >>> import pathlib, tempfile
        >>> src = pathlib.Path(tempfile.mkdtemp()) / "w.bin"
        >>> _ = src.write_bytes(b"weights")
        >>> path = download_url_weights(src.as_uri(), cache_dir=tempfile.mkdtemp())
        >>> path.name, path.read_bytes()
        ('w.bin', b'weights')
    """
    target = url_cache_path(url, cache_dir)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.download")  # never mistaken for the file
    try:
        try:
            torch.hub.download_url_to_file(url, str(partial), progress=True)
        except Exception as e:  # urllib raises URLError/HTTPError/OSError
            raise WeightsError(f"url {url}: download failed ({e}); download it yourself and set pretrained.file") from e
        _check_hash(url, partial, sha256)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _check_hash(url: str, path: Path, sha256: Optional[str]) -> None:
    """Refuse a downloaded file whose SHA-256 differs from its name's prefix or from ``sha256``."""
    expected = [("its file name", prefix) for prefix in (name_hash_prefix(url),) if prefix]
    if sha256:
        expected.append(("the pretrained cfg's sha256", sha256.lower()))
    if not expected:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    got = digest.hexdigest()
    for where, want in expected:
        if not got.startswith(want):
            raise WeightsError(
                f"url {url}: the downloaded file's SHA-256 is {got}, {where} says {want}; the file at the URL is "
                f"not the one expected (changed or corrupted): check the URL and the hash, or download it yourself "
                f"and set pretrained.file (nothing was cached)"
            )
