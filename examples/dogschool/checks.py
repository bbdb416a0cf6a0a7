"""The tutorial's ``test()`` function: the seed's assertions against any started runner.

``settle`` replaces the tutorial's ``sleep(wait)``: the library's single-threaded
runner needs nothing, esbridge's runner waits until every follower has caught up.
"""

from __future__ import annotations

from collections.abc import Callable

from eventsourcing.system import Runner

from examples.dogschool.application import Counters, DogSchool


def check_dogschool(runner: Runner, settle: Callable[[], None] = lambda: None) -> None:
    school = runner.get(DogSchool)
    counters = runner.get(Counters)

    dog_id1 = school.register_dog("Billy")
    dog_id2 = school.register_dog("Milly")
    dog_id3 = school.register_dog("Scrappy")

    school.add_trick(dog_id1, "roll over")
    school.add_trick(dog_id2, "roll over")
    school.add_trick(dog_id3, "roll over")

    settle()

    assert counters.get_count("roll over") == 3
    assert counters.get_count("fetch ball") == 0
    assert counters.get_count("play dead") == 0

    school.add_trick(dog_id1, "fetch ball")
    school.add_trick(dog_id2, "fetch ball")

    settle()

    assert counters.get_count("roll over") == 3
    assert counters.get_count("fetch ball") == 2
    assert counters.get_count("play dead") == 0

    school.add_trick(dog_id1, "play dead")

    settle()

    assert counters.get_count("roll over") == 3
    assert counters.get_count("fetch ball") == 2
    assert counters.get_count("play dead") == 1
    assert school.get_dog(dog_id1) == {
        "name": "Billy",
        "tricks": ("roll over", "fetch ball", "play dead"),
    }
