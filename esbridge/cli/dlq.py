"""``esbridge dlq list|show|retry|discard FOLLOWER``: inspect, retry or discard parked messages.

Parked messages live in the follower's database (table ``esbridge_dead_letters``),
so these commands need the follower's ``POSTGRES_*`` settings, like the
follower itself.

``list`` prints the parked rows (``--all``: every status). ``show ID`` prints
one row whole: reason, error and traceback, attempts, headers, Kafka
coordinates and the payload decoded (exit 1 when there is no such row).

``retry`` runs parked rows through the follower again, per key in parking
order, each in its own transaction; a row that fails again stays parked (with
its attempt count and latest error) and so do the rows behind it. ``--id``,
``--key`` and ``--since`` (a row id, or an ISO time, UTC unless it says
otherwise) choose rows; a chosen row behind an earlier parked row of its key
that was not chosen stays parked. Exit status of ``retry``: 0 when every row
chosen was applied, 1 otherwise. ``dlq replay`` is its former name, kept for
one release (it prints a notice): ``esbridge replay`` is something else, the
backfill of a notification-id range to a topic.

``discard ID [ID ...]`` (or ``--key K``) gives rows up: they are marked
``discarded`` with who (``--by``, default the user name), when and why
(``--reason``, required), kept for audit, and never retried or counted again.
Nothing is deleted. Exit 1 (nothing discarded) when a row is not a parked or
skipped row of the follower.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

from esbridge.cli.common import add_app_dir, add_command, load_application
from esbridge.errors import ConfigurationError

#: Former name of ``dlq retry``, kept for one release.
DEPRECATED_RETRY = "replay"


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "dlq",
        "list, show, retry or discard parked (dead-letter) messages of a follower",
        __doc__,
    )
    commands = parser.add_subparsers(dest="dlq_command", required=True)
    listing = _subcommand(commands, "list", "list parked messages")
    listing.add_argument("--id", dest="ids", type=int, action="append", help="only these rows")
    _add_filters(listing)
    listing.add_argument(
        "--all", action="store_true", help="every status (also replayed, skipped, discarded)"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per row")
    listing.set_defaults(func=list_letters)

    show = _subcommand(commands, "show", "show one row whole, its payload decoded")
    show.add_argument("id", type=int, help="the row's id (as 'dlq list' prints it)")
    show.add_argument("--json", action="store_true", help="one JSON object")
    _add_upstream_class(show)
    show.set_defaults(func=show_letter)

    retrying = _subcommand(
        commands,
        "retry",
        "run them through the follower again (formerly 'replay')",
        aliases=[DEPRECATED_RETRY],
    )
    retrying.add_argument("--id", dest="ids", type=int, action="append", help="only these rows")
    _add_filters(retrying)
    _add_upstream_class(retrying)
    retrying.set_defaults(func=retry)

    discard = _subcommand(commands, "discard", "give rows up, recorded (never deleted)")
    discard.add_argument("ids", type=int, nargs="*", metavar="ID", help="the rows' ids")
    discard.add_argument("--key", help="every parked or skipped row of this key")
    discard.add_argument(
        "--reason", required=True, help="why they are given up (kept with the rows)"
    )
    discard.add_argument("--by", help="who gives them up (default: the user name)")
    discard.set_defaults(func=discard_letters)


def _subcommand(
    commands: Any, name: str, helptext: str, aliases: list[str] | None = None
) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = commands.add_parser(name, aliases=aliases or [], help=helptext)
    sub.add_argument("follower", help="the follower class, as package.module:Class")
    add_app_dir(sub)
    return sub


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key", dest="keys", action="append", help="only rows of this key (repeatable)"
    )
    parser.add_argument(
        "--since",
        type=since_value,
        help="only rows from this id on, or parked at or after this ISO time (UTC unless "
        "it says otherwise)",
    )


def _add_upstream_class(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--upstream-class",
        action="append",
        default=[],
        help="upstream application class (package.module:Class), for its cipher env",
    )


def since_value(text: str) -> int | datetime:
    """``--since``: a row id, or an ISO 8601 time (naive times are UTC)."""
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a row id nor an ISO time such as 2026-01-31T12:00:00+00:00"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _follower(args: argparse.Namespace) -> Any:
    from esbridge.system.applications import construct_or_close

    return construct_or_close(load_application(args.follower, args.app_dir), os.environ)


def _store(follower: Any) -> Any:
    from esbridge.deadletters.store import DeadLetterStore

    store = DeadLetterStore(follower.recorder.datastore)
    store.create_table()
    return store


def _upstream_classes(args: argparse.Namespace) -> dict[str, type]:
    classes = {}
    for path in args.upstream_class:
        cls = load_application(path, args.app_dir)
        classes[cls.name] = cls
    return classes


def list_letters(args: argparse.Namespace) -> int:
    from esbridge.deadletters.store import STATUS_PARKED

    follower = _follower(args)
    try:
        rows = _store(follower).list(
            follower.name,
            status=None if args.all else STATUS_PARKED,
            ids=args.ids,
            keys=args.keys,
            since=args.since,
        )
        for row in rows:
            summary = row.summary()
            if args.json:
                print(json.dumps(summary))
            else:
                print(
                    f"{summary['id']:>6}  {summary['status']:<9} {summary['reason']:<18} "
                    f"key={summary['key']} nid={summary['nid']} "
                    f"attempts={summary['attempts']}  {summary['error']}"
                )
        if not args.json:
            print(f"{len(rows)} row(s)")
    finally:
        follower.close()
    return 0


def show_letter(args: argparse.Namespace) -> int:
    from esbridge.deadletters.inspection import letter_details
    from esbridge.processing.steps import UpstreamDecoder

    follower = _follower(args)
    try:
        rows = _store(follower).list(follower.name, status=None, ids=[args.id])
        if not rows:
            print(
                f"esbridge dlq show: {follower.name} has no dead letter {args.id} "
                "('esbridge dlq list --all' lists them)",
                file=sys.stderr,
            )
            return 1
        [letter] = rows
        cls = _upstream_classes(args).get(letter.upstream)
        decoder = UpstreamDecoder.for_follower(follower, letter.upstream, cls)
        details = letter_details(letter, decoder)
    finally:
        follower.close()
    if args.json:
        print(json.dumps(details, indent=2))
    else:
        print(_readable(details))
    return 0


def _readable(details: dict[str, Any]) -> str:
    """``dlq show``'s text: one field a line, the long ones (traceback, payload) last."""
    long = ("error", "traceback", "headers", "payload")
    lines = [f"{name}: {value}" for name, value in details.items() if name not in long]
    lines.append("headers:")
    lines += [f"  {name}: {value}" for name, value in details["headers"].items()]
    lines.append(f"error: {details['error']}")
    if details["traceback"]:
        lines += ["traceback:", details["traceback"].rstrip()]
    lines += ["payload:", json.dumps(details["payload"], indent=2)]
    return "\n".join(lines)


def retry(args: argparse.Namespace) -> int:
    from esbridge.deadletters.retry import retry_dead_letters

    deprecated = args.dlq_command == DEPRECATED_RETRY
    if deprecated:
        print(
            "esbridge dlq replay is deprecated: use 'esbridge dlq retry' (same options)",
            file=sys.stderr,
        )
    follower = _follower(args)
    classes = _upstream_classes(args)
    try:
        result = retry_dead_letters(
            follower, ids=args.ids, upstream_classes=classes, keys=args.keys, since=args.since
        )
    finally:
        follower.close()
    # The former command's wording, unchanged for scripts that read it.
    done = "replayed" if deprecated else "retried"
    print(f"{done} {len(result.retried)} row(s): {result.retried}")
    for letter_id, error in result.failed.items():
        print(f"row {letter_id} failed again: {error}")
    if result.skipped:
        print(f"left parked behind an earlier parked row of their key: {result.skipped}")
    return 0 if not result.failed and not result.skipped else 1


def discard_letters(args: argparse.Namespace) -> int:
    from esbridge.deadletters.store import STATUS_PARKED, STATUS_SKIPPED

    if not args.ids and not args.key:
        raise ConfigurationError("name the rows to discard: their ids, or --key KEY")
    if not args.reason.strip():
        raise ConfigurationError("--reason must say why the rows are given up (it is kept)")
    by = args.by or getpass.getuser()
    follower = _follower(args)
    try:
        store = _store(follower)
        ids = list(args.ids)
        if args.key:
            for status in (STATUS_PARKED, STATUS_SKIPPED):
                ids += [r.id for r in store.list(follower.name, status=status, keys=[args.key])]
        if not ids:
            print(
                f"esbridge dlq discard: {follower.name} has no parked or skipped row of key "
                f"{args.key}",
                file=sys.stderr,
            )
            return 1
        try:
            done = store.discard(follower.name, ids, by=by, reason=args.reason)
        except LookupError as e:
            print(
                f"esbridge dlq discard: nothing discarded: {e.args[0]} are not parked or "
                f"skipped rows of {follower.name} ('esbridge dlq list --all' shows them)",
                file=sys.stderr,
            )
            return 1
    finally:
        follower.close()
    print(f"discarded {len(done)} row(s) by {by}: {[r.id for r in done]}")
    return 0
