"""One filesystem layer for every stage: local paths and object-store URIs (s3://, gs://, ...).

Built on fsspec. A location is a plain string: a local path ("runs/phrases", "/data/x.tar")
or a URI ("s3://bucket/shards/00000.tar"). Functions here take and return such strings;
listed URIs keep their protocol, listed local paths are absolute.

Atomic writes (DESIGN.md: "a shard's outputs appear atomically"):
* local: write `.{name}.tmp-{random}` in the destination folder, fsync, `os.replace` onto the
  final name (atomic within one filesystem);
* object stores: one upload of the finished file (a single PUT, or a multipart upload that
  becomes visible only when completed), so readers never see a partial object.
Temporary names start with "." and contain ".tmp-": `is_temporary_name` recognises them, and
listings of outputs ignore them.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

TEMP_MARKER = ".tmp-"
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # pyproject extras per protocol
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Location:
    """A resolved location: the fsspec filesystem, the path inside it, and the original string."""

    fs: AbstractFileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        return _is_local(self.fs)


def resolve(uri: str) -> Location:
    """Filesystem and in-filesystem path of `uri` (local paths become absolute)."""
    import fsspec

    if not isinstance(uri, str) or not uri:
        raise ValueError(f"not a path or URI: {uri!r}")
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as error:  # fsspec knows the protocol but its package is not installed
        scheme = uri.split("://", 1)[0]
        extra = _EXTRAS.get(scheme)
        hint = f" (pip install 'glip-data-engine[{extra}]')" if extra else ""
        raise ImportError(f"{uri}: no filesystem for {scheme}:// is installed{hint}: {error}") from error
    return Location(fs=fs, path=path, uri=uri)


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URI (always "/" inside URIs)."""
    if "://" in base:
        return posixpath.join(base.rstrip("/") or base, *parts)
    return os.path.join(base, *parts)


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) if "://" in uri else os.path.basename(uri.rstrip(os.sep))


def exists(uri: str) -> bool:
    location = resolve(uri)
    return bool(location.fs.exists(location.path))


def is_dir(uri: str) -> bool:
    location = resolve(uri)
    return bool(location.fs.isdir(location.path))


def makedirs(uri: str) -> None:
    """Create the folder `uri` and its parents (a no-op on object stores without folders)."""
    location = resolve(uri)
    location.fs.makedirs(location.path, exist_ok=True)


class UnwritableOutput(ValueError):
    """An output folder that cannot be created or written (read-only file system, no permission)."""


def ensure_writable_folder(uri: str, *, option: str = "--out") -> None:
    """Create the folder `uri` and prove it takes a file, before any work starts.

    Local folders get a probe file (a temporary name, removed at once), because a folder can
    exist on a read-only mount; object stores are only checked by `makedirs` (a probe would be
    a PUT and a DELETE the credentials may not allow). Raises `UnwritableOutput` naming the
    folder and the reason in one line.
    """
    try:
        makedirs(uri)
        location = resolve(uri)
        if location.is_local:
            probe = os.path.join(location.path, temporary_name("write-probe"))
            with open(probe, "wb"):
                pass
            os.remove(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UnwritableOutput(f"{option} {uri}: the output folder cannot be written ({reason})") from None


def remove(uri: str) -> None:
    location = resolve(uri)
    location.fs.rm_file(location.path)


def read_bytes(uri: str) -> bytes:
    location = resolve(uri)
    return bytes(location.fs.cat_file(location.path))


def open_read(uri: str) -> IO[bytes]:
    """A binary file object for reading `uri` (use as a context manager)."""
    location = resolve(uri)
    return location.fs.open(location.path, "rb")


def list_names(folder: str) -> list[str]:
    """Base names of the files directly in `folder` (empty when it does not exist)."""
    location = resolve(folder)
    if not location.fs.exists(location.path):
        return []
    entries = location.fs.ls(location.path, detail=True)
    return sorted(posixpath.basename(entry["name"].rstrip("/")) for entry in entries if entry.get("type") == "file")


def list_folders(folder: str) -> list[str]:
    """Base names of the folders directly in `folder` (empty when it does not exist)."""
    location = resolve(folder)
    if not location.fs.exists(location.path):
        return []
    entries = location.fs.ls(location.path, detail=True)
    return sorted(posixpath.basename(entry["name"].rstrip("/")) for entry in entries if entry.get("type") == "directory")


def expand_inputs(inputs: Sequence[str], *, suffixes: Sequence[str]) -> list[str]:
    """Every file named by `inputs` (files, glob patterns, or folders), sorted and unique.

    A folder contributes the files directly inside it whose names end with one of `suffixes`;
    a glob contributes its matches with those suffixes; a plain file is taken as given.
    Raises FileNotFoundError naming the input that matched nothing.
    """
    found: dict[str, None] = {}
    for item in inputs:
        location = resolve(item)
        fs = location.fs
        if any(char in item for char in _GLOB_CHARS):
            matches = [path for path in fs.glob(location.path) if _has_suffix(path, suffixes) and fs.isfile(path)]
        elif fs.isdir(location.path):
            matches = [
                entry["name"]
                for entry in fs.ls(location.path, detail=True)
                if entry.get("type") == "file" and _has_suffix(entry["name"], suffixes)
            ]
            if not matches:
                raise FileNotFoundError(f"folder {item} holds no {'/'.join(suffixes)} files")
        elif fs.isfile(location.path):
            matches = [location.path]
        else:
            raise FileNotFoundError(f"input not found: {item}")
        if not matches:
            raise FileNotFoundError(f"no {'/'.join(suffixes)} file matches {item}")
        for path in sorted(matches):
            found[_to_uri(fs, path)] = None
    return list(found)


def local_copy(uri: str, *, cache_dir: str | None = None) -> str:
    """A local path holding the file `uri`: local paths as they are; object-store files are
    downloaded once per machine into `cache_dir` (default `$GLIP_CACHE_DIR` or
    ~/.cache/glip-engine/files), under a name derived from the URI, its size and its
    modification tag, through a temporary file renamed when complete (concurrent actors on one
    node never read a partial copy)."""
    import hashlib

    location = resolve(uri)
    if location.is_local:
        if not os.path.isfile(location.path):
            raise FileNotFoundError(f"{uri}: file not found")
        return location.path
    try:
        info = location.fs.info(location.path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: file not found") from None
    tag = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")
    digest = hashlib.sha256(f"{uri}|{info.get('size')}|{tag}".encode()).hexdigest()[:16]
    folder = cache_dir or os.environ.get("GLIP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "glip-engine", "files")
    target = os.path.join(folder, f"{digest}-{basename(uri)}")
    if not os.path.isfile(target):
        _download(location.fs, location.path, target)
    return target


def _download(fs: AbstractFileSystem, path: str, destination: str) -> None:
    with atomic_writer(destination) as handle, fs.open(path, "rb") as source:
        while chunk := source.read(16 << 20):
            handle.write(chunk)


def local_folder_copy(uri: str, *, cache_dir: str | None = None) -> str:
    """A local folder holding the folder `uri` (a saved model): local paths as they are;
    object-store folders are downloaded once per machine, file by file through `local_copy`'s
    atomic renames, into a folder named after the URI and its files' sizes and tags."""
    import hashlib

    location = resolve(uri)
    if location.is_local:
        if not os.path.isdir(location.path):
            raise FileNotFoundError(f"{uri}: folder not found")
        return location.path
    found = location.fs.find(location.path, detail=True)
    files = {path: info for path, info in found.items() if info.get("type") != "directory"}
    if not files:
        raise FileNotFoundError(f"{uri}: folder not found or empty")
    root = location.path.rstrip("/")
    listing = "|".join(
        f"{path}:{info.get('size')}:{info.get('ETag') or info.get('etag') or info.get('mtime') or ''}"
        for path, info in sorted(files.items())
    )
    digest = hashlib.sha256(f"{uri}|{listing}".encode()).hexdigest()[:16]
    folder = cache_dir or os.environ.get("GLIP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "glip-engine", "files")
    target = os.path.join(folder, f"{digest}-{basename(uri)}")
    for path in sorted(files):
        relative = path[len(root):].lstrip("/")
        destination = os.path.join(target, *relative.split("/"))
        if not os.path.isfile(destination):
            _download(location.fs, path, destination)
    return target


def write_atomic(uri: str, data: bytes) -> None:
    """Write `data` to `uri` so that readers see either nothing or the whole file."""
    with atomic_writer(uri) as handle:
        handle.write(data)


@contextlib.contextmanager
def atomic_writer(uri: str) -> Iterator[IO[bytes]]:
    """A binary file that appears at `uri` only when the `with` block ends without error.

    Large outputs (WebDataset tars) stream through a temporary file instead of memory.
    """
    location = resolve(uri)
    fs = location.fs
    if location.is_local:
        folder = os.path.dirname(location.path)
        os.makedirs(folder, exist_ok=True)
        temporary = os.path.join(folder, temporary_name(os.path.basename(location.path)))
        try:
            with open(temporary, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, location.path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return
    with tempfile.NamedTemporaryFile(prefix="glip-upload-", delete=True) as handle:
        yield handle  # type: ignore[misc]
        handle.flush()
        fs.put_file(handle.name, location.path)  # one upload: visible only once complete


def temporary_name(final_name: str) -> str:
    """The in-progress name used for `final_name` in the same folder."""
    return f".{final_name}{TEMP_MARKER}{uuid.uuid4().hex[:12]}"


def is_temporary_name(name: str) -> bool:
    """True for names made by `temporary_name` (left behind by a killed writer)."""
    return name.startswith(".") and TEMP_MARKER in name


def temporary_final_name(name: str) -> str:
    """The final name a temporary name was made for (`.x.parquet.tmp-ab12` -> `x.parquet`)."""
    return name[1:].rsplit(TEMP_MARKER, 1)[0]


def _has_suffix(path: str, suffixes: Sequence[str]) -> bool:
    name = posixpath.basename(path.rstrip("/"))
    return not is_temporary_name(name) and any(name.endswith(suffix) for suffix in suffixes)


def _is_local(fs: AbstractFileSystem) -> bool:
    protocol = fs.protocol
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return "file" in protocols or "local" in protocols


def _to_uri(fs: AbstractFileSystem, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)
