"""passes.calibration's message helpers: a user's value or an exception quoted on one short line."""
from passes.calibration import excerpt, first_line


def test_first_line_of_an_exception():
    assert first_line(ValueError("\n  bad header\nTraceback:\n  more")) == "bad header"
    assert first_line(KeyError()) == "KeyError"  # no message: its type
    assert first_line(RuntimeError("x" * 500), 120) == "x" * 120
    assert first_line(RuntimeError("x" * 500)) == "x" * 160


def test_excerpt_bounds_what_it_quotes():
    assert excerpt("abc") == "'abc'"
    long = excerpt("y" * 10_000)
    assert long.endswith("(10,000 characters)") and len(long) < 100
