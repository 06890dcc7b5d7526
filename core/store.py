"""The model store: the only contract between training and serving.

Layout (this module is the only one that builds these paths)::

    <store>/<name>/<version>/model.weights.h5   Keras weights (model.save_weights)
                             manifest.json      plugin, resolved config, dataset info, metrics, ...
                             artifacts/*.png    sample grids and other pictures
                             assets/            files inference needs (Plugin.save_assets)
    <store>/<name>/labels.json                  labels naming versions: {"stable": 3}; written
                                                whole and renamed into place
    <store>/.servers/<host>-<pid>.json          what a running `kiln serve` serves (refreshed
                                                while it runs), so `kiln models rm` can refuse

Versions are integers. A version is written into a hidden temporary folder and renamed into
place, so a crash mid-save leaves no half version behind; the folder names its writer
(host and pid), so the next save removes what a killed writer left.

A store may also be a URI that pyarrow's filesystems (and so Ray's storage) understand:
``s3://bucket/kiln``, ``gs://bucket/kiln``, ``file:///shared/kiln``. A version is then uploaded
with its manifest last, and only folders with a manifest count as versions, so a crashed upload
is never seen. Readers download a version once into ``$KILN_CACHE/stores`` (versions never
change) and use the local copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kiln import settings
from kiln.plugin import KilnError
from kiln.values import plain

WEIGHTS = "model.weights.h5"
MANIFEST = "manifest.json"
ARTIFACTS = "artifacts"
ASSETS = "assets"
LABELS = "labels.json"  # <store>/<name>/labels.json: {"stable": 3, ...}
SERVERS = ".servers"    # <store>/.servers/<host>-<pid>.json: what each running server serves
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# a label starts with a letter, so it is never read as a version number
_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


def is_uri(root: str | Path) -> bool:
    return "://" in str(root)


def default_root() -> str | Path:
    """$KILN_STORE, else ./kiln-store."""
    root = settings.store()
    return root if is_uri(root) else Path(root).expanduser()


def resolve_root(root: str | Path | None) -> str:
    """A store as a run records it: a URI as given, a folder as an absolute path."""
    root = root or default_root()
    return str(root).rstrip("/") if is_uri(root) else str(Path(root).expanduser().resolve())


def cache_dir() -> Path:
    """Where versions of URI stores are downloaded: $KILN_CACHE/stores (default ~/.cache/kiln)."""
    return settings.cache_dir() / "stores"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise KilnError(f"bad model name {name!r}: use letters, digits, '.', '_' or '-' (max 64)")
    return name


def check_label(label: str) -> str:
    if not _LABEL.match(label) or label == "latest":
        raise KilnError(f"bad label {label!r}: start with a letter, then letters, digits, '.', '_' or '-' "
                        "(max 64; not 'latest')")
    return label


@dataclass(frozen=True)
class Ref:
    """How a model version is named everywhere: ``cnn`` (the latest), ``cnn:3``, ``cnn:latest`` or
    ``cnn@stable`` (the version a label names, which only the store knows: ``Store.get``)."""

    name: str
    version: int | None = None
    label: str | None = None

    @classmethod
    def parse(cls, ref: str) -> "Ref":
        """KilnError naming the part of ``ref`` that is wrong."""
        if "@" in ref:
            name, _, label = ref.partition("@")
            return cls(check_name(name), label=check_label(label))
        name, _, version = ref.partition(":")
        check_name(name)
        if not version or version == "latest":
            return cls(name)
        if not version.isdigit() or int(version) < 1:
            raise KilnError(f"bad version {version!r} in {ref!r}: versions are integers >= 1 (or 'latest')")
        return cls(name, int(version))

    def __str__(self) -> str:
        return self.name + (f":{self.version}" if self.version else "") + (f"@{self.label}" if self.label else "")


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'cnn' -> ('cnn', None = latest); 'cnn:3' -> ('cnn', 3); 'cnn@stable' -> ('cnn', None)."""
    r = Ref.parse(ref)
    return r.name, r.version


@dataclass
class Version:
    """A stored model version: its folder and manifest."""

    name: str
    version: int
    path: Path
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def assets(self) -> Path:
        return self.path / ASSETS

    def artifacts(self) -> list[Path]:
        d = self.path / ARTIFACTS
        return sorted(d.iterdir()) if d.is_dir() else []


def _writer() -> str:
    """Names a save's hidden folder (host-pid), so a later save can tell whether its writer lives.
    Asked at each save: a forked process has its own pid."""
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"


_LEFTOVER_AGE_S = 3600  # a folder whose writer cannot be asked (another machine): gone after this


def _remove_leftovers(parent: Path) -> None:
    """Remove the hidden folders of saves that were killed mid-write (full weights each): those
    whose writer on this machine has exited, and any unchanged for an hour (another machine's, or
    written before folders named their writer)."""
    host = _writer().rpartition("-")[0]
    for folder in parent.glob(".tmp-*"):
        try:
            rest = folder.name[len(".tmp-"):]
            writer_host, _, tail = rest.rpartition("-")[0].rpartition("-")
            pid = int(tail) if writer_host == host and tail.isdigit() else None
            if pid is not None:
                if _alive(pid):
                    continue
            elif time.time() - folder.stat().st_mtime < _LEFTOVER_AGE_S:
                continue
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue  # another writer removed or renamed it meanwhile


def _alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0, ...) would ask this process's group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class _Folder:
    """A store in a local (or mounted, shared) folder. A version is claimed by renaming its
    complete folder into place: rename fails when another writer took the number first."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.spec = str(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def versions(self, name: str) -> list[int]:
        d = self.root / name
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / MANIFEST).exists())

    def local(self, name: str, version: int, whole: bool) -> Path:
        return self.root / name / str(version)

    def read_labels(self, name: str) -> dict[str, int]:
        path = self.root / name / LABELS
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_labels(self, name: str, labels: dict[str, int]) -> None:
        tmp = self.root / name / f".labels-{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(labels, indent=2, sort_keys=True))
        os.replace(tmp, self.root / name / LABELS)  # readers see the old file or the new one

    def read_records(self) -> dict[str, dict[str, Any]]:
        out = {}
        for path in sorted((self.root / SERVERS).glob("*.json")):
            try:
                out[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being replaced, or removed meanwhile
        return out

    def write_record(self, key: str, record: dict[str, Any]) -> None:
        folder = self.root / SERVERS
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}-{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
        os.replace(tmp, folder / f"{key}.json")

    def delete_record(self, key: str) -> None:
        (self.root / SERVERS / f"{key}.json").unlink(missing_ok=True)

    def delete_version(self, name: str, version: int) -> None:
        folder = self.root / name / str(version)
        # renamed out of sight first (atomic): no reader ever lists a version half deleted
        doomed = self.root / name / f".tmp-{_writer()}-{uuid.uuid4().hex}"
        os.rename(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        _remove_leftovers(self.root / name)

    def lock(self, name: str) -> Any:
        from filelock import FileLock

        return FileLock(str(self.root / name / ".labels.lock"), timeout=30)

    def publish(self, name: str, tmp: Path, manifest: dict[str, Any]) -> Path:
        parent = self.root / name
        for _ in range(1000):
            version = (self.versions(name) or [0])[-1] + 1
            while (parent / str(version)).exists():  # a folder that is no version: leave it be
                version += 1
            manifest["version"] = version
            (tmp / MANIFEST).write_text(json.dumps(plain(manifest), indent=2))
            try:
                os.rename(tmp, parent / str(version))  # fails if another writer took it first
                return parent / str(version)
            except OSError:
                continue
        raise KilnError(f"could not allocate a new version of '{name}' in {parent}")


class _Remote:
    """A store at a URI that pyarrow's filesystems (and so Ray's storage) open: s3://, gs://,
    file://. Versions are downloaded once into a local cache (they never change).

    Object stores have no atomic rename, so a writer claims a version number first: it writes a
    claim file into the version's folder and lists the folder's claims. It keeps the number only
    if its own claim is the only one it sees; otherwise it withdraws and tries again after a
    random pause. With read-after-write consistency (S3, GCS, local files) two writers cannot both
    see only themselves, so no two writers ever share a number. Then it uploads, manifest last:
    only a folder with a manifest is a version, so a crashed upload is never listed. Changing a
    model's labels takes the same kind of claim on ``<name>/.lock`` (``_ClaimLock``), so two
    writers never lose each other's labels."""

    def __init__(self, uri: str, cache: Path) -> None:
        self.uri = self.spec = uri
        self.root = cache
        try:
            from pyarrow import fs as pafs

            self.fs, self.base = pafs.FileSystem.from_uri(uri)
        except Exception as e:  # unknown scheme, missing credentials, malformed URI
            self.error = KilnError(f"cannot open the store {uri}: {e}")
            self.fs, self.base = None, ""

    def _fs(self) -> Any:
        if self.fs is None:
            raise self.error
        return self.fs

    def _list(self, path: str) -> list[Any]:
        from pyarrow import fs as pafs

        # pyarrow lists a local folder by reading its entries, then looking at each: an entry that
        # another writer removes in between (a withdrawn claim) fails the whole listing with
        # ENOENT. Listing again sees the folder as it is now.
        for attempt in range(5):
            try:
                return self._fs().get_file_info(pafs.FileSelector(path, allow_not_found=True))
            except OSError as e:
                if "No such file" not in str(e) or attempt == 4:
                    raise KilnError(f"cannot list the store {self.uri}: {e}") from None
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _is_file(self, path: str) -> bool:
        from pyarrow import fs as pafs

        return self._fs().get_file_info(path).type == pafs.FileType.File

    def names(self) -> list[str]:
        from pyarrow import fs as pafs

        return sorted(i.base_name for i in self._list(self.base)
                      if i.type == pafs.FileType.Directory and _NAME.match(i.base_name))

    def versions(self, name: str) -> list[int]:
        folders = sorted(int(i.base_name) for i in self._list(f"{self.base}/{name}") if i.base_name.isdigit())
        return [v for v in folders if self._is_file(f"{self.base}/{name}/{v}/{MANIFEST}")]

    def local(self, name: str, version: int, whole: bool) -> Path:
        """Download a version (or only its manifest) into the local cache, once."""
        local = self.root / name / str(version)
        if (local / ".complete").exists() or (not whole and (local / MANIFEST).exists()):
            return local
        from pyarrow import fs as pafs

        src = f"{self.base}/{name}/{version}"
        tmp = self.root / name / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            if whole:
                pafs.copy_files(src, str(tmp), source_filesystem=self._fs(),
                                destination_filesystem=pafs.LocalFileSystem())
                for claim in tmp.glob(".claim-*"):
                    claim.unlink()
                (tmp / ".complete").write_text("")
            else:
                with self._fs().open_input_stream(f"{src}/{MANIFEST}") as f:
                    (tmp / MANIFEST).write_bytes(f.read())
            shutil.rmtree(local, ignore_errors=True)
            try:
                os.rename(tmp, local)
            except OSError:  # another process cached it meanwhile
                pass
        except OSError as e:
            raise KilnError(f"cannot download {self.uri}/{name}/{version}: {e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return local

    def read_labels(self, name: str) -> dict[str, int]:
        path = f"{self.base}/{name}/{LABELS}"
        try:
            if not self._is_file(path):
                return {}
            with self._fs().open_input_stream(path) as f:
                return json.loads(f.read())
        except OSError as e:
            raise KilnError(f"cannot read the labels of '{name}' in {self.uri}: {e}") from None

    def write_labels(self, name: str, labels: dict[str, int]) -> None:
        # one object written whole, then moved over the old one: object stores make the new
        # object visible at once; a local file:// store renames
        tmp = f"{self.base}/{name}/.labels-{uuid.uuid4().hex}"
        try:
            with self._fs().open_output_stream(tmp) as f:
                f.write(json.dumps(labels, indent=2, sort_keys=True).encode())
            self._fs().move(tmp, f"{self.base}/{name}/{LABELS}")
        except OSError as e:
            raise KilnError(f"cannot write the labels of '{name}' in {self.uri}: {e}") from None

    def read_records(self) -> dict[str, dict[str, Any]]:
        out = {}
        try:
            for info in self._list(f"{self.base}/{SERVERS}"):
                if info.base_name.endswith(".json") and not info.base_name.startswith("."):
                    try:
                        with self._fs().open_input_stream(info.path) as f:
                            out[info.base_name[:-5]] = json.loads(f.read())
                    except (OSError, ValueError):
                        continue
        except OSError as e:
            raise KilnError(f"cannot read the server records in {self.uri}: {e}") from None
        return out

    def write_record(self, key: str, record: dict[str, Any]) -> None:
        try:
            self._fs().create_dir(f"{self.base}/{SERVERS}", recursive=True)
            with self._fs().open_output_stream(f"{self.base}/{SERVERS}/{key}.json") as f:
                f.write(json.dumps(record, indent=2, sort_keys=True).encode())
        except OSError as e:
            raise KilnError(f"cannot write a server record in {self.uri}: {e}") from None

    def delete_record(self, key: str) -> None:
        try:
            self._fs().delete_file(f"{self.base}/{SERVERS}/{key}.json")
        except OSError:
            pass  # already gone

    def delete_version(self, name: str, version: int) -> None:
        folder = f"{self.base}/{name}/{version}"
        try:
            self._fs().delete_file(f"{folder}/{MANIFEST}")  # no longer a version from here on
            self._fs().delete_dir(folder)
        except OSError as e:
            raise KilnError(f"cannot delete {self.uri}/{name}/{version}: {e}") from None
        shutil.rmtree(self.root / name / str(version), ignore_errors=True)  # the local copy

    def lock(self, name: str) -> Any:
        return _ClaimLock(self, f"{self.base}/{name}/.lock")

    def _claimed(self, folder: str, me: str, stale_s: float | None = None) -> bool:
        """Write claim ``me`` into ``folder``; True if it is the only claim there, else it is
        withdrawn (another writer is here too: both step back). With ``stale_s``, another's claim
        older than that is a writer that died holding it, and is removed."""
        fs = self._fs()
        fs.create_dir(folder, recursive=True)
        with fs.open_output_stream(f"{folder}/{me}") as f:
            f.write(b"")
        claims = []
        for info in self._list(folder):
            if not info.base_name.startswith(".claim-"):
                continue
            if stale_s is not None and info.base_name != me and info.mtime is not None \
                    and time.time() - info.mtime.timestamp() > stale_s:
                with contextlib.suppress(OSError):
                    fs.delete_file(info.path)
                continue
            claims.append(info.base_name)
        if claims == [me]:
            return True
        fs.delete_file(f"{folder}/{me}")
        return False

    def _claim(self, name: str) -> int:
        import random

        me = f".claim-{uuid.uuid4().hex}"
        for _ in range(200):
            version = (self.versions(name) or [0])[-1] + 1
            while self._list(f"{self.base}/{name}/{version}"):  # claimed, or a crashed upload's
                version += 1
            if self._claimed(f"{self.base}/{name}/{version}", me):
                return version
            time.sleep(random.uniform(0.01, 0.2))
        raise KilnError(f"could not claim a new version of '{name}' in {self.uri}: too many writers")

    def publish(self, name: str, tmp: Path, manifest: dict[str, Any]) -> Path:
        from pyarrow import fs as pafs

        try:
            version = self._claim(name)
            manifest["version"] = version
            dest = f"{self.base}/{name}/{version}"
            pafs.copy_files(str(tmp), dest, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self._fs())
            with self._fs().open_output_stream(f"{dest}/{MANIFEST}") as f:
                f.write(json.dumps(plain(manifest), indent=2).encode())
        except OSError as e:
            raise KilnError(f"cannot upload {name} to {self.uri}: {e}") from None
        (tmp / MANIFEST).write_text(json.dumps(plain(manifest), indent=2))
        (tmp / ".complete").write_text("")
        local = self.root / name / str(version)
        shutil.rmtree(local, ignore_errors=True)
        os.rename(tmp, local)  # the uploaded folder is also the version's local copy
        return local


class _ClaimLock:
    """One writer at a time on a model of a URI store (its labels), by the claim protocol that
    numbers versions (``_Remote._claimed``): a writer holds the lock while its claim is the only
    one in the lock's folder, else tries again after a random pause. A claim older than ``STALE``
    seconds is a writer that died holding it: it is removed, so a crash never locks a model."""

    STALE = 60.0
    WAIT = 30.0

    def __init__(self, backend: "_Remote", folder: str) -> None:
        self.backend, self.folder = backend, folder
        self.me = f".claim-{uuid.uuid4().hex}"

    def __enter__(self) -> "_ClaimLock":
        import random

        deadline = time.monotonic() + self.WAIT
        while not self.backend._claimed(self.folder, self.me, self.STALE):
            if time.monotonic() > deadline:
                raise KilnError(f"{self.folder} is held by another writer for over {self.WAIT:.0f} s; "
                                "try again")
            time.sleep(random.uniform(0.01, 0.2))
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.backend._fs().delete_file(f"{self.folder}/{self.me}")


class Store:
    """A model store: a local folder or a URI, two backends behind the same methods."""

    def __init__(self, root: str | Path | None = None) -> None:
        root = root or default_root()
        if is_uri(root):
            import hashlib

            uri = str(root).rstrip("/")
            self.backend: _Folder | _Remote = _Remote(uri, cache_dir() / hashlib.sha1(uri.encode()).hexdigest()[:16])
        else:
            self.backend = _Folder(Path(root).expanduser())
        self.root = self.backend.root  # where versions are read from (a URI store's local cache)

    @property
    def spec(self) -> str:
        """The store as the user names it: the URI, or the folder."""
        return self.backend.spec

    def __str__(self) -> str:
        return self.spec

    def names(self) -> list[str]:
        return self.backend.names()

    def versions(self, name: str) -> list[int]:
        return self.backend.versions(name)

    def get(self, ref: str, whole: bool = True) -> Version:
        """The version named by 'name' (latest) or 'name:version'; KilnError if absent or corrupt.
        From a URI store it is downloaded first (only its manifest with ``whole=False``)."""
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none yet"
            raise KilnError(f"no model '{name}' in store {self.spec} (models: {known}); "
                            f"train one with `kiln train PLUGIN --name {name}`")
        if "@" in ref:
            label = ref.partition("@")[2]
            labels = self.labels(name)
            if label not in labels:
                raise KilnError(f"model '{name}' has no label '{label}' in {self.spec}; labels: "
                                f"{', '.join(f'{k} ({name}:{v})' for k, v in sorted(labels.items())) or 'none'}"
                                f"; set one with `kiln models label {name}:VERSION {label}`")
            version = labels[label]
            if version not in versions:
                raise KilnError(f"label '{label}' of '{name}' names version {version}, which is no longer "
                                f"in {self.spec}; move it with `kiln models label {name}:VERSION {label}`")
        elif version is None:
            version = versions[-1]
        elif version not in versions:
            raise KilnError(f"model '{name}' has no version {version} in {self.spec}; "
                            f"versions: {', '.join(map(str, versions))}")
        path = self.backend.local(name, version, whole)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            if not isinstance(manifest, dict) or "plugin" not in manifest or "config" not in manifest:
                raise ValueError("plugin or config missing")
        except (OSError, ValueError) as e:
            raise KilnError(f"corrupt manifest {path / MANIFEST}: {e}; delete that version folder "
                            "or restore it from a backup") from None
        return Version(name, version, path, manifest)

    def labels(self, name: str) -> dict[str, int]:
        """The labels of model ``name``: label -> version."""
        return self.backend.read_labels(check_name(name))

    def label(self, ref: str, label: str) -> Version:
        """Point ``label`` at the version ``ref`` names (moving it if it pointed elsewhere)."""
        check_label(label)
        version = self.get(ref, whole=False)
        with self.backend.lock(version.name):
            labels = self.labels(version.name)
            labels[label] = version.version
            self.backend.write_labels(version.name, labels)
        return version

    def unlabel(self, name: str, label: str) -> int:
        """Remove ``label`` from model ``name``; the version it named."""
        check_label(label)
        if not self.versions(check_name(name)):
            raise KilnError(f"no model '{name}' in store {self.spec}")
        with self.backend.lock(name):
            labels = self.labels(name)
            if label not in labels:
                raise KilnError(f"model '{name}' has no label '{label}'; labels: {', '.join(sorted(labels)) or 'none'}")
            version = labels.pop(label)
            self.backend.write_labels(name, labels)
        return version

    def remove(self, ref: str) -> Version:
        """Delete the version ``ref`` names (``name:version``, never a bare name or a label), unless
        a label names it or a running server serves it: KilnError saying which, and how to free it.
        Also removes what interrupted saves of that model left behind."""
        name, version = parse_ref(ref)
        if version is None or "@" in ref:
            raise KilnError(f"`kiln models rm` takes NAME:VERSION, got {ref!r}: name the version to delete")
        found = self.get(ref, whole=False)
        with self.backend.lock(name):
            named = sorted(k for k, v in self.labels(name).items() if v == version)
            if named:
                raise KilnError(f"{ref} has label{'s' if len(named) > 1 else ''} {', '.join(named)}; move "
                                f"or remove {'them' if len(named) > 1 else 'it'} first (`kiln models unlabel "
                                f"{name} {named[0]}`)")
            users = [r for r in self.servers() if ref in r.get("refs", [])]
            if users:
                u = users[0]
                raise KilnError(f"{ref} is served by `kiln serve` (pid {u['pid']} on {u['host']}, "
                                f"{u.get('address', '?')}); stop that server, or let it move to another "
                                "version, then delete it")
            self.backend.delete_version(name, version)
        return found

    # -- what running servers serve (kiln serve records it; `rm` reads it) -----------------
    def record_server(self, refs: list[str], address: str, heartbeat_s: float) -> str:
        """Say that this process serves ``refs``; call again at least every ``heartbeat_s`` while
        serving, and ``forget_server`` on the way out. Returns the record's key."""
        import socket

        key = _writer()
        self.backend.write_record(key, {"host": socket.gethostname(), "pid": os.getpid(), "refs": sorted(refs),
                                        "address": address, "updated": time.time(),
                                        "heartbeat_s": heartbeat_s})
        return key

    def forget_server(self, key: str) -> None:
        self.backend.delete_record(key)

    def servers(self) -> list[dict[str, Any]]:
        """The records of servers that still run: on this machine, whose process lives; on
        another, refreshed within three heartbeats. Records of dead servers here are removed."""
        import socket

        host, out = socket.gethostname(), []
        for key, r in self.backend.read_records().items():
            if r.get("host") == host:
                if _alive(int(r.get("pid", 0))):
                    out.append(r)
                else:
                    self.backend.delete_record(key)
            elif time.time() - float(r.get("updated", 0)) < 3 * float(r.get("heartbeat_s", 60)) + 10:
                out.append(r)
        return out

    def list(self) -> list[Version]:
        out = []
        for name in self.names():
            for v in self.versions(name):
                try:
                    out.append(self.get(f"{name}:{v}", whole=False))
                except KilnError:
                    out.append(Version(name, v, self.root / name / str(v), {"corrupt": True}))
        return out

    def save(self, name: str, write: Callable[[Path], dict[str, Any]]) -> Version:
        """Write a new version: ``write(tmpdir)`` fills the folder and returns the manifest.

        The version becomes visible only once complete; on any error nothing stays. Concurrent
        writers to one name get distinct versions on both backends.
        """
        check_name(name)
        parent = self.root / name
        parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(parent)
        tmp = parent / f".tmp-{_writer()}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            manifest = write(tmp)
            manifest = {**manifest, "name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            path = self.backend.publish(name, tmp, manifest)
            return Version(name, manifest["version"], path, manifest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
