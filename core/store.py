"""The model store: the only contract between training and serving.

Layout (this module is the only one that builds these paths)::

    <store>/<name>/<version>/model.weights.h5   Keras weights (model.save_weights)
                             manifest.json      plugin, resolved config, dataset info, metrics, ...
                             artifacts/*.png    sample grids and other pictures
                             assets/            files inference needs (Plugin.save_assets)

Versions are integers. A version is written into a hidden temporary folder and renamed into
place, so a crash mid-save leaves no half version behind.
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

from kiln.plugin import KilnError

WEIGHTS = "model.weights.h5"
MANIFEST = "manifest.json"
ARTIFACTS = "artifacts"
ASSETS = "assets"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def default_root() -> Path:
    """$KILN_STORE, else ./kiln-store."""
    return Path(os.environ.get("KILN_STORE", "kiln-store")).expanduser()


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
    """A model store rooted at a local folder."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_root()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def versions(self, name: str) -> list[int]:
        d = self.root / name
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / MANIFEST).exists())

    def get(self, ref: str) -> Version:
        """The version named by 'name' (latest) or 'name:version'; KilnError if absent or corrupt."""
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none yet"
            raise KilnError(f"no model '{name}' in store {self.root} (models: {known}); "
                            f"train one with `kiln train PLUGIN --name {name}`")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise KilnError(f"model '{name}' has no version {version} in {self.root}; "
                            f"versions: {', '.join(map(str, versions))}")
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
                    out.append(self.get(f"{name}:{v}"))
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


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
