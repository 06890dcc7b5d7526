"""The model store: the only contract between training and serving.

Layout (this module is the only one that builds these paths)::

    <store>/<name>/<version>/model.weights.h5   Keras weights (model.save_weights)
                             manifest.json      plugin, resolved config, dataset info, metrics, ...
                             artifacts/*.png    sample grids and other pictures
                             assets/            files inference needs (Plugin.save_assets)

Versions are integers. A version is written into a hidden temporary folder and renamed into
place, so a crash mid-save leaves no half version behind.

A store may also be a URI that pyarrow's filesystems (and so Ray's storage) understand:
``s3://bucket/kiln``, ``gs://bucket/kiln``, ``file:///shared/kiln``. A version is then uploaded
with its manifest last, and only folders with a manifest count as versions, so a crashed upload
is never seen. Readers download a version once into ``$KILN_CACHE/stores`` (versions never
change) and use the local copy.
"""

from __future__ import annotations

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

WEIGHTS = "model.weights.h5"
MANIFEST = "manifest.json"
ARTIFACTS = "artifacts"
ASSETS = "assets"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'cnn' -> ('cnn', None = latest); 'cnn:3' -> ('cnn', 3)."""
    name, _, version = ref.partition(":")
    check_name(name)
    if not version or version == "latest":
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise KilnError(f"bad version {version!r} in {ref!r}: versions are integers >= 1 (or 'latest')")
    return name, int(version)


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


class Store:
    """A model store rooted at a local folder, or at a URI (then ``root`` is its local cache)."""

    def __init__(self, root: str | Path | None = None) -> None:
        root = root or default_root()
        self.uri = str(root).rstrip("/") if is_uri(root) else None
        if self.uri is None:
            self.root = Path(root).expanduser()
        else:
            import hashlib

            self.root = cache_dir() / hashlib.sha1(self.uri.encode()).hexdigest()[:16]

    @property
    def spec(self) -> str:
        """The store as the user names it: the URI, or the folder."""
        return self.uri or str(self.root)

    def __str__(self) -> str:
        return self.spec

    # -- a URI store's filesystem (pyarrow, which Ray Train already depends on) -------------
    def _fs(self) -> tuple[Any, str]:
        if not hasattr(self, "_fs_cache"):
            try:
                from pyarrow import fs as pafs

                self._fs_cache = pafs.FileSystem.from_uri(self.uri)
            except Exception as e:  # unknown scheme, missing credentials, malformed URI
                raise KilnError(f"cannot open the store {self.uri}: {e}") from None
        return self._fs_cache

    def _list(self, path: str) -> list[Any]:
        from pyarrow import fs as pafs

        fs, _ = self._fs()
        try:
            return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError as e:
            raise KilnError(f"cannot list the store {self.uri}: {e}") from None

    def _remote_exists(self, path: str) -> bool:
        from pyarrow import fs as pafs

        fs, _ = self._fs()
        return fs.get_file_info(path).type == pafs.FileType.File

    def _fetch(self, name: str, version: int, whole: bool) -> None:
        """Download a version (or only its manifest) of a URI store into the local cache."""
        local = self.root / name / str(version)
        if (local / ".complete").exists() or (not whole and (local / MANIFEST).exists()):
            return
        from pyarrow import fs as pafs

        fs, base = self._fs()
        src = f"{base}/{name}/{version}"
        tmp = self.root / name / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            if whole:
                pafs.copy_files(src, str(tmp), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
                (tmp / ".complete").write_text("")
            else:
                with fs.open_input_stream(f"{src}/{MANIFEST}") as f:
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

    def names(self) -> list[str]:
        if self.uri is not None:
            from pyarrow import fs as pafs

            found = self._list(self._fs()[1])
            return sorted(i.base_name for i in found
                          if i.type == pafs.FileType.Directory and _NAME.match(i.base_name))
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def versions(self, name: str) -> list[int]:
        if self.uri is not None:
            base = self._fs()[1]
            folders = [i.base_name for i in self._list(f"{base}/{name}") if i.base_name.isdigit()]
            return sorted(int(v) for v in folders if self._remote_exists(f"{base}/{name}/{v}/{MANIFEST}"))
        d = self.root / name
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / MANIFEST).exists())

    def get(self, ref: str, whole: bool = True) -> Version:
        """The version named by 'name' (latest) or 'name:version'; KilnError if absent or corrupt.
        From a URI store it is downloaded first (only its manifest with ``whole=False``)."""
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none yet"
            raise KilnError(f"no model '{name}' in store {self.spec} (models: {known}); "
                            f"train one with `kiln train PLUGIN --name {name}`")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise KilnError(f"model '{name}' has no version {version} in {self.spec}; "
                            f"versions: {', '.join(map(str, versions))}")
        if self.uri is not None:
            self._fetch(name, version, whole)
        path = self.root / name / str(version)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            if not isinstance(manifest, dict) or "plugin" not in manifest or "config" not in manifest:
                raise ValueError("plugin or config missing")
        except (OSError, ValueError) as e:
            raise KilnError(f"corrupt manifest {path / MANIFEST}: {e}; delete that version folder "
                            "or restore it from a backup") from None
        return Version(name, version, path, manifest)

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

        The folder becomes visible only once complete (atomic rename); on any error nothing stays.
        """
        check_name(name)
        parent = self.root / name
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            manifest = write(tmp)
            manifest = {**manifest, "name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if self.uri is not None:
                return self._upload(name, tmp, manifest)
            for attempt in range(100):
                version = (self.versions(name) or [0])[-1] + 1 + attempt
                manifest["version"] = version
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default))
                try:
                    os.rename(tmp, parent / str(version))  # fails if another writer took it
                    return Version(name, version, parent / str(version), manifest)
                except OSError:
                    continue
            raise KilnError(f"could not allocate a new version of '{name}' in {parent}")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _upload(self, name: str, tmp: Path, manifest: dict[str, Any]) -> Version:
        """save() for a URI store: the written folder is uploaded, its manifest last (that makes
        the version visible), then kept as the version's local copy."""
        from pyarrow import fs as pafs

        fs, base = self._fs()
        version = (self.versions(name) or [0])[-1] + 1
        while fs.get_file_info(f"{base}/{name}/{version}").type != pafs.FileType.NotFound:
            version += 1  # a crashed upload's leftovers (no manifest) or another writer
        manifest["version"] = version
        dest = f"{base}/{name}/{version}"
        try:
            fs.create_dir(dest, recursive=True)
            pafs.copy_files(str(tmp), dest, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
            with fs.open_output_stream(f"{dest}/{MANIFEST}") as f:
                f.write(json.dumps(manifest, indent=2, default=_json_default).encode())
        except OSError as e:
            raise KilnError(f"cannot upload {name}:{version} to {self.uri}: {e}") from None
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default))
        (tmp / ".complete").write_text("")
        local = self.root / name / str(version)
        shutil.rmtree(local, ignore_errors=True)
        os.rename(tmp, local)
        return Version(name, version, local, manifest)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
