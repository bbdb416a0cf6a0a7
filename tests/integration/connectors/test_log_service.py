"""The notification log service and its client over real HTTP (uvicorn on 127.0.0.1).

The served log is a DogSchool's on the test's real Postgres database. Pages,
topic filters and the max id read through the service equal the recorder's;
every refusal (token missing, unknown, for another application; malformed
parameters) is a clear 4xx that shows no notification, and the server serves
afterwards; tokens appear in no log line; large pages are gzipped; the client
says what is wrong when the service is down or refuses, and works over TLS.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from esbridge.errors import (
    ConfigurationError,
    RemoteLogError,
    RemoteLogRefusedError,
    RemoteLogUnreachableError,
)
from esbridge.eventlog.remote import LIMIT_HEADER
from esbridge.testing.servers import free_port
from esbridge_connectors.log_service import TokenTable
from esbridge_connectors.serving import BackgroundServer
from examples.dogschool.application import DogSchool
from tests.support.consumer_apps import populate
from tests.support.remote_log import (
    ADMIN_TOKEN,
    OTHER_TOKEN,
    SCHOOL_TOKEN,
    log_service,
    remote,
    self_signed_certificate,
    serving,
)

TRICK_TOPIC = "examples.dogschool.domainmodel:Dog.TrickAdded"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def same(left: Any, right: Any) -> None:
    """Two lists of notifications hold the same notifications (ids, events, states)."""
    assert [
        (n.id, str(n.originator_id), n.originator_version, n.topic, bytes(n.state)) for n in left
    ] == [
        (n.id, str(n.originator_id), n.originator_version, n.topic, bytes(n.state)) for n in right
    ]


def test_pages_topics_and_max_id_equal_the_recorder(school: DogSchool) -> None:
    populate(school, 30, 3)
    recorder = school.recorder
    with serving(recorder, max_limit=50) as server:
        log = remote(server.url)
        top = recorder.max_notification_id()
        assert log.max_notification_id() == top == 120
        everything = recorder.select_notifications(start=1, limit=1000)
        # More than the server's cap of 50 a page: the client reads on, no false end.
        same(log.select_notifications(start=None, limit=1000), everything)
        same(log.select_notifications(start=7, limit=75), everything[6:81])
        same(
            log.select_notifications(start=7, limit=75, inclusive_of_start=False),
            everything[7:82],
        )
        same(log.select_notifications(start=10, limit=1000, stop=20), everything[9:20])
        same(
            log.select_notifications(start=1, limit=1000, topics=[TRICK_TOPIC]),
            recorder.select_notifications(start=1, limit=1000, topics=[TRICK_TOPIC]),
        )
        assert log.select_notifications(start=121, limit=10) == []
        # A huge limit is capped, not refused: the header says what was allowed.
        answer = httpx.get(
            f"{server.url}/v1/DogSchool/notifications",
            params={"start": "1", "limit": "1000000"},
            headers=bearer(SCHOOL_TOKEN),
        )
        assert answer.status_code == 200 and answer.headers[LIMIT_HEADER] == "50"
        assert [item["id"] for item in answer.json()] == list(range(1, 51))
        assert set(answer.json()[0]) == {
            "id", "originator_id", "originator_version", "topic", "state"
        }  # fmt: skip
        log.close()


def test_an_empty_log_has_no_max_id(school: DogSchool) -> None:
    with serving(school.recorder) as server:
        assert remote(server.url).max_notification_id() is None
        assert remote(server.url).select_notifications(start=1, limit=10) == []


@pytest.mark.parametrize(
    ("headers", "path", "status", "error"),
    [
        ({}, "/v1/DogSchool/notifications", 401, "missing_token"),
        ({"Authorization": f"Basic {SCHOOL_TOKEN}"}, "/v1/DogSchool/max-id", 401, "missing_token"),
        (bearer("not-a-token-of-this-service"), "/v1/DogSchool/max-id", 401, "invalid_token"),
        (bearer(SCHOOL_TOKEN + "x"), "/v1/DogSchool/notifications", 401, "invalid_token"),
        (bearer(OTHER_TOKEN), "/v1/DogSchool/notifications", 403, "forbidden"),
        (bearer(OTHER_TOKEN), "/v1/Secret/notifications", 403, "forbidden"),
        (bearer(ADMIN_TOKEN), "/v1/Secret/notifications", 404, "unknown_application"),
        (bearer(SCHOOL_TOKEN), "/v1/DogSchool/notifications?start=abc", 400, "bad_parameter"),
        (bearer(SCHOOL_TOKEN), "/v1/DogSchool/notifications?limit=0", 400, "bad_parameter"),
        (bearer(SCHOOL_TOKEN), "/v1/DogSchool/notifications?limit=-5", 400, "bad_parameter"),
        (bearer(SCHOOL_TOKEN), "/v1/DogSchool/notifications?start=1e3", 400, "bad_parameter"),
        (
            bearer(SCHOOL_TOKEN),
            "/v1/DogSchool/notifications?start=99999999999999999999",
            400,
            "bad_parameter",
        ),
        (bearer(SCHOOL_TOKEN), "/v1/DogSchool/notifications?stop=x", 400, "bad_parameter"),
        (bearer(SCHOOL_TOKEN), "/v1/DogSchool/notifications?from=1", 400, "unknown_parameter"),
        (
            bearer(SCHOOL_TOKEN),
            "/v1/DogSchool/notifications?start=1&start=2",
            400,
            "repeated_parameter",
        ),
        (bearer(SCHOOL_TOKEN), "/v1/DogSchool/max-id?start=1", 400, "unknown_parameter"),
    ],
)
def test_refusals_are_clear_and_leak_nothing(
    school: DogSchool, headers: dict[str, str], path: str, status: int, error: str
) -> None:
    populate(school, 3, 1)
    with serving(school.recorder) as server:
        answer = httpx.get(server.url + path, headers=headers)
        assert answer.status_code == status
        body = answer.json()
        assert body["error"] == error and body["detail"]
        assert set(body) == {"error", "detail"}  # no notification, no max id
        assert "Dog.Registered" not in answer.text
        if status == 401:
            assert answer.headers["WWW-Authenticate"].startswith('Bearer realm="esbridge-log"')
        # The server still serves.
        good = httpx.get(f"{server.url}/v1/DogSchool/max-id", headers=bearer(SCHOOL_TOKEN))
        assert good.json() == {"max_id": 6}


def test_the_client_names_the_refusal_and_what_to_do(school: DogSchool) -> None:
    with serving(school.recorder) as server:
        with pytest.raises(
            RemoteLogRefusedError, match=r"HTTP 401 missing_token.*UPSTREAM_LOG_TOKEN"
        ) as e:
            remote(server.url, token=None).max_notification_id()
        assert e.value.status == 401
        with pytest.raises(RemoteLogRefusedError, match=r"HTTP 401 invalid_token.*rotated out"):
            remote(server.url, token="wrong-token-0123456789").max_notification_id()
        with pytest.raises(RemoteLogRefusedError, match=r"HTTP 403 forbidden.*'DogSchool'") as e:
            remote(server.url, token=OTHER_TOKEN).select_notifications(start=1, limit=5)
        assert e.value.status == 403 and e.value.reason is not None
        assert isinstance(e.value, ConfigurationError)  # retrying cannot help


def test_tokens_are_never_logged(
    school: DogSchool, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    populate(school, 3, 1)
    caplog.set_level(logging.DEBUG)
    # log_config=None: uvicorn's loggers (its access log too) propagate to caplog.
    with serving(school.recorder, log_level="debug", access_log=True, log_config=None) as server:
        for token in (SCHOOL_TOKEN, OTHER_TOKEN, "a-wrong-token-0123456789"):
            httpx.get(f"{server.url}/v1/DogSchool/notifications?start=1", headers=bearer(token))
        remote(server.url).select_notifications(start=1, limit=10)
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert "/v1/DogSchool/notifications?start=1" in logged  # the access log was captured
    assert "unknown token" in logged and "test:2" in logged  # refusals are logged, by label
    for token in (SCHOOL_TOKEN, OTHER_TOKEN, "a-wrong-token-0123456789"):
        assert token not in logged
    assert SCHOOL_TOKEN not in repr(remote("http://127.0.0.1:1"))


def test_large_pages_are_gzipped_for_clients_that_accept_it(school: DogSchool) -> None:
    populate(school, 50, 2)
    with serving(school.recorder) as server:
        url = f"{server.url}/v1/DogSchool/notifications?start=1&limit=100"
        zipped = httpx.get(url, headers={**bearer(SCHOOL_TOKEN), "Accept-Encoding": "gzip"})
        plain = httpx.get(url, headers={**bearer(SCHOOL_TOKEN), "Accept-Encoding": "identity"})
        assert zipped.headers["Content-Encoding"] == "gzip"
        assert "Content-Encoding" not in plain.headers
        assert zipped.json() == plain.json() and len(plain.json()) == 100
        small = httpx.get(
            f"{server.url}/v1/DogSchool/max-id",
            headers={**bearer(SCHOOL_TOKEN), "Accept-Encoding": "gzip"},
        )
        assert "Content-Encoding" not in small.headers  # not worth it
        same(
            remote(server.url).select_notifications(start=1, limit=100),
            school.recorder.select_notifications(start=1, limit=100),
        )


def test_the_client_says_when_the_service_is_down_and_resumes_when_it_returns(
    school: DogSchool,
) -> None:
    populate(school, 2, 1)
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        RemoteLogUnreachableError, match=r"did not answer \(Connection.*3 attempts"
    ) as e:
        remote(closed, retries=2).max_notification_id()
    assert e.value.url == f"{closed}/v1/DogSchool/max-id" and e.value.waited is not None
    service = BackgroundServer(log_service(school.recorder))
    service.start()
    log = remote(service.url, retries=2)
    try:
        assert log.max_notification_id() == 4
        service.stop()
        with pytest.raises(RemoteLogUnreachableError):
            log.max_notification_id()
        service.start()  # the same port again
        assert log.max_notification_id() == 4
    finally:
        service.stop()


def test_a_url_that_is_no_log_service_is_named() -> None:
    with pytest.raises(ConfigurationError, match="not an http:// or https:// address"):
        remote("ftp://example.org")


def test_tls(school: DogSchool, tmp_path: Path) -> None:
    populate(school, 2, 1)
    certfile, keyfile = self_signed_certificate(tmp_path)
    with serving(school.recorder, ssl_certfile=certfile, ssl_keyfile=keyfile) as server:
        url = server.url.replace("http://", "https://")
        assert remote(url, cafile=certfile).max_notification_id() == 4
        with pytest.raises(RemoteLogError, match=r"could not be verified.*UPSTREAM_LOG_CA_FILE"):
            remote(url).max_notification_id()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("short DogSchool\n", "shorter than 16 characters"),
        ("a-long-enough-token-1234\n", r"tokens:1: expected 'TOKEN APPLICATIONS'"),
        ("# only a comment\n", "needs at least one token"),
    ],
)
def test_a_bad_token_file_is_refused_at_start(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        TokenTable.parse(text)


def test_token_file_lines() -> None:
    table = TokenTable.parse(
        "# rotation: both valid until clients move\n"
        "old-token-0123456789abcdef DogSchool,Payments\n"
        "new-token-0123456789abcdef DogSchool  # since June\n"
        "ops-token-0123456789abcdef *\n"
    )
    old, new, ops = (table.find(f"{n}-token-0123456789abcdef") for n in ("old", "new", "ops"))
    assert old is not None and old.allows("Payments") and old.allows("DogSchool")
    assert new is not None and new.allows("DogSchool") and not new.allows("Payments")
    assert ops is not None and ops.allows("Anything")
    assert table.find("old-token-0123456789abcde") is None
    assert "token-0123" not in repr(old)
