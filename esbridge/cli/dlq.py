"""``esbridge dlq list|retry FOLLOWER``: inspect parked messages and retry them.

Parked messages live in the follower's database (table ``esbridge_dead_letters``),
so these commands need the follower's ``POSTGRES_*`` settings, like the
follower itself. ``retry`` runs parked rows through the follower again, per
key in parking order, each in its own transaction; a row that fails again
stays parked (with its attempt count and latest error) and so do the rows
behind it. Exit status of ``retry``: 0 when every row selected was applied,
1 otherwise. ``dlq replay`` is its former name, kept for one release (it
prints a notice): ``esbridge replay`` is something else, the backfill of a
notification-id range to a topic.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from esbridge.cli.common import add_app_dir, add_command, load_application

#: Former name of ``dlq retry``, kept for one release.
DEPRECATED_RETRY = "replay"


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "dlq", "list or retry parked (dead-letter) messages of a follower", __doc__
    )
    commands = parser.add_subparsers(dest="dlq_command", required=True)
    for name, helptext in (
        ("list", "list parked messages"),
        ("retry", "run them through the follower again (formerly 'replay')"),
    ):
        aliases = [DEPRECATED_RETRY] if name == "retry" else []
        sub = commands.add_parser(name, aliases=aliases, help=helptext)
        sub.add_argument("follower", help="the follower class, as package.module:Class")
        add_app_dir(sub)
        sub.add_argument("--id", dest="ids", type=int, action="append", help="only these rows")
        if name == "list":
            sub.add_argument(
                "--all", action="store_true", help="also rows done (status 'replayed')"
            )
            sub.add_argument("--json", action="store_true", help="one JSON object per row")
            sub.set_defaults(func=list_letters)
        else:
            sub.add_argument(
                "--upstream-class",
                action="append",
                default=[],
                help="upstream application class (package.module:Class), for its cipher env",
            )
            sub.set_defaults(func=retry)


def _follower(args: argparse.Namespace) -> Any:
    from esbridge.system.applications import construct_or_close

    return construct_or_close(load_application(args.follower, args.app_dir), os.environ)


def list_letters(args: argparse.Namespace) -> int:
    from esbridge.deadletters.store import STATUS_PARKED, DeadLetterStore

    follower = _follower(args)
    try:
        store = DeadLetterStore(follower.recorder.datastore)
        store.create_table()
        rows = store.list(follower.name, status=None if args.all else STATUS_PARKED, ids=args.ids)
        for row in rows:
            summary = row.summary()
            if args.json:
                print(json.dumps(summary))
            else:
                print(
                    f"{summary['id']:>6}  {summary['status']:<8} {summary['reason']:<18} "
                    f"key={summary['key']} nid={summary['nid']} "
                    f"attempts={summary['attempts']}  {summary['error']}"
                )
        if not args.json:
            print(f"{len(rows)} row(s)")
    finally:
        follower.close()
    return 0


def retry(args: argparse.Namespace) -> int:
    from esbridge.deadletters.retry import retry_dead_letters

    deprecated = args.dlq_command == DEPRECATED_RETRY
    if deprecated:
        print(
            "esbridge dlq replay is deprecated: use 'esbridge dlq retry' (same options)",
            file=sys.stderr,
        )
    follower = _follower(args)
    classes = {}
    for path in args.upstream_class:
        cls = load_application(path, args.app_dir)
        classes[cls.name] = cls
    try:
        result = retry_dead_letters(follower, ids=args.ids, upstream_classes=classes)
    finally:
        follower.close()
    # The former command's wording, unchanged for scripts that read it.
    done = "replayed" if deprecated else "retried"
    print(f"{done} {len(result.retried)} row(s): {result.retried}")
    for letter_id, error in result.failed.items():
        print(f"row {letter_id} failed again: {error}")
    if result.skipped:
        print(f"left parked behind a failing row: {result.skipped}")
    return 0 if not result.failed and not result.skipped else 1
