"""SQL projection throughput: batched transactions against one transaction per event.

    python bench/sql_projection.py [--events 6000] [--runs 3]

Starts its own PostgreSQL (esbridge.testing; or an external server named by
ESBRIDGE_POSTGRES_DSN), records ``--events`` dog-school events (1 dog : 5
tricks), then projects them into PostgreSQL tables, in the same run:

* esbridge's ``ProjectionRunner`` (500 notifications per transaction, rows and
  tracking row committed together);
* the baseline: the same handlers and tracking with one transaction per event,
  which is what the seed's reliable projection (``save_orm_obj`` with the
  tracking record of each "process event") does.

Prints events/s of each (median of ``--runs``) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esbridge.testing import make_postgres
from esbridge_connectors.sql_projection import ProjectionRunner
from esbridge_connectors.upstream import application_mapper
from tests.support.sql_projection_domain import DogProjection, DogSchool


def project(server: Any, env: dict[str, str], page_size: int, limit: int | None) -> float:
    """Events/s of one projection run into a fresh database (``limit``: stop after N)."""
    target = server.create_database()
    engine = create_engine(target.url)
    runner = ProjectionRunner(
        DogProjection(),
        engine,
        upstream="DogSchool",
        mapper=application_mapper(DogSchool, env),
        env=env,
        page_size=page_size,
    )
    runner.setup()
    started = time.perf_counter()
    stats = runner.run_once(stop=limit)
    seconds = time.perf_counter() - started
    engine.dispose()
    server.drop_database(target.dbname)
    return stats.applied / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline-events", type=int, default=1500)
    args = parser.parse_args()
    server = make_postgres()
    try:
        db = server.create_database()
        school = DogSchool(env=db.env)
        for i in range(args.events // 6):
            school.register(f"dog-{i}", tricks=5)
        total = school.recorder.max_notification_id()
        print(f"upstream log: {total} events")
        batched, single = [], []
        for run in range(args.runs):
            batched.append(project(server, db.env, 500, None))
            single.append(project(server, db.env, 1, args.baseline_events))
            print(f"run {run + 1}: batched {batched[-1]:,.0f}/s, per-event {single[-1]:,.0f}/s")
        b, s = statistics.median(batched), statistics.median(single)
        print(f"ProjectionRunner (500 per transaction): {b:,.0f} events/s (median)")
        print(f"baseline, one transaction per event:   {s:,.0f} events/s (median)")
        print(f"ratio: {b / s:.1f}x")
    finally:
        server.close()


if __name__ == "__main__":
    main()
