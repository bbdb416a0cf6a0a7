"""Container images built from this machine's own files, for engines with no registry.

The testcontainers backend uses the official ``postgres`` and ``apache/kafka``
images by default. Where no registry can be reached (CI here runs podman with
no network), ``ESBRIDGE_CONTAINER_IMAGES=local`` makes the harness build
equivalent images from files already on the machine instead:

* PostgreSQL: the host's server binaries (``/usr/lib/postgresql/<v>``) plus
  the shared libraries ``ldd`` lists, and an entrypoint that honours the
  official image's interface (``POSTGRES_USER``/``POSTGRES_PASSWORD``/
  ``POSTGRES_DB``, ``PGDATA``, ``postgres -c ...`` arguments);
* Apache Kafka: the host's Java runtime plus the same Kafka jars the local
  backend runs (:func:`esbridge.testing.kafka_dist.kafka_libs`), and an
  entrypoint that honours the official ``apache/kafka`` image's interface
  (``KAFKA_*`` variables become ``server.properties``, ``CLUSTER_ID``,
  ``KAFKA_HEAP_OPTS``).

Because both honour the official images' interfaces, the backend configures
them exactly as it configures the official images. A root filesystem is
written as one tarball and cached under
``<cache_dir>/images/`` keyed by a hash of its inputs, so only the first run
(or a changed JRE/PostgreSQL/Kafka) pays for the build; importing a cached
tarball into an engine takes a few seconds.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esbridge.errors import HarnessError
from esbridge.testing.kafka_dist import cache_dir, java_executable, kafka_libs
from esbridge.testing.local_postgres import MISSING_POSTGRES, find_pg_bin
from esbridge.testing.podman import PodmanService

# Bump when the layout or the entrypoints change: it invalidates cached tarballs.
FORMAT = "3"

POSTGRES_UID = 999
KAFKA_UID = 1000

# Small tools the entrypoints use (dash, coreutils, sed).
SHELL_TOOLS = ("/bin/sh", "/usr/bin/env", "/usr/bin/cat", "/usr/bin/rm", "/usr/bin/mkdir",
               "/usr/bin/sed", "/usr/bin/tr")  # fmt: skip

POSTGRES_ENTRYPOINT = """\
#!/bin/sh
# esbridge's PostgreSQL image: the official image's interface, from the host's binaries.
set -e
: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "$POSTGRES_PASSWORD" ]; then
    echo "error: POSTGRES_PASSWORD must be set (as for the official postgres image)" >&2
    exit 1
  fi
  mkdir -p "$PGDATA"
  printf '%s\\n' "$POSTGRES_PASSWORD" > /tmp/pwfile
  initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile=/tmp/pwfile --auth-local=trust \\
    --auth-host=scram-sha-256 --encoding=UTF8 --locale=C --no-sync >/tmp/initdb.log
  rm -f /tmp/pwfile
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
  if [ "$POSTGRES_DB" != postgres ]; then
    echo "CREATE DATABASE \\"$POSTGRES_DB\\"" | postgres --single -D "$PGDATA" postgres >/dev/null
  fi
  echo "PostgreSQL init process complete; ready for start up."
fi
case "$1" in -*) set -- postgres "$@" ;; esac
exec "$@"
"""

KAFKA_ENTRYPOINT = """\
#!/bin/sh
# esbridge's Kafka image: the apache/kafka image's interface, from the host's JRE.
set -e
: "${CLUSTER_ID:=5L6g3nShT-eMCtK--X86sw}"
: "${KAFKA_LOG_DIRS:=/var/lib/kafka/data}"
: "${KAFKA_HEAP_OPTS:=-Xmx1G -Xms1G}"
export KAFKA_LOG_DIRS
conf=/opt/kafka/config/server.properties
# KAFKA_FOO_BAR=x -> foo.bar=x ("__" -> "_", "___" -> "-"), as apache/kafka does.
env | while IFS='=' read -r name value; do
  case "$name" in
    KAFKA_HEAP_OPTS|KAFKA_OPTS|KAFKA_JVM_PERFORMANCE_OPTS|KAFKA_GC_LOG_OPTS|KAFKA_JMX_OPTS) ;;
    KAFKA_LOG4J_OPTS|KAFKA_VERSION|KAFKA_JMX_PORT|KAFKA_JMX_HOSTNAME) ;;
    KAFKA_*)
      key=$(printf '%s' "${name#KAFKA_}" \\
        | sed -e 's/___/-/g' -e 's/__/@/g' -e 's/_/./g' -e 's/@/_/g' | tr 'A-Z' 'a-z')
      printf '%s=%s\\n' "$key" "$value" ;;
  esac
done > "$conf"
java="$JAVA_HOME/bin/java"
opts="$KAFKA_HEAP_OPTS -XX:+UseG1GC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true"
opts="$opts -Dlog4j2.configurationFile=/opt/kafka/config/log4j2.xml $KAFKA_OPTS"
if [ ! -f "$KAFKA_LOG_DIRS/meta.properties" ]; then
  # shellcheck disable=SC2086
  $java $opts -cp '/opt/kafka/libs/*' kafka.tools.StorageTool format --ignore-formatted \\
    -t "$CLUSTER_ID" -c "$conf"
fi
# shellcheck disable=SC2086
exec $java $opts -cp '/opt/kafka/libs/*' kafka.Kafka "$conf"
"""


@dataclass(frozen=True)
class LocalImage:
    """A root filesystem tarball and the image settings to import it with."""

    name: str  # fully qualified (``localhost/...``): an engine must never try to pull it
    tarball: Path
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    user: str
    build_seconds: float = 0.0  # 0 when it came from the cache

    def changes(self) -> list[str]:
        """Dockerfile instructions for ``docker import --change`` (one ENV per variable)."""
        quote = _json_list
        out = [f"ENTRYPOINT {quote(self.entrypoint)}", f"CMD {quote(self.cmd)}"]
        out += [f"ENV {k}={v}" for k, v in self.env.items()]
        out.append(f"USER {self.user}")
        return out


def _json_list(items: list[str]) -> str:
    import json

    return json.dumps(items)


@dataclass
class RootfsTar:
    """Writes a root filesystem straight into a tar file (no staging directory).

    Files keep their host paths unless told otherwise; ``add_binary`` also
    adds every shared library ``ldd`` lists, which is what makes a host binary
    run in an otherwise empty image.
    """

    tar: tarfile.TarFile
    added: set[str] = field(default_factory=set)
    owners: dict[str, int] = field(default_factory=dict)  # arcname prefix -> uid

    def _owner(self, arcname: str) -> int:
        best, uid = "", 0
        for prefix, owner in self.owners.items():
            if (arcname == prefix or arcname.startswith(prefix + "/")) and len(prefix) > len(best):
                best, uid = prefix, owner
        return uid

    def _info(self, arcname: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
        info = tarfile.TarInfo(arcname)
        info.type = kind
        info.mode = mode
        info.size = size
        info.uid = info.gid = self._owner(arcname)
        info.mtime = 0
        return info

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        arc = _arc(path)
        if not arc or arc in self.added:
            return
        self.mkdir(os.path.dirname(arc), 0o755)
        self.tar.addfile(self._info(arc, tarfile.DIRTYPE, mode))
        self.added.add(arc)

    def symlink(self, path: str, target: str) -> None:
        arc = path.strip("/")
        self.mkdir(os.path.dirname(arc))
        info = self._info(arc, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self.tar.addfile(info)
        self.added.add(arc)

    def text(self, path: str, content: str, mode: int = 0o644) -> None:
        arc = _arc(path)
        data = content.encode()
        self.mkdir(os.path.dirname(arc))
        self.tar.addfile(self._info(arc, tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))
        self.added.add(arc)

    def file(self, src: str | Path, dest: str | None = None) -> None:
        """Add ``src`` (symlinks followed) at ``dest`` (default: its own path)."""
        arc = _arc(dest or str(src))
        if arc in self.added:
            return
        real = Path(src).resolve()
        st = real.stat()
        self.mkdir(os.path.dirname(arc))
        with real.open("rb") as f:
            self.tar.addfile(self._info(arc, tarfile.REGTYPE, st.st_mode & 0o7777, st.st_size), f)
        self.added.add(arc)

    def tree(self, src: Path, dest: str, skip: Callable[[Path], bool] = lambda p: False) -> None:
        """Add a directory tree, following symlinks and leaving out dangling ones."""
        for root, dirs, files in os.walk(src, followlinks=True):
            root_path = Path(root)
            dirs[:] = [d for d in dirs if not skip(root_path / d)]
            rel = root_path.relative_to(src)
            self.mkdir(str(Path(dest) / rel))
            for name in files:
                path = root_path / name
                if skip(path) or not path.exists():
                    continue
                self.file(path, str(Path(dest) / rel / name))

    def binary(self, path: str | Path, dest: str | None = None) -> None:
        """A host executable or shared object, and the libraries ``ldd`` says it needs."""
        self.file(path, dest)
        for lib in ldd(Path(path)):
            self.file(lib)


_MERGED = ("bin", "sbin", "lib", "lib64")


def _arc(path: str) -> str:
    """The tar member name of ``path``, with Debian's merged-/usr links resolved.

    ``/lib`` etc. are symlinks in the image; members must never go through them.
    """
    arc = os.path.normpath("/" + path).strip("/")
    head, _, rest = arc.partition("/")
    if head in _MERGED and rest:
        return f"usr/{head}/{rest}"
    return arc


_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


def ldd(path: Path) -> list[str]:
    """Absolute paths of the shared libraries ``path`` loads (missing ones left out)."""
    result = subprocess.run(["ldd", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        return []  # not dynamic (a script, a static binary)
    return [m.group(1) for m in map(_LDD_LINE.search, result.stdout.splitlines()) if m]


def _base_layout(root: RootfsTar, users: Iterable[tuple[str, int]]) -> None:
    """Debian's merged /usr layout, /tmp, users, and the shell tools."""
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                         ("lib64", "usr/lib64")):  # fmt: skip
        root.mkdir(f"/{target}")
        root.symlink(link, target)
    root.mkdir("/tmp", 0o1777)
    root.mkdir("/etc")
    root.mkdir("/proc")
    root.mkdir("/dev")
    root.mkdir("/sys")
    passwd = ["root:x:0:0:root:/root:/bin/sh"]
    group = ["root:x:0:"]
    for name, uid in users:
        passwd.append(f"{name}:x:{uid}:{uid}:{name}:/tmp:/bin/sh")
        group.append(f"{name}:x:{uid}:")
    root.text("/etc/passwd", "\n".join(passwd) + "\n")
    root.text("/etc/group", "\n".join(group) + "\n")
    for tool in SHELL_TOOLS:
        if Path(tool).exists():
            root.binary(tool)


def _fingerprint(*parts: Any) -> str:
    """A hash of the image inputs: versions, scripts, and the sizes/mtimes of key files."""
    h = hashlib.sha256(FORMAT.encode())
    for part in parts:
        if isinstance(part, Path):
            for path in sorted(part.rglob("*")) if part.is_dir() else [part]:
                try:
                    st = path.stat()
                except OSError:
                    continue
                h.update(f"{path}:{st.st_size}:{int(st.st_mtime)}".encode())
        else:
            h.update(str(part).encode())
    return h.hexdigest()[:12]


def _build(tarball: Path, fill: Callable[[RootfsTar], None]) -> float:
    """Write ``tarball`` atomically with ``fill``; return the seconds it took."""
    t0 = time.monotonic()
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(f".partial-{os.getpid()}")
    try:
        with tarfile.open(partial, "w", format=tarfile.GNU_FORMAT) as tar:
            fill(RootfsTar(tar))
        partial.replace(tarball)
    finally:
        partial.unlink(missing_ok=True)
    return time.monotonic() - t0


def _cached(name: str, key: str, fill: Callable[[RootfsTar], None]) -> tuple[Path, float]:
    tarball = cache_dir() / "images" / f"{name}-{key}.tar"
    if tarball.exists():
        return tarball, 0.0
    for old in tarball.parent.glob(f"{name}-*.tar"):
        old.unlink(missing_ok=True)  # an older build of the same image: no longer needed
    return tarball, _build(tarball, fill)


def _cached_image(
    kind: str,
    version: str,
    key: str,
    fill: Callable[[RootfsTar], None],
    *,
    entrypoint: list[str],
    cmd: list[str],
    env: dict[str, str],
    uid: int,
) -> LocalImage:
    """The ``esbridge-<kind>`` image of ``version``, its tarball built by ``fill`` unless cached."""
    tarball, seconds = _cached(f"{kind}-{version}", key, fill)
    return LocalImage(
        name=f"localhost/esbridge-{kind}:{version}-{key}",
        tarball=tarball,
        entrypoint=entrypoint,
        cmd=cmd,
        env=env,
        user=f"{uid}:{uid}",
        build_seconds=seconds,
    )


def postgres_image() -> LocalImage:
    """PostgreSQL from the host's server binaries (built once, then cached)."""
    pg_bin = find_pg_bin()
    if pg_bin is None:
        raise HarnessError(MISSING_POSTGRES)
    prefix = pg_bin.parent  # /usr/lib/postgresql/15
    version = prefix.name
    share = Path("/usr/share/postgresql") / version
    if not share.is_dir():
        share = prefix / "share"
    key = _fingerprint(version, POSTGRES_ENTRYPOINT, pg_bin, prefix / "lib", share)

    def skip(path: Path) -> bool:
        return path.name.startswith("llvmjit") or path.name in ("bitcode", "pgxs")

    def fill(root: RootfsTar) -> None:
        root.owners = {"var/lib/postgresql": POSTGRES_UID, "var/run/postgresql": POSTGRES_UID}
        _base_layout(root, [("postgres", POSTGRES_UID)])
        for exe in ("postgres", "initdb", "pg_ctl", "psql", "pg_isready"):
            root.binary(pg_bin / exe)
        lib = prefix / "lib"
        for so in sorted(lib.glob("*.so")):
            if not skip(so):
                root.binary(so)
        root.tree(share, str(share), skip)
        if Path("/usr/share/zoneinfo").is_dir():
            root.tree(Path("/usr/share/zoneinfo"), "/usr/share/zoneinfo")
        root.mkdir("/var/lib/postgresql", 0o755)
        root.mkdir("/var/run/postgresql", 0o2775)
        root.text("/usr/local/bin/docker-entrypoint.sh", POSTGRES_ENTRYPOINT, 0o755)

    return _cached_image(
        "postgres",
        version,
        key,
        fill,
        entrypoint=["/usr/local/bin/docker-entrypoint.sh"],
        cmd=["postgres"],
        env={
            "PATH": f"{pg_bin}:/usr/local/bin:/usr/bin:/bin",
            "PGDATA": "/var/lib/postgresql/data",
            "TZ": "UTC",
            "LANG": "C",
        },
        uid=POSTGRES_UID,
    )


def java_home() -> Path:
    """The host's Java runtime directory (resolved from ``java`` on PATH or JAVA_HOME)."""
    return Path(java_executable()).resolve().parent.parent


def kafka_image() -> LocalImage:
    """Apache Kafka (the local backend's jars) on the host's JRE (built once, then cached)."""
    libs, version = kafka_libs()
    jre = java_home()
    log4j = Path(__file__).with_name("log4j2.xml")
    key = _fingerprint(version, KAFKA_ENTRYPOINT, libs, jre / "release", jre / "lib", log4j)
    unneeded = {"jmods", "include", "legal", "man", "docs", "demo", "src.zip", "ct.sym"}

    def skip(path: Path) -> bool:
        return path.name in unneeded

    def fill(root: RootfsTar) -> None:
        root.owners = {"var/lib/kafka": KAFKA_UID, "opt/kafka/config": KAFKA_UID}
        _base_layout(root, [("appuser", KAFKA_UID)])
        root.tree(jre, "/opt/java/openjdk", skip)
        # The JRE's own libraries are in /opt/java already; add the system ones they load.
        objects = [
            jre / "bin" / "java",
            *map(Path, glob.glob(f"{jre}/lib/**/*.so", recursive=True)),
        ]
        for obj in objects:
            for dep in ldd(obj):
                if not os.path.normpath(dep).startswith(f"{jre}/"):
                    root.file(dep)
        for jar in sorted(libs.glob("*.jar")):
            root.file(jar, f"/opt/kafka/libs/{jar.name}")
        root.mkdir("/opt/kafka/config", 0o755)
        root.file(log4j, "/opt/kafka/config/log4j2.xml")
        root.mkdir("/var/lib/kafka", 0o755)
        root.text("/etc/kafka/docker/run", KAFKA_ENTRYPOINT, 0o755)

    return _cached_image(
        "kafka",
        version,
        key,
        fill,
        entrypoint=["/etc/kafka/docker/run"],
        cmd=[],
        env={
            "PATH": "/opt/java/openjdk/bin:/usr/bin:/bin",
            "JAVA_HOME": "/opt/java/openjdk",
            "LANG": "C.UTF-8",
        },
        uid=KAFKA_UID,
    )


def load(client: Any, image: LocalImage) -> float:
    """Import ``image`` into the engine behind the docker-py ``client`` unless it is there.

    Returns the seconds the import took (0 when the engine already had it).
    """
    import docker.errors  # the optional extra esbridge[containers] (the engine checked it)

    try:
        client.images.get(image.name)
        return 0.0
    except docker.errors.ImageNotFound:
        pass
    repository, tag = image.name.rsplit(":", 1)
    t0 = time.monotonic()
    try:
        response = client.api.import_image_from_file(
            str(image.tarball), repository=repository, tag=tag, changes=image.changes()
        )
        # podman's Docker API ignores the tag of an import: tag the new image by its id.
        ids = re.findall(r"sha256:[0-9a-f]{64}", str(response))
        if ids:
            client.images.get(ids[-1]).tag(repository, tag)
        client.images.get(image.name)
    except docker.errors.DockerException as e:
        raise HarnessError(
            f"testcontainers backend: importing the locally built image {image.name} "
            f"from {image.tarball} failed: {e}"
        ) from e
    return time.monotonic() - t0


def image_store_dir() -> Path:
    """The podman image store that keeps imported images between runs."""
    return cache_dir() / "podman-store"


def load_into_store(service: PodmanService, image: LocalImage) -> float:
    """Import ``image`` into ``service``'s persistent image store unless it is there.

    The service reads the store as an additional (read-only) image store, so
    an image is imported once per machine, not once per session. A file lock
    keeps concurrent sessions from importing at the same time. Returns the
    seconds the import took (0 when the store already had it).
    """
    import fcntl

    store = image_store_dir()
    store.mkdir(parents=True, exist_ok=True)
    with (store.parent / "podman-store.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if service.podman_cmd("image", "exists", image.name, store=True).returncode == 0:
            return 0.0
        t0 = time.monotonic()
        changes = [arg for change in image.changes() for arg in ("--change", change)]
        result = service.podman_cmd(
            "import", *changes, str(image.tarball), image.name, store=True, timeout=600
        )
        if result.returncode != 0:
            raise HarnessError(
                f"testcontainers backend (podman): importing the locally built image "
                f"{image.name} from {image.tarball} into {store} failed:\n"
                f"{(result.stdout + result.stderr)[-2000:]}"
            )
        seconds = time.monotonic() - t0
        # Older builds of the same image are no longer needed (best effort).
        repository = image.name.rsplit(":", 1)[0]
        listed = service.podman_cmd(
            "images", "--format", "{{.Repository}}:{{.Tag}}", repository, store=True
        )
        for name in listed.stdout.split():
            if name != image.name:
                service.podman_cmd("rmi", "--force", name, store=True)
        return seconds


def build_all() -> dict[str, LocalImage]:
    """Build (or find in the cache) both images; for ``provision`` and the CI conftest."""
    return {"postgres": postgres_image(), "kafka": kafka_image()}


def remove_cached() -> None:
    """Delete every cached image tarball (the next run rebuilds them)."""
    shutil.rmtree(cache_dir() / "images", ignore_errors=True)
