"""Which Docker API the testcontainers backend talks to, and which images it runs.

``ESBRIDGE_CONTAINER_ENGINE`` chooses the engine:

* ``docker``: the Docker API that ``DOCKER_HOST`` (or the default socket)
  names — Docker Desktop, a Linux Docker engine, or a podman socket the user
  runs (``podman system service``/``podman.socket``);
* ``podman``: a private podman service the harness starts and stops itself
  (:mod:`esbridge.testing.podman`), for machines with podman but no engine;
* ``auto`` (default): ``docker`` when one answers, else ``podman``.

``ESBRIDGE_CONTAINER_NETWORK`` is ``bridge`` (publish the port on 127.0.0.1;
the default with a Docker engine) or ``host`` (the default with the harness's
podman service, which is what works on machines without bridge networking).

``ESBRIDGE_CONTAINER_IMAGES`` is ``official`` (pull ``postgres`` and
``apache/kafka``; the default with a Docker engine) or ``local`` (build
equivalent images from this machine's files, no registry needed; the default
with the harness's podman service).

One engine is shared by every server of the process and is closed (podman
service stopped, environment restored) when the last server releases it.

``testcontainers`` (and the ``docker`` client it brings) is the optional extra
``esbridge[containers]``: it is imported only where this backend is used, so
the harness's local and external backends work without it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import threading
import time
from typing import Any

from esbridge.errors import HarnessError
from esbridge.testing import images
from esbridge.testing.podman import PODMAN_MISSING, PodmanService, oci_runtime
from esbridge.testing.provision import may_install

_lock = threading.Lock()
_engine: ContainerEngine | None = None
#: What every engine of this process measured (seconds), for reports: "podman service
#: start", "<kind> image build", "<kind> image import", "<kind> container create", ...
TIMINGS: dict[str, list[float]] = {}


def record(what: str, seconds: float) -> None:
    TIMINGS.setdefault(what, []).append(seconds)


def _choice(var: str, allowed: tuple[str, ...], default: str) -> str:
    value = (os.environ.get(var) or default).lower()
    if value not in allowed:
        raise HarnessError(f"{var}={value!r} is not one of {', '.join(allowed)}")
    return value


CONTAINERS_EXTRA_MISSING = (
    "the testcontainers backend needs the optional 'containers' extra (testcontainers and "
    "the Docker client it brings): pip install 'esbridge[containers]', or choose the local "
    "or external backend (ESBRIDGE_TEST_BACKEND)"
)


def containers_extra_missing() -> str | None:
    """Why the optional ``containers`` extra cannot be imported here, or None when it can."""
    try:
        # The optional extra esbridge[containers], imported only by this backend.
        import docker  # noqa: F401
        import testcontainers  # noqa: F401
    except ModuleNotFoundError as e:
        return f"{CONTAINERS_EXTRA_MISSING} ({e})"
    return None


def docker_ping(docker_host: str | None = None) -> bool:
    """True when the Docker API (``docker_host``, else the environment's) answers.

    False, too, without the optional ``containers`` extra: the ``auto`` backend
    then picks the local processes.
    """
    try:
        import docker  # the optional extra esbridge[containers]

        if docker_host:
            client = docker.DockerClient(base_url=docker_host, timeout=3)
        else:
            client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def unavailable_reason() -> str | None:
    """Why no container engine can be used here, or None (nothing is started to find out)."""
    missing = containers_extra_missing()
    if missing is not None:
        return missing
    engine = _choice("ESBRIDGE_CONTAINER_ENGINE", ("auto", "docker", "podman"), "auto")
    if engine != "podman" and docker_ping():
        return None
    if engine == "docker":
        return "ESBRIDGE_CONTAINER_ENGINE=docker, but no Docker API answers (DOCKER_HOST?)"
    if not sys.platform.startswith("linux"):
        return PODMAN_MISSING.format(reason="podman services need Linux")
    if shutil.which("podman") is None:
        return PODMAN_MISSING.format(reason="`podman` is not installed")
    if oci_runtime() is None:
        return PODMAN_MISSING.format(reason="no OCI runtime (`runc`) on PATH")
    return None


def containers_required() -> bool:
    """Whether a missing engine must fail (CI, or where provisioning could install podman)."""
    if os.environ.get("ESBRIDGE_REQUIRE_CONTAINERS", "") in ("0", "false", "no"):
        return False
    return bool(os.environ.get("CI") or os.environ.get("ESBRIDGE_REQUIRE_CONTAINERS")) or (
        may_install() and sys.platform.startswith("linux")
    )


class ContainerEngine:
    """A Docker API client plus the choices (network, images) for this engine."""

    def __init__(self) -> None:
        missing = containers_extra_missing()
        if missing is not None:
            raise HarnessError(missing)
        import docker  # the optional extra esbridge[containers] (checked above)

        choice = _choice("ESBRIDGE_CONTAINER_ENGINE", ("auto", "docker", "podman"), "auto")
        self.service: PodmanService | None = None
        self.saved_env: dict[str, str | None] = {}
        self.images: dict[str, str] = {}
        self.refs = 0
        if choice != "podman" and docker_ping():
            self.kind = "Docker API at " + (os.environ.get("DOCKER_HOST") or "the default socket")
            default_network, default_images = "bridge", "official"
        elif choice == "docker":
            raise HarnessError(
                "testcontainers backend: ESBRIDGE_CONTAINER_ENGINE=docker but no Docker API "
                f"answers at {os.environ.get('DOCKER_HOST') or 'the default socket'}: start "
                "Docker (or `podman system service`) and set DOCKER_HOST"
            )
        else:
            self.service = PodmanService(image_store=images.image_store_dir())
            self.service.start()
            record("podman service start", self.service.startup_seconds)
            self._use_service_env(self.service.client_env())
            self.kind = f"podman service at {self.service.docker_host}"
            default_network, default_images = "host", "local"
        self.network = _choice("ESBRIDGE_CONTAINER_NETWORK", ("host", "bridge"), default_network)
        self.image_mode = _choice(
            "ESBRIDGE_CONTAINER_IMAGES", ("official", "local"), default_images
        )
        if self.service is not None:
            # Child processes (``esbridge dev-servers`` started by a test) see DOCKER_HOST
            # and would take the service for a Docker daemon with official images (which
            # cannot be pulled here): they get this engine's choices too.
            self._use_service_env(
                {
                    "ESBRIDGE_CONTAINER_NETWORK": self.network,
                    "ESBRIDGE_CONTAINER_IMAGES": self.image_mode,
                }
            )
        try:
            self.client: Any = docker.from_env(timeout=120)
        except Exception as e:
            self.close()
            raise HarnessError(f"testcontainers backend: cannot reach {self.kind}: {e}") from e

    def _use_service_env(self, env: dict[str, str]) -> None:
        """Point testcontainers (which reads the environment) at the harness's service.

        Ryuk is disabled (its image cannot be pulled here; the harness removes its
        own containers) and the host is pinned to 127.0.0.1 because ``/.dockerenv``
        makes testcontainers think it runs inside a container.
        """
        for key, value in env.items():
            self.saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        from testcontainers.core.config import testcontainers_config  # the optional extra

        testcontainers_config.ryuk_disabled = True
        testcontainers_config.tc_host_override = "127.0.0.1"

    def describe(self) -> str:
        return f"{self.kind}, {self.network} network, {self.image_mode} images"

    def image_for(self, kind: str, env_var: str, default: str) -> str:
        """The image to run for ``kind`` (``postgres``/``kafka``), loaded into the engine."""
        name = os.environ.get(env_var)
        if name:
            return name
        if kind in self.images:
            return self.images[kind]
        if self.image_mode == "local":
            try:
                local = images.postgres_image() if kind == "postgres" else images.kafka_image()
            except HarnessError as e:
                raise HarnessError(
                    f"testcontainers backend ({self.describe()}): cannot build the {kind} image "
                    f"from this machine's files (no registry is used in local image mode):\n{e}"
                ) from e
            if local.build_seconds:
                record(f"{kind} image build", local.build_seconds)
            if self.service is not None and self.service.image_store is not None:
                seconds = images.load_into_store(self.service, local)
            else:
                seconds = images.load(self.client, local)
            if seconds:
                record(f"{kind} image import", seconds)
            default = local.name
        self.images[kind] = default
        return default

    def release(self) -> None:
        global _engine
        with _lock:
            self.refs -= 1
            if self.refs > 0:
                return
            if _engine is self:
                _engine = None
        self.close()

    def close(self) -> None:
        """Stop the podman service (if the harness started one) and restore the environment."""
        client = getattr(self, "client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if self.service is not None:
            t0 = time.monotonic()
            self.service.close()
            record("podman service stop", time.monotonic() - t0)
            self.service = None
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.saved_env = {}


def acquire_engine() -> ContainerEngine:
    """The process's engine (started on first use); pair with :meth:`ContainerEngine.release`."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = ContainerEngine()
        _engine.refs += 1
        return _engine


def current_engine() -> ContainerEngine | None:
    return _engine


@atexit.register
def _close_at_exit() -> None:
    engine = _engine
    if engine is not None:
        with contextlib.suppress(Exception):
            engine.close()
