"""A private podman service that serves the Docker API, for machines with no Docker engine.

testcontainers talks to a Docker API. Debian's ``podman`` serves one
(``podman system service``) without any daemon installed beforehand; this
module starts such a service on a unix socket in a temporary directory, with a
configuration of its own (so nothing touches ``/var/lib/containers`` and
several sessions never share state), and tears everything down afterwards:
its containers, the service process, and the overlay mount of its storage.
Images are the exception: they live in a persistent image store in the cache
directory that the service reads as an *additional* (read-only) store, so
they are imported once per machine (:func:`esbridge.testing.images.load_into_store`).

The configuration encodes what was measured on these machines (see
``docs/testcontainers.md``): ``runc`` with ``cgroupfs`` (crun fails on hybrid
cgroups), explicit ulimits (the defaults are refused), file-based events, and a
short ``exit_command_delay`` so no ``conmon`` lingers after a container exits.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from esbridge.errors import HarnessError
from esbridge.testing.processes import die_with_parent, pid_alive, tail, wait_pid_gone

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]
log_driver = "k8s-file"

[engine]
runtime = "{runtime}"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{base}/tmp"
exit_command_delay = 5
stop_timeout = 30
"""

STORAGE_CONF = """\
[storage]
driver = "overlay"
graphroot = "{base}/storage"
runroot = "{base}/run"
"""

# The persistent, read-only (to the service) image store: imported once, kept between runs.
IMAGE_STORE_OPTIONS = """
[storage.options]
additionalimagestores = ["{store}"]
"""

# podman records its run and tmp directories in the store's database on first use and
# reuses them, so the store's must be as permanent as the store itself (not per session).
STORE_CONF = """\
[storage]
driver = "overlay"
graphroot = "{store}"
runroot = "{store}-run"
"""

PODMAN_MISSING = """\
testcontainers backend: no Docker engine answers and podman cannot run here: {reason}
Provide a container engine in one of these ways:
  1. start Docker (Docker Desktop, or a Linux Docker engine) and make DOCKER_HOST point at it
     if it is not at the default socket;
  2. install podman and runc (Debian/Ubuntu: apt-get install podman runc; `make test` does this
     itself when it runs as root): the harness then runs its own podman service;
  3. use the local backend instead (ESBRIDGE_TEST_BACKEND=local), which needs no containers.
"""


def ulimit(kind: int, cap: int = 65536) -> int:
    """This process's hard limit (capped): a container may not be given more than that."""
    hard = resource.getrlimit(kind)[1]
    return cap if hard == resource.RLIM_INFINITY else min(hard, cap)


def podman_executable() -> str | None:
    return shutil.which("podman")


def oci_runtime() -> str | None:
    """The OCI runtime to use: runc (crun fails on these machines' hybrid cgroups)."""
    for name in ("runc", "crun"):
        if shutil.which(name):
            return name
    return None


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (deepest first), from /proc/self/mounts."""
    prefix = str(path)
    found = []
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) > 1:
            point = fields[1].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def processes_using(path: Path) -> list[int]:
    """PIDs of live processes whose command line mentions ``path`` (its helpers)."""
    needle = str(path).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


class PodmanService:
    """``podman system service`` on ``unix://<tmp>/podman.sock`` with private storage.

    Use :attr:`docker_host` as ``DOCKER_HOST``; :meth:`env` gives everything a
    testcontainers client needs. :meth:`close` removes the containers, stops
    the service (by its PID) and unmounts and deletes the storage.
    """

    def __init__(self, image_store: Path | None = None) -> None:
        if not sys.platform.startswith("linux"):
            raise HarnessError(PODMAN_MISSING.format(reason="podman services need Linux"))
        podman = podman_executable()
        if podman is None:
            raise HarnessError(PODMAN_MISSING.format(reason="no `podman` on PATH"))
        runtime = oci_runtime()
        if runtime is None:
            raise HarnessError(PODMAN_MISSING.format(reason="no OCI runtime (`runc`) on PATH"))
        self.podman = podman
        self.base = Path(tempfile.mkdtemp(prefix="esbridge-podman-"))
        (self.base / "tmp").mkdir()
        self.containers_conf = self.base / "containers.conf"
        self.storage_conf = self.base / "storage.conf"
        self.containers_conf.write_text(
            CONTAINERS_CONF.format(
                runtime=runtime,
                base=self.base,
                nofile=ulimit(resource.RLIMIT_NOFILE),
                nproc=ulimit(resource.RLIMIT_NPROC, 4096),
            )
        )
        storage = STORAGE_CONF.format(base=self.base)
        self.image_store = image_store
        self.store_conf = self.base / "store.conf"
        self.store_containers_conf = self.base / "store-containers.conf"
        if image_store is not None:
            image_store.mkdir(parents=True, exist_ok=True)
            storage += IMAGE_STORE_OPTIONS.format(store=image_store)
            self.store_conf.write_text(STORE_CONF.format(store=image_store))
            self.store_containers_conf.write_text(
                self.containers_conf.read_text().replace(
                    f'tmp_dir = "{self.base}/tmp"', f'tmp_dir = "{image_store}-tmp"'
                )
            )
        self.storage_conf.write_text(storage)
        self.socket = self.base / "podman.sock"
        self.logfile = self.base / "service.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def podman_env(self) -> dict[str, str]:
        """The environment for ``podman`` commands against this service's storage."""
        return os.environ | {
            "CONTAINERS_CONF": str(self.containers_conf),
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
        }

    def client_env(self) -> dict[str, str]:
        """What a Docker/testcontainers client needs to use this service.

        Ryuk (testcontainers' reaper) is disabled: its image cannot be pulled
        here, and the harness removes its own containers. ``TC_HOST`` and the
        connection mode stop testcontainers from guessing a gateway address
        because ``/.dockerenv`` exists on machines that are not containers.
        """
        return {
            "DOCKER_HOST": self.docker_host,
            "TESTCONTAINERS_RYUK_DISABLED": "true",
            "TC_HOST": "127.0.0.1",
            "TESTCONTAINERS_CONNECTION_MODE": "docker_host",
            "ESBRIDGE_CONTAINER_NETWORK": "host",
        }

    def start(self, timeout: float = 30.0) -> None:
        t0 = time.monotonic()
        log = self.logfile.open("ab")
        self.process = subprocess.Popen(
            [self.podman, "system", "service", "--time=0", self.docker_host],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.podman_env(),
            preexec_fn=die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self.socket.exists() and self.ping():
                self.startup_seconds = time.monotonic() - t0
                return
            time.sleep(0.05)
        code = self.process.poll()
        self.close()
        state = f"exited with code {code}" if code is not None else f"no answer in {timeout:.0f} s"
        raise HarnessError(
            PODMAN_MISSING.format(reason=f"`podman system service` {state}")
            + f"--- tail of {self.logfile} ---\n{tail(self.logfile)}"
        )

    def ping(self) -> bool:
        import docker  # the optional extra esbridge[containers] (the engine checked it)

        try:
            client = docker.DockerClient(base_url=self.docker_host, timeout=3)
        except Exception:
            return False
        try:
            return bool(client.ping())
        except Exception:
            return False
        finally:
            client.close()

    def podman_cmd(
        self, *args: str, timeout: float = 120, store: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run ``podman`` on this service's storage, or (``store=True``) on the image store."""
        env = self.podman_env()
        if store:
            if self.image_store is None:
                raise HarnessError("this podman service has no image store")
            env["CONTAINERS_STORAGE_CONF"] = str(self.store_conf)
            env["CONTAINERS_CONF"] = str(self.store_containers_conf)
        return subprocess.run(
            [self.podman, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def close(self) -> None:
        """Remove every container, stop the service, unmount and delete the storage."""
        if not self.base.exists():
            return
        try:
            if (self.base / "storage").exists():
                self.podman_cmd("rm", "--force", "--all", "--time", "0")
        except (OSError, subprocess.SubprocessError):
            pass
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc is not None:
            wait_pid_gone(proc.pid, 5)
        self.process = None
        self._wait_for_helpers()
        for point in mounts_under(self.base):
            subprocess.run(["umount", point], capture_output=True)
        for point in mounts_under(self.base):  # busy a moment ago: detach it
            subprocess.run(["umount", "--lazy", point], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def _wait_for_helpers(self, timeout: float = 20.0) -> None:
        """Wait for the ``conmon`` and ``podman container cleanup`` processes of our containers.

        They outlive the service (conmon runs each container's exit command a
        few seconds after it stops) and would write into the storage again
        after it is deleted. Any still running after ``timeout`` are killed —
        they belong to this service's containers, found by its directory.
        """
        deadline = time.monotonic() + timeout
        while (pids := processes_using(self.base)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_pid_gone(pid, 5)
