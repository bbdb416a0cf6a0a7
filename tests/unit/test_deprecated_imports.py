"""Deep imports shown in earlier docs keep working for one release, with a warning."""

from __future__ import annotations

import importlib
import sys

import pytest

MOVED = {
    "esbridge.topics": ("esbridge.kafka.topics", "ensure_topic"),
    "esbridge.runner": ("esbridge.system.runner", "KafkaRunner"),
    "esbridge.kafka_config": ("esbridge.kafka.config", "load_kafka_config"),
    "esbridge.deadletter": ("esbridge.deadletters.store", "DeadLetterStore"),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_warns_and_re_exports(old: str) -> None:
    new, name = MOVED[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_public_names_import_without_warning(recwarn: pytest.WarningsRecorder) -> None:
    from esbridge import ConsumerAdapter, KafkaRunner, Relay  # noqa: F401
    from esbridge.consumer import ConsumerAdapter as C  # noqa: F401
    from esbridge.relay import Relay as R  # noqa: F401

    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
