"""Tutorial part 4: the dog school and the trick counters (``[[DogSchool, Counters]]``)."""
