"""``esbridge acls pkg.mod:system``: the Kafka ACLs each application's process needs.

Prints, for every application of the system as ``esbridge run`` runs it (its
relay and its consumers in one process, one principal), the
``kafka-acls.sh`` commands that grant exactly what it does: WRITE on its
topic, READ and WRITE on its position topic, WRITE on its transactional id
(the relay id), DESCRIBE on the ``esbridge-position-`` groups; READ on each
upstream topic and its consumer group. The names follow the same rules as the
processes (``--topic-prefix``, ``--mode``). ``--principal`` says how an
application's principal is named (``{app}``: its name in lower case).
Topics are created by an admin (``esbridge run --setup``); grant ``CREATE``
too to let the processes create them. See docs/security.md.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from esbridge.cli.common import add_app_dir, add_command
from esbridge.errors import ConfigurationError


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "acls", "print the Kafka ACLs each application of a system needs", __doc__
    )
    parser.add_argument("system", help="the System, as package.module:attribute")
    add_app_dir(parser)
    parser.add_argument(
        "--topic-prefix", default="esbridge.", help="prefix of topic and group names"
    )
    parser.add_argument(
        "--mode",
        action="append",
        default=[],
        metavar="[LEADER=]payloads|prompts",
        help="relay mode, for every leader or for one (repeatable; default payloads)",
    )
    parser.add_argument(
        "--principal",
        default="User:{app}",
        help="each application's principal; {app} is its name in lower case (default User:{app})",
    )
    parser.add_argument(
        "--bootstrap-server",
        default="$KAFKA_BOOTSTRAP_SERVERS",
        help="the address written into the commands",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object a grant")
    parser.set_defaults(func=acls_command)


def acls_command(args: argparse.Namespace) -> int:
    from esbridge.cli.run import load_from_args, relay_modes
    from esbridge.kafka.acls import system_acls
    from esbridge.names import SystemTopics
    from esbridge.system.runner import resolve_relay_modes

    if "{app}" not in args.principal:
        raise ConfigurationError(
            f"--principal {args.principal!r} names no application: give a pattern with "
            "{app}, e.g. User:{app} or User:svc-{app}"
        )
    system = load_from_args(args)
    modes = resolve_relay_modes(system, relay_modes(args.mode))
    grants = system_acls(
        system,
        SystemTopics(args.topic_prefix),
        modes,
        lambda app: args.principal.replace("{app}", app.lower()),
    )
    for app, app_grants in grants.items():
        if args.json:
            for grant in app_grants:
                print(json.dumps({"application": app, **asdict(grant)}))
            continue
        print(f"# {app} ({app_grants[0].principal}): its relay and consumers")
        for grant in app_grants:
            note = " (optional)" if grant.optional else ""
            print(f"# {grant.why}{note}")
            print(grant.command(args.bootstrap_server))
        print()
    return 0
