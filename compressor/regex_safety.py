"""Module patterns (`re:` in recipes) that Python's re could take hours on: found before any model loads.

Python's re backtracks: a pattern that can match the same text in exponentially many ways, such as (a+)+$,
(a|a)+$ or (a?){30}a{30}, takes hours on one module name of 30 characters, inside the run. Such patterns are
refused with the recipe by walking re's own parse tree with first/follow character sets: a repeat is ambiguous
when what its body can start with can also come right after it.
"""
import re
import string

try:  # the parser behind re.compile (Python 3.11+)
    from re import _constants as _sre, _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre
    import sre_parse as _sre_parse

MAX_PATTERN_CHARS = 256  # a re: module pattern ("re:" not counted); longer ones are better several patterns
# repeats that compete for the same characters, one after another (.*.*.*x): n^k steps on a failing module name of
# n characters; at n = 256, 3 take 0.3 s in the worst case, 4 take 17 s
MAX_COMPETING_REPEATS = 3

_REPEATS = tuple(getattr(_sre, name) for name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
                 if hasattr(_sre, name))
_END = None  # in follow sets: the end of the match
_CATEGORIES = {getattr(_sre, f"CATEGORY_{name}"): escape for name, escape in (
    ("DIGIT", r"\d"), ("NOT_DIGIT", r"\D"), ("SPACE", r"\s"), ("NOT_SPACE", r"\S"), ("WORD", r"\w"),
    ("NOT_WORD", r"\W"), ("LINEBREAK", "\n"), ("NOT_LINEBREAK", "[^\n]"))}


class _Backtracking(Exception):
    pass


class _Regex:
    """First/follow analysis of one parsed pattern over a small alphabet: printable ASCII plus every literal of the
    pattern (case-folded: under (?i) a and A are the same character)."""

    def __init__(self, parsed):
        self.alphabet = {c.lower() for c in string.printable} | self._literals(parsed)
        self.competing = 0

    def _literals(self, items) -> set:
        found = set()
        for op, av in items:
            if op in (_sre.LITERAL, _sre.NOT_LITERAL):
                found.add(chr(av).lower())
            elif op is _sre.IN:
                for kind, value in av:
                    if kind is _sre.LITERAL:
                        found.add(chr(value).lower())
                    elif kind is _sre.RANGE:
                        found |= {chr(value[0]).lower(), chr(value[1]).lower()}
            for sub in self._children(op, av):
                found |= self._literals(sub)
        return found

    @staticmethod
    def _children(op, av) -> list:
        if op in _REPEATS:
            return [av[2]]
        if op is _sre.SUBPATTERN:
            return [av[-1]]
        if op is _sre.BRANCH:
            return list(av[1])
        if op in (_sre.ASSERT, _sre.ASSERT_NOT):
            return [av[1]]
        if op is getattr(_sre, "ATOMIC_GROUP", object()):
            return [av]
        if op is _sre.GROUPREF_EXISTS:
            return [sub for sub in av[1:] if sub is not None]
        return []

    def _in(self, items) -> set:
        negate = bool(items) and items[0][0] is _sre.NEGATE
        chosen = set()
        for c in self.alphabet:
            for kind, value in items:
                if (kind is _sre.LITERAL and c == chr(value).lower()) or (
                        kind is _sre.RANGE and (chr(value[0]) <= c <= chr(value[1])
                                                or chr(value[0]) <= c.upper() <= chr(value[1]))) or (
                        kind is _sre.CATEGORY and re.fullmatch(_CATEGORIES.get(value, "."), c)):
                    chosen.add(c)
                    break
        return self.alphabet - chosen if negate else chosen

    def first(self, op, av) -> tuple[set, bool]:
        """(characters one item can start with, whether it can match the empty string)."""
        if op is _sre.LITERAL:
            return {chr(av).lower()}, False
        if op is _sre.NOT_LITERAL:
            return self.alphabet - {chr(av).lower()}, False
        if op is _sre.ANY:
            return set(self.alphabet), False
        if op is _sre.IN:
            return self._in(av), False
        if op in (_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT):
            return set(), True
        if op in _REPEATS:
            chars, empty = self.first_of(av[2])
            return chars, empty or av[0] == 0
        if op is _sre.BRANCH or op is _sre.GROUPREF_EXISTS or op is _sre.SUBPATTERN or op is getattr(
                _sre, "ATOMIC_GROUP", object()):
            children = self._children(op, av)
            chars, empty = set(), op is _sre.GROUPREF_EXISTS and av[2] is None
            for child in children:
                child_chars, child_empty = self.first_of(child)
                chars |= child_chars
                empty = empty or child_empty
            if op is _sre.SUBPATTERN or op is getattr(_sre, "ATOMIC_GROUP", object()):
                empty = self.first_of(children[0])[1]
            return chars, empty
        return set(self.alphabet), True  # a backreference or anything else: could be anything, or nothing

    def first_of(self, items, follow: set | None = None) -> tuple[set, bool]:
        """What a sequence can start with; if it can match the empty string, `follow` (what comes after) too."""
        chars = set()
        for op, av in items:
            item_chars, empty = self.first(op, av)
            chars |= item_chars
            if not empty:
                return chars, False
        return chars | (follow or set()), True

    def visit(self, items, follow: set, repeated: bool) -> None:
        """Walk a sequence whose match is followed by characters `follow`; `repeated`: inside a repeat that can
        run more than once, where ambiguity compounds exponentially."""
        items = list(items)
        for i, (op, av) in enumerate(items):
            after = self.first_of(items[i + 1:], follow)[0]
            if op in _REPEATS:
                low, high, body = av
                body_first = self.first_of(body)[0]
                ambiguous = low != high and bool(body_first & after)
                if ambiguous and repeated:
                    raise _Backtracking("nests a repeat that can match the same text in many ways inside another "
                                        "repeat (like (a+)+ or (a?){30}a{30}), which can take exponential time on "
                                        "one module name; write it with a single repeat (e.g. .* or [\\w.]+)")
                self.competing += ambiguous
                if high > 1:
                    self.visit(body, body_first | after, True)
                else:
                    self.visit(body, after, repeated)
            elif op is _sre.BRANCH:
                alternatives = [self.first_of(alt, after)[0] for alt in av[1]]
                if repeated and any(a & b for i_, a in enumerate(alternatives) for b in alternatives[i_ + 1:]):
                    raise _Backtracking("repeats alternatives that can match the same text (like (a|a)+ or (a|aa)+), "
                                        "which can take exponential time on one module name; make the alternatives "
                                        "start differently or use a character class")
                for alt in av[1]:
                    self.visit(alt, after, repeated)
            elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
                self.visit(av[1], set(self.alphabet) | {_END}, repeated)
            else:
                for child in self._children(op, av):
                    self.visit(child, after, repeated)


def regex_backtracking_problem(pattern: str) -> str | None:
    """Why a (compilable) pattern could make re.search backtrack catastrophically on a module name, or None.
    Conservative: a few patterns refused here would in fact run fast; none of the usual module patterns is."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return (f"is longer than {MAX_PATTERN_CHARS} characters, which no module pattern needs (use several shorter "
                f"ones)")
    try:
        parsed = _sre_parse.parse(pattern)
        analysis = _Regex(parsed)
        analysis.visit(parsed, {_END}, False)
    except _Backtracking as exc:
        return str(exc)
    except (re.error, RecursionError, OverflowError, ValueError, MemoryError, IndexError, TypeError):
        return None  # check_patterns says what is wrong with one that does not compile
    if analysis.competing > MAX_COMPETING_REPEATS:
        return (f"has {analysis.competing} repeats that compete for the same characters (like .*.*.*.*x; at most "
                f"{MAX_COMPETING_REPEATS}), which can take minutes on one module name; use fewer, or several "
                f"patterns")
    return None
