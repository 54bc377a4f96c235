"""Row filters over a manifest: ``clip_score >= 28 and (label == 3 or class_name != "cat")``.

Why a language of our own: ``batchgen export --where`` takes the expression from a command line
(often from a shared script or a CI variable), so it must never reach ``eval`` or a SQL engine.
The language is deliberately tiny, parsed here by a recursive-descent parser and evaluated with
``pyarrow.compute`` over whole columns (no per-row Python):

    expr       := or_expr
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | "(" expr ")" | comparison
    comparison := COLUMN OP literal | literal OP COLUMN
    OP         := < | <= | > | >= | == | !=
    literal    := number (12, -3, 0.28, 1e-3) | 'string' | "string" | true | false

Keywords are case-insensitive; column names are identifiers (``[A-Za-z_][A-Za-z0-9_]*``). Strings
take ``\\`` escapes of their quote and of ``\\``. Numbers compare with integer and float columns,
strings with string columns, ``true``/``false`` with boolean columns (``==`` and ``!=`` only); any
other pairing is an error before anything is read.

Nulls (a failed item's ``clip_score``, a row without a label) follow SQL: a comparison with a null
is unknown, ``and``/``or`` use three-valued logic, ``not unknown`` is unknown, and a row is kept
only when the whole expression is true. So ``clip_score < 20`` and ``not clip_score >= 20`` both
leave out rows without a score.

Every error names the character position (1-based) and shows it under the expression; an unknown
column lists the closest column names.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re

from .errors import InputError

OPS = ("<=", ">=", "==", "!=", "<", ">")
MAX_NESTING = 64  # parentheses and 'not's inside each other (a deeper expression is refused, not a RecursionError)
KEYWORDS = ("and", "or", "not", "true", "false")
# Where a missing column comes from, for the unknown-column message.
COLUMN_HINTS = {"clip_score": "run the job with scoring.clip to get scores"}


class WhereError(InputError):
    """A filter expression that does not parse or does not fit the manifest; ``position`` is the
    0-based character offset of the problem."""

    def __init__(self, text: str, position: int, message: str):
        self.text, self.position, self.reason = text, position, message
        pointer = " " * position + "^"
        super().__init__(f"--where {text!r}, position {position + 1}: {message}\n  {text}\n  {pointer}")


# --- syntax ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Token:
    kind: str  # name, number, string, op, lparen, rparen, and, or, not, true, false, end
    value: object
    pos: int
    text: str


@dataclasses.dataclass(frozen=True)
class Compare:
    column: str
    op: str
    value: object  # int, float, str or bool
    column_pos: int
    value_pos: int
    op_pos: int


@dataclasses.dataclass(frozen=True)
class Not:
    arg: object


@dataclasses.dataclass(frozen=True)
class And:
    args: tuple


@dataclasses.dataclass(frozen=True)
class Or:
    args: tuple


_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?![A-Za-z0-9_.])
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|==|!=|<|>)
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<quote>["'])
""", re.VERBOSE)
_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}


def tokenize(text: str) -> list[Token]:
    out: list[Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            ch = text[pos]
            hint = " (use == for equality)" if ch == "=" else " (use 'and', 'or', 'not')" if ch in "&|!" else ""
            raise WhereError(text, pos, f"unexpected character {ch!r}{hint}")
        kind = m.lastgroup
        if kind == "space":
            pos = m.end()
            continue
        if kind == "quote":
            value, end = _read_string(text, pos)
            out.append(Token("string", value, pos, text[pos:end]))
            pos = end
            continue
        raw = m.group(kind)
        if kind == "number":
            value = int(raw) if re.fullmatch(r"[-+]?\d+", raw) else float(raw)
            out.append(Token("number", value, pos, raw))
        elif kind == "name" and raw.lower() in KEYWORDS:
            word = raw.lower()
            out.append(Token(word, {"true": True, "false": False}.get(word), pos, raw))
        else:
            out.append(Token(kind, raw, pos, raw))
        pos = m.end()
    out.append(Token("end", None, len(text), ""))
    return out


def _read_string(text: str, start: int) -> tuple[str, int]:
    quote = text[start]
    chars = []
    pos = start + 1
    while pos < len(text):
        ch = text[pos]
        if ch == "\\" and pos + 1 < len(text) and text[pos + 1] in (quote, "\\"):
            chars.append(text[pos + 1])
            pos += 2
            continue
        if ch == quote:
            return "".join(chars), pos + 1
        chars.append(ch)
        pos += 1
    raise WhereError(text, start, "string not closed")


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def fail(self, tok: Token, expected: str):
        found = "the end of the expression" if tok.kind == "end" else repr(tok.text)
        raise WhereError(self.text, tok.pos, f"expected {expected}, found {found}")

    def parse(self):
        if self.peek().kind == "end":
            raise WhereError(self.text, 0, "empty expression")
        node = self.or_expr()
        if self.peek().kind != "end":
            self.fail(self.peek(), "'and', 'or' or the end of the expression")
        return node

    def or_expr(self):
        args = [self.and_expr()]
        while self.peek().kind == "or":
            self.take()
            args.append(self.and_expr())
        return args[0] if len(args) == 1 else Or(tuple(args))

    def and_expr(self):
        args = [self.not_expr()]
        while self.peek().kind == "and":
            self.take()
            args.append(self.not_expr())
        return args[0] if len(args) == 1 else And(tuple(args))

    def not_expr(self):
        tok = self.peek()
        if tok.kind not in ("not", "lparen"):
            return self.comparison()
        if self.depth >= MAX_NESTING:
            raise WhereError(self.text, tok.pos, f"parentheses and 'not' nest more than {MAX_NESTING} deep")
        self.depth += 1
        self.take()
        if tok.kind == "not":
            node = Not(self.not_expr())
        else:
            node = self.or_expr()
            if self.peek().kind != "rparen":
                self.fail(self.peek(), f"')' to close the '(' at position {tok.pos + 1}")
            self.take()
        self.depth -= 1
        return node

    def comparison(self):
        left = self.take()
        if left.kind not in ("name", "number", "string", "true", "false"):
            self.fail(left, "a column name, a literal, 'not' or '('")
        op = self.take()
        if op.kind != "op":
            self.fail(op, "a comparison operator (<, <=, >, >=, ==, !=)")
        right = self.take()
        if right.kind not in ("name", "number", "string", "true", "false"):
            self.fail(right, "a column name or a literal (a number, a quoted string, true, false)")
        if left.kind == "name" and right.kind != "name":
            return Compare(left.value, op.value, right.value, left.pos, right.pos, op.pos)
        if right.kind == "name" and left.kind != "name":
            return Compare(right.value, _FLIP[op.value], left.value, right.pos, left.pos, op.pos)
        if left.kind == "name":
            raise WhereError(self.text, right.pos, "a column can only be compared with a literal, "
                                                   "not with another column")
        raise WhereError(self.text, left.pos, "a comparison needs a column name on one side "
                                              "(strings are quoted: class_name == 'cat')")


def parse(text: str):
    """The syntax tree of a filter expression (:class:`WhereError` when it does not parse)."""
    if not isinstance(text, str):
        raise TypeError(f"a filter expression is a string, got {type(text).__name__}")
    return _Parser(text).parse()


# --- meaning --------------------------------------------------------------------------------


def _comparisons(node):
    if isinstance(node, Compare):
        yield node
    elif isinstance(node, Not):
        yield from _comparisons(node.arg)
    else:
        for a in node.args:
            yield from _comparisons(a)


def _kind(arrow_type) -> str:
    import pyarrow as pa

    t = arrow_type.value_type if pa.types.is_dictionary(arrow_type) else arrow_type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_null(t):
        return "null"
    return "other"


def check(text: str, schema, node=None):
    """Parse ``text`` and check it against an Arrow ``schema``: every column exists and each
    literal fits its column's type. Returns the syntax tree."""
    node = parse(text) if node is None else node
    names = list(schema.names)
    for c in _comparisons(node):
        if c.column not in names:
            close = difflib.get_close_matches(c.column, names, n=3, cutoff=0.6)
            msg = f"unknown column {c.column!r}"
            if close:
                msg += " (did you mean " + " or ".join(repr(n) for n in close) + "?)"
            if c.column in COLUMN_HINTS:
                msg += f"; {COLUMN_HINTS[c.column]}"
            else:
                msg += f"; the manifest columns are {', '.join(names)}"
            raise WhereError(text, c.column_pos, msg)
        kind = _kind(schema.field(c.column).type)
        value = c.value
        lit = "bool" if isinstance(value, bool) else "number" if isinstance(value, (int, float)) else "string"
        if kind == "other":
            raise WhereError(text, c.column_pos, f"column {c.column!r} has type {schema.field(c.column).type}, "
                                                 f"which a filter cannot compare")
        if kind != "null" and kind != lit:
            want = {"number": "a number", "string": "a quoted string", "bool": "true or false"}[kind]
            raise WhereError(text, c.value_pos, f"column {c.column!r} is {schema.field(c.column).type}: "
                                                f"compare it with {want}")
        if lit == "bool" and c.op not in ("==", "!="):
            raise WhereError(text, c.op_pos, f"true/false compare only with == or !=, not {c.op}")
    return node


_FUNCS = {"<": "less", "<=": "less_equal", ">": "greater", ">=": "greater_equal", "==": "equal",
          "!=": "not_equal"}


def _evaluate(node, table):
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(node, Compare):
        col = table.column(node.column)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if pa.types.is_null(col.type):
            return pa.nulls(table.num_rows, pa.bool_())
        value = node.value
        if not isinstance(value, bool) and isinstance(value, (int, float)):
            if pa.types.is_integer(col.type):
                return _compare_integers(col, node.op, value)
            if pa.types.is_floating(col.type) and isinstance(value, int):
                return _compare_floats(col, node.op, value)
        return getattr(pc, _FUNCS[node.op])(col, pa.scalar(value))
    if isinstance(node, Not):
        return pc.invert(_evaluate(node.arg, table))
    fn = pc.and_kleene if isinstance(node, And) else pc.or_kleene
    out = _evaluate(node.args[0], table)
    for a in node.args[1:]:
        out = fn(out, _evaluate(a, table))
    return out


def _compare_integers(col, op: str, value):
    """``col OP value`` exactly for an integer column and any numeric literal: the literal becomes
    an integer bound (``seed > 1.5`` is ``seed >= 2``), and a bound outside the column type's range
    decides the comparison for every non-null row. Arrow would compare in float64 (wrong above
    2**53, and refused for such values) or fail on a literal beyond int64."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(value, float) and not value.is_integer():  # also inf: no integer equals it
        if op in ("==", "!="):
            return _constant(col, op == "!=")
        if math.isinf(value):
            return _constant(col, (value > 0) == (op in ("<", "<=")))
        op, value = {"<": ("<=", math.floor(value)), "<=": ("<=", math.floor(value)),
                     ">": (">=", math.ceil(value)), ">=": (">=", math.ceil(value))}[op]
    value = int(value)
    bits = col.type.bit_width
    signed = pa.types.is_signed_integer(col.type)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if value < lo or value > hi:
        below = value < lo  # every value of the column is above the bound (else below it)
        return _constant(col, {"==": False, "!=": True, "<": not below, "<=": not below,
                               ">": below, ">=": below}[op])
    return getattr(pc, _FUNCS[op])(col, pa.scalar(value, col.type))


def _compare_floats(col, op: str, value: int):
    """``col OP value`` exactly for a float column and an integer literal float64 cannot hold
    (beyond 2**53, or beyond its range): no double lies strictly between the literal and its
    nearest double, so the comparison becomes one with that double."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        near = float(value)
    except OverflowError:
        near = math.inf if value > 0 else -math.inf
    if near == value:
        return getattr(pc, _FUNCS[op])(col, pa.scalar(near, pa.float64()))
    if op in ("==", "!="):  # no double equals it; NaN != anything, as in Arrow
        return _constant(col, op == "!=")
    if near < value:  # col > value <=> col > near; col < value <=> col <= near
        op = {">": ">", ">=": ">", "<": "<=", "<=": "<="}[op]
    else:
        op = {">": ">=", ">=": ">=", "<": "<", "<=": "<"}[op]
    return getattr(pc, _FUNCS[op])(col, pa.scalar(near, pa.float64()))


def _constant(col, value: bool):
    """``value`` where ``col`` is not null, null where it is (SQL: a comparison with null is unknown)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.if_else(pc.is_null(col), pa.scalar(None, pa.bool_()), pa.scalar(value))


def mask(text: str, table):
    """Boolean array: True where the expression holds for a row (unknown counts as False)."""
    import pyarrow.compute as pc

    node = check(text, table.schema)
    for c in _comparisons(node):  # a column every manifest has but this job never filled (clip_score)
        if c.column in COLUMN_HINTS and table.num_rows and table.column(c.column).null_count == table.num_rows:
            raise WhereError(text, c.column_pos, f"column {c.column!r} has no values in this manifest; "
                                                 f"{COLUMN_HINTS[c.column]}")
    if table.num_rows == 0:
        import pyarrow as pa

        return pa.array([], pa.bool_())
    return pc.fill_null(_evaluate(node, table), False)


def filter_table(table, text: str):
    """The rows of ``table`` for which ``text`` holds."""
    return table.filter(mask(text, table))


__all__ = ["parse", "check", "mask", "filter_table", "WhereError", "COLUMN_HINTS"]
