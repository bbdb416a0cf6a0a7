"""Unit tests of the pure modules, one directory per esbridge package.

The ``__init__.py`` files make each test module's import name unique
(``unit.<package>.test_<module>``) under pytest's default import mode, so
test files in different directories may share a basename.
"""
