"""What every ``esbridge`` subcommand module shares when it registers itself."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from esbridge.errors import ConfigurationError
from esbridge.system.loading import application_class

#: ``:role:`target```, ``:role:`~package.module.Name``` and ``:role:`text <target>```.
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`(?:~[\w.]*\.)?([^`<]*?)(?:\s*<[^>]*>)?`")
#: ```text <https://...>`_`` (a link) and ```text`_``.
_LINK = re.compile(r"`([^`<]+?)\s*<([^>]+)>`__?")
_REFERENCE = re.compile(r"`([^`]+)`__?")


def plain_text(text: str) -> str:
    """``text`` with its reST markup made plain, for ``--help`` read in a terminal.

    The CLI's help comes from docstrings, written in reST for the API docs.
    Double backquotes go; a role (``:mod:``, ``:class:``, ...) leaves its
    target (its last name after a ``~``); a link leaves its text and address;
    ``Example::`` becomes ``Example:``.
    """
    text = _ROLE.sub(r"\1", text)
    text = _LINK.sub(r"\1 (\2)", text)
    text = text.replace("``", "")
    text = _REFERENCE.sub(r"\1", text)
    text = re.sub(r"(?m)^[ \t]*::[ \t]*\n", "", text)  # a literal block's own marker line
    return re.sub(r"(?m)(\S)::(?=[ \t]*$)", r"\1:", text)


class Parser(argparse.ArgumentParser):
    """The parser of the ``esbridge`` command and (inherited) of each subcommand.

    Its help is :func:`plain_text`: whatever a module docstring or an
    option's help says in reST, ``--help`` shows it plain.
    """

    def format_help(self) -> str:
        return plain_text(super().format_help())

    def format_usage(self) -> str:
        return plain_text(super().format_usage())


def add_command(subparsers: Any, name: str, help: str, doc: str | None) -> argparse.ArgumentParser:
    """Add subcommand ``name``: ``help`` in the command list, the module's ``doc`` as ``--help``.

    The module docstring is shown as written (its line breaks and examples
    kept), its reST markup made plain (:class:`Parser`).
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help,
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def add_app_dir(parser: argparse.ArgumentParser) -> None:
    """The ``--app-dir`` option of every command that imports the user's code.

    A console script, unlike ``python -m``, does not put the current directory
    on the Python path: without this, ``esbridge relay myapp:Shop`` run in the
    project's directory could not import ``myapp``.
    """
    parser.add_argument(
        "--app-dir",
        default=".",
        help="directory put first on the Python path, to import your code from (default: .)",
    )


def add_metrics_options(parser: argparse.ArgumentParser, port_help: str) -> None:
    """``--metrics-port`` and ``--metrics-addr``, the same for every long-running command.

    The address defaults to loopback; a Prometheus server on another host (or
    pod) needs ``--metrics-addr 0.0.0.0`` or the address of an interface.
    """
    parser.add_argument("--metrics-port", type=int, help=port_help)
    parser.add_argument(
        "--metrics-addr",
        default="127.0.0.1",
        help="address the metrics endpoint listens on (default 127.0.0.1)",
    )


def add_connect_timeout(parser: argparse.ArgumentParser) -> None:
    """``--connect-timeout``: how long a long-running command waits for its servers at start."""
    parser.add_argument(
        "--connect-timeout",
        type=float,
        help="seconds to wait for an unreachable Postgres or broker at start-up "
        "(default: for ever, logging each retry)",
    )


def missing_extra(extra: str, command: str, error: ModuleNotFoundError) -> ConfigurationError:
    """The error for ``command`` run without the optional ``extra`` it imports.

    Optional extras are imported only by the commands that use them, so that
    ``pip install esbridge`` gives a working core; this says what to install.
    """
    return ConfigurationError(
        f"{command} needs the optional {extra!r} extra ({error}): pip install 'esbridge[{extra}]'"
    )


def use_app_dir(app_dir: str) -> None:
    """Put ``app_dir`` (made absolute) first on the Python path, once."""
    app_dir = os.path.abspath(app_dir)
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)


def load_application(path: str, app_dir: str = ".") -> Any:
    """``package.module:Class`` -> the application class; an aggregate, a System or
    anything else that is no ``Application`` subclass is a :class:`ConfigurationError`
    saying so (:func:`esbridge.system.loading.application_class`)."""
    return application_class(load_class(path, app_dir), path)


def application_name(spec: str, app_dir: str = ".") -> str:
    """The application name of ``module:Class`` / ``module.Class``, or ``spec`` itself.

    Every command that takes an application by name takes its class too, the
    same way (``esbridge relay``, ``esbridge replay``). ``app_dir`` is put on
    the Python path first.
    """
    if ":" not in spec and "." not in spec:
        return spec
    module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    try:
        cls = load_class(f"{module_name}:{attr}", app_dir)
    except ConfigurationError as e:
        cause = e.__cause__
        raise ConfigurationError(
            f"cannot import application {spec!r}: {type(cause).__name__}: {cause}. "
            "Give module:Class (importable from --app-dir, default the current directory) "
            "or the application's name"
        ) from cause
    name: str = application_class(cls, spec).name
    return name


def load_class(path: str, app_dir: str = ".") -> Any:
    """``package.module:Class`` -> the class (``app_dir`` is put on the Python path)."""
    from eventsourcing.utils import resolve_topic

    use_app_dir(app_dir)
    try:
        return resolve_topic(path)
    except Exception as e:
        raise ConfigurationError(
            f"cannot import {path!r} ({type(e).__name__}: {e}): write it as "
            "package.module:Class and check --app-dir"
        ) from e
