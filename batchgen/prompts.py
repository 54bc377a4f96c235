"""`batchgen prompts TEMPLATE.yaml --out prompts.parquet`: expand prompt templates into the
Parquet file ``batchgen run`` reads.

Why: synthetic training sets need N varied prompts for each of K classes, with the label kept
next to the prompt. Writing those rows by hand (or with ad-hoc scripts) loses the label, is not
reproducible and does not scale; this module turns one small YAML file into millions of rows,
deterministically, in bounded memory.

Template format (YAML; every key but ``templates`` is optional)::

    seed: 1234                    # expansion seed (sampled mode); --seed overrides it
    mode: sampled                 # sampled (default) | combinatorial
    count: 4                      # sampled: rows per template (per row of `per`); --count overrides
                                  #   this and every template's own count
    per: class                    # sampled: enumerate this variable, `count` rows for each of its rows
    limit: 100000                 # keep only the first `limit` rows (either mode); --limit overrides
    wildcards: wildcards          # folder(s) of __name__.txt files, relative to this file
                                  #   (default: this file's folder, then its `wildcards/` subfolder)
    max_depth: 8                  # how deep wildcards may nest (a wildcard line using a wildcard;
                                  #   at most 32)
    negative_prompt: "blurry"     # default negative prompt of every template
    id_column: id                 # name of the id column (default `id`)
    version: 1                    # the template format version (1)
    variables:
      class: {file: classes.csv}             # a table: {class.name}, {class.id}  (csv, parquet,
                                             #   json, jsonl, yaml; a .txt file is one value a line)
      color: [red, green, blue]              # a list: {color}
      light: {values: [day, night], weights: [3, 1]}   # weights apply in sampled mode
      animal: {file: animals.csv, weight: freq}        # a table column as the sampling weight
    columns:                      # output columns: name -> variable or variable.field
      label: class.id             #   (default: every variable a template uses: `color`, and
      class_name: class.name      #   `class_name`, `class_id` for table fields)
    templates:
      - name: photo               # key-safe, used in the row ids (default t0, t1, ...)
        prompt: "a photo of a {color} {class.name}, {studio|natural} light, __style__"
        negative_prompt: "cartoon"
        count: 8                  # overrides the top-level count for this template
      - "a {2::watercolor|oil} painting of a {class.name}"   # a bare string is a prompt

Prompt syntax:

- ``{a|b|c}``: an inline choice; options may nest (``{a {big|small} dog|a cat}``), be empty
  (``{|very }``) and carry sampled-mode weights ``{3::a|b}`` (sd-dynamic-prompts' ``N::``).
  Choices nest at most 32 deep in one text and 160 levels in all (through wildcards); weights
  (here, in wildcard lines and in ``variables``) are finite and add up to a finite number.
- ``__style__``: one line of the wildcard file ``style.txt`` (``__people/kids__`` ->
  ``people/kids.txt``). Blank lines and lines starting with ``#`` are skipped; each line is itself
  a template (choices, variables, other wildcards, ``N::`` weights).
- ``{name}`` / ``{name.field}``: a variable. A brace group without ``|`` is always a variable
  reference. One value is picked per row, so every reference to ``class`` in one row (prompt,
  negative prompt, wildcard lines, columns) sees the same table row.
- ``\\{``, ``\\}``, ``\\|``, ``\\_`` write the character itself; every other backslash is kept (so
  A1111 escapes such as ``\\(`` pass through untouched, as do ``(word:1.2)`` and ``[a|b]``).

Modes:

- ``combinatorial``: every combination, in a fixed order: templates in file order; inside a
  template the variables it uses (in ``variables`` order, first slowest), then the prompt's
  choices left to right (last fastest), then the negative prompt's. Weights are ignored. Row k of
  a template is decoded from k directly (mixed radix), so nothing is held in memory.
- ``sampled``: ``count`` rows per template, or per template and row of the ``per`` variable. Row
  ``k`` draws from its own random stream, blake2b-512 of ``(seed, template name, per row, k)``,
  so a row never depends on the rows before it and the same template + seed gives a
  byte-identical Parquet file. Variables are drawn first (``variables`` order), then the prompt's
  choices left to right, then the negative prompt's.

Output columns: ``id`` (``<template>-<k>`` or ``<template>-<per row>-<k>``, zero-padded, always
``[A-Za-z0-9._-]``, at most 128 characters), ``prompt``, ``negative_prompt`` (only when some
template has one; null for templates without, so ``run`` uses the job default), ``template``,
then the variable columns with the variable's type (an integer class id stays int64; null where
a template does not use the variable). Use it with ``input: {uri: prompts.parquet, id_column: id}``.
A variable column named like a ``run`` per-row setting (``seed``, ``steps``, ``width``, ...)
becomes that row's setting.

Rows are written in row groups of ``row_group_rows`` as they are produced (bounded memory).

The template file and ``.yaml`` / ``.json`` table files are read like a job spec
(:mod:`batchgen.spec`): at most :data:`MAX_TEMPLATE_BYTES` each, and YAML aliases (``*name``, which
can expand a small file into gigabytes) and duplicate keys are errors naming the file and line.
"""

from __future__ import annotations

import argparse
import bisect
import difflib
import hashlib
import json
import math
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError

TOP_KEYS = ("seed", "mode", "count", "per", "limit", "wildcards", "max_depth", "negative_prompt", "id_column",
            "variables", "columns", "templates", "version")
TEMPLATE_KEYS = ("name", "prompt", "negative_prompt", "count")
VARIABLE_KEYS = ("file", "values", "weights", "weight")
MODES = ("sampled", "combinatorial")
RESERVED_COLUMNS = ("prompt", "negative_prompt", "template")
TABLE_SUFFIXES = (".csv", ".parquet", ".json", ".jsonl", ".yaml", ".yml", ".txt")
DEFAULT_ROW_GROUP_ROWS = 65536
MAX_ROWS_WITHOUT_LIMIT = 10**10  # a combinatorial explosion past this needs an explicit limit
MAX_TEMPLATE_BYTES = 8 << 20  # a template or a .yaml/.json table file; larger tables belong in csv/parquet
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
COLUMN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_REF_RE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?\s*\Z")
_WILDCARD_RE = re.compile(r"__([A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*?)__")
_WEIGHT_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)::")
_SPECIAL_RE = re.compile(r"[\\{}|_]")
MAX_BRACE_NESTING = 32  # {..{..}..} inside one piece of text
MAX_WILDCARD_DEPTH = 32  # the highest max_depth a template may set
MAX_NESTING = 160  # choice levels in all, through wildcards: expansion recurses once per level
_ESCAPABLE = "{}|_"


class TemplateError(InputError):
    """A bad prompt template: the message names the file, the key or line, and the problem."""


# ----------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class _Where:
    """Where a piece of template text came from, for error messages."""

    file: str
    key: str | None = None  # e.g. templates[1].prompt; None for wildcard files
    line: int | None = None  # 1-based line of the text's start in ``file``
    block: bool = False  # a YAML block scalar: the text starts on the line after ``line``

    def at(self, text: str | None = None, pos: int | None = None) -> str:
        line = self.line
        if line is not None and text is not None and pos is not None:
            line += text.count("\n", 0, pos) + (1 if self.block else 0)
        parts = [self.file]
        if self.key:
            parts.append(self.key)
        if line is not None:
            parts.append(f"line {line}")
        where = ", ".join(parts)
        if text is not None and pos is not None:
            lo = text.rfind("\n", 0, pos) + 1
            hi = text.find("\n", pos)
            hi = len(text) if hi < 0 else hi
            snippet = text[max(lo, pos - 30):min(hi, pos + 30)]
            where += f", character {pos - lo + 1} (near {snippet!r})"
        return where


def _key_lines(path: Path, text: str) -> dict[tuple, tuple[int, bool]]:
    """YAML key path -> (1-based line, is block scalar) for every node of the document."""
    import yaml

    from .spec import strict_loader

    lines: dict[tuple, tuple[int, bool]] = {}
    try:  # strict: an alias would make walk() below visit a shared node again and again
        root = yaml.compose(text, Loader=strict_loader("prompt template"))
    except Exception:  # noqa: BLE001 - no line numbers for a document load_template refuses anyway
        return lines

    def walk(node, key: tuple, key_line: int | None) -> None:
        if isinstance(node, yaml.ScalarNode):
            block = node.style in ("|", ">")
            lines[key] = (node.start_mark.line + 1 - (1 if block else 0), block) if not block or key_line is None \
                else (key_line, True)
            return
        lines[key] = (key_line if key_line is not None else node.start_mark.line + 1, False)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                walk(v, key + (k.value,), k.start_mark.line + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, key + (i,), None)

    if root is not None:
        walk(root, (), None)
    return lines


def _key_name(key: tuple) -> str:
    out = ""
    for part in key:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ----------------------------------------------------------------------------- random streams


def row_stream(key: bytes) -> Iterator[float]:
    """A row's random stream: floats in [0, 1) with 53 random bits, ``next(stream)`` per draw.

    Counter-based: block b is blake2b-512(key || b) read as 8 big-endian 64-bit words, so row k's
    stream is a pure function of its key (no global state, same values on every platform).
    """
    block = 0
    scale = 1.0 / 9007199254740992.0
    while True:
        words = struct.unpack(">8Q", hashlib.blake2b(key + block.to_bytes(4, "big"), digest_size=64).digest())
        yield from [(x >> 11) * scale for x in words]
        block += 1


def row_key(seed: int, template: str, group: int, k: int) -> bytes:
    """The key of row ``k`` of ``template`` in group ``group`` (the ``per`` variable's row, else 0)."""
    return f"batchgen.prompts\0{seed}\0{template}\0{group}\0{k}".encode()


# ----------------------------------------------------------------------------- expansion nodes
# A node is a plain ``str`` (literal text) or an object that knows its number of combinations
# (``count``), renders combination k (``at``) and draws a random expansion (``draw``, one
# ``next(rng)`` per choice made). ``ctx`` maps variable name -> the chosen table row.


def _count(node) -> int:
    return 1 if node.__class__ is str else node.count


def _height(node) -> int:
    """Levels of nodes below and including ``node`` (``at`` / ``draw`` recurse once per level)."""
    return 0 if node.__class__ is str else node.height


def _resolve(node):
    """A wildcard reference stands for its file's choice node (saves a call per draw)."""
    return node.target if isinstance(node, _Wild) else node


class _Seq:
    """Concatenation; combination k is mixed radix over the parts (first slowest)."""

    __slots__ = ("parts", "count", "height", "_template", "_dyn", "_rev")

    def __init__(self, parts: list):
        self.parts = parts
        self.count = 1
        self.height = 1
        self._template: list = []
        self._dyn: list = []
        self._rev: list = []

    def finish(self) -> None:
        self.parts = [_resolve(p) for p in self.parts]
        self.count = math.prod(_count(p) for p in self.parts)
        self.height = 1 + max((_height(p) for p in self.parts), default=0)
        self._template = [p if p.__class__ is str else "" for p in self.parts]
        self._dyn = [(i, p) for i, p in enumerate(self.parts) if p.__class__ is not str]
        self._rev = [(i, p, _count(p)) for i, p in reversed(self._dyn)]

    def at(self, k, ctx):
        out = self._template.copy()
        for i, p, c in self._rev:
            if c == 1:
                out[i] = p.at(0, ctx)
            else:
                k, r = divmod(k, c)
                out[i] = p.at(r, ctx)
        return "".join(out)

    def draw(self, rng, ctx):
        out = self._template.copy()
        for i, p in self._dyn:
            out[i] = p.draw(rng, ctx)
        return "".join(out)


class _Choice:
    """One of several options: ``{a|b}`` or the lines of a wildcard file."""

    __slots__ = ("options", "weights", "count", "height", "_cum_counts", "_cum_weights", "_total", "_uniform", "_n")

    def __init__(self, options: list, weights: list[float]):
        self.options = options
        self.weights = weights
        self.count = 0
        self.height = 1
        self._cum_counts: list[int] = []
        self._cum_weights: list[float] = []
        self._total = 0.0
        self._uniform = True
        self._n = len(options)

    def finish(self) -> None:
        self.options = [_resolve(o) for o in self.options]
        cum, acc = [], 0
        for o in self.options:
            cum.append(acc)
            acc += _count(o)
        self._cum_counts, self.count = cum, acc
        self.height = 1 + max((_height(o) for o in self.options), default=0)
        cw, tot = [], 0.0
        for w in self.weights:
            tot += w
            cw.append(tot)
        self._cum_weights, self._total = cw, tot
        self._uniform = all(w == 1.0 for w in self.weights)

    def at(self, k, ctx):
        j = bisect.bisect_right(self._cum_counts, k) - 1
        o = self.options[j]
        return o if o.__class__ is str else o.at(k - self._cum_counts[j], ctx)

    def draw(self, rng, ctx):
        if self._uniform:
            o = self.options[int(next(rng) * self._n)]
        else:
            j = bisect.bisect_right(self._cum_weights, next(rng) * self._total)
            o = self.options[j if j < self._n else self._n - 1]
        return o if o.__class__ is str else o.draw(rng, ctx)


class _Wild:
    """``__name__`` before linking; ``target`` is the file's choice node."""

    __slots__ = ("name", "target", "where")

    def __init__(self, name: str, where: str):
        self.name = name
        self.target: _Choice | None = None
        self.where = where

    @property
    def count(self):
        return self.target.count

    def at(self, k, ctx):
        return self.target.at(k, ctx)

    def draw(self, rng, ctx):
        return self.target.draw(rng, ctx)


class _Var:
    """``{name}`` / ``{name.field}``: the value of the row's chosen table row."""

    __slots__ = ("name", "field", "strings")
    count = 1
    height = 0

    def __init__(self, name: str, field: str | None):
        self.name = name
        self.field = field
        self.strings: list[str] = []

    def at(self, k, ctx):
        return self.strings[ctx[self.name]]

    def draw(self, rng, ctx):
        return self.strings[ctx[self.name]]


@dataclass
class _Refs:
    """Wildcards and variables a piece of text refers to, with where each reference is."""

    wildcards: list[tuple[str, str]] = field(default_factory=list)  # (name, where)
    variables: list[tuple[str, str | None, str]] = field(default_factory=list)  # (name, field, where)
    var_nodes: list[_Var] = field(default_factory=list)
    wild_nodes: list[_Wild] = field(default_factory=list)


class _Parser:
    """Recursive descent over one piece of template text (a prompt or one wildcard line)."""

    def __init__(self, text: str, where: _Where, refs: _Refs):
        self.text = text
        self.pos = 0
        self.where = where
        self.refs = refs
        self.depth = 0

    def fail(self, pos: int, message: str) -> TemplateError:
        return TemplateError(f"{self.where.at(self.text, pos)}: {message}")

    def parse(self):
        node = self._sequence(top=True)
        return node

    def _sequence(self, top: bool):
        text, n = self.text, len(self.text)
        parts: list = []
        buf: list[str] = []
        while self.pos < n:
            m = _SPECIAL_RE.search(text, self.pos)
            if m is None:
                buf.append(text[self.pos:])
                self.pos = n
                break
            if m.start() > self.pos:
                buf.append(text[self.pos:m.start()])
            self.pos = m.start()
            c = text[self.pos]
            if c == "\\":
                nxt = text[self.pos + 1:self.pos + 2]
                if nxt and nxt in _ESCAPABLE:
                    buf.append(nxt)
                    self.pos += 2
                else:
                    buf.append("\\")
                    self.pos += 1
            elif c == "{":
                if buf:
                    parts.append("".join(buf))
                    buf = []
                parts.append(self._group())
            elif c == "}":
                if top:
                    raise self.fail(self.pos, "unbalanced '}' (no '{' before it); write \\} for a literal brace")
                break
            elif c == "|":
                if top:
                    buf.append("|")  # outside braces '|' is plain text (A1111 uses [a|b])
                    self.pos += 1
                else:
                    break
            else:  # '_'
                wm = _WILDCARD_RE.match(text, self.pos) if text.startswith("__", self.pos) else None
                if wm is None:
                    buf.append("_")
                    self.pos += 1
                    continue
                if buf:
                    parts.append("".join(buf))
                    buf = []
                node = _Wild(wm.group(1), self.where.at(text, self.pos))
                self.refs.wildcards.append((wm.group(1), node.where))
                self.refs.wild_nodes.append(node)
                parts.append(node)
                self.pos = wm.end()
        if buf:
            parts.append("".join(buf))
        if not parts:
            return ""
        if len(parts) == 1:
            return parts[0]
        return _Seq(parts)

    def _group(self):
        text, n = self.text, len(self.text)
        open_pos = self.pos
        if self.depth >= MAX_BRACE_NESTING:
            raise self.fail(open_pos, f"choices nest more than {MAX_BRACE_NESTING} deep ({{ inside {{)")
        self.depth += 1
        try:
            return self._group_body(text, n, open_pos)
        finally:
            self.depth -= 1

    def _group_body(self, text: str, n: int, open_pos: int):
        self.pos += 1
        options: list = []
        weights: list[float] = []
        weighted = False
        while True:
            wm = _WEIGHT_RE.match(text, self.pos)
            if wm is not None:
                weighted = True
                weights.append(float(wm.group(1)))
                if not math.isfinite(weights[-1]):
                    raise self.fail(self.pos, _too_large(wm.group(1)))
                self.pos = wm.end()
            else:
                weights.append(1.0)
            options.append(self._sequence(top=False))
            if self.pos >= n:
                raise self.fail(open_pos, "unbalanced '{' (no closing '}'); write \\{ for a literal brace")
            c = text[self.pos]
            self.pos += 1
            if c == "}":
                break
            # c == "|": next option
        if len(options) == 1:
            inner = text[open_pos + 1:self.pos - 1]
            if not inner.strip():
                raise self.fail(open_pos, "empty choice set '{}': give options {a|b} or a variable {name}")
            ref = _REF_RE.match(inner)
            if ref is None or weighted:
                raise self.fail(open_pos, f"'{{{inner}}}' is neither a choice (options separated by '|', "
                                          "e.g. {red|green}) nor a variable reference ({name} or {name.field}); "
                                          "write \\{ and \\} for literal braces")
            node = _Var(ref.group(1), ref.group(2))
            self.refs.variables.append((ref.group(1), ref.group(2), self.where.at(text, open_pos)))
            self.refs.var_nodes.append(node)
            return node
        if sum(weights) <= 0:
            raise self.fail(open_pos, "every option of this choice has weight 0")
        if not math.isfinite(sum(weights)):
            raise self.fail(open_pos, f"the weights of this choice add up to more than {sys.float_info.max:g}")
        return _Choice(options, weights)


def _too_large(weight: str) -> str:
    """The message for a weight that overflows float64 (it would become inf and change the sampling)."""
    return f"weight {weight[:20]}{'...' if len(weight) > 20 else ''} is too large (at most {sys.float_info.max:g})"


def _finish_all(node, seen: set[int]) -> None:
    """Compute counts bottom-up (wildcard targets are finished separately, in dependency order)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, _Seq):
        for p in node.parts:
            _finish_all(p, seen)
        node.finish()
    elif isinstance(node, _Choice):
        for o in node.options:
            _finish_all(o, seen)
        node.finish()
    # a _Wild's target was finished when its file was loaded


def _as_node(node, where: str):
    """A finished top-level node (a bare string or wildcard becomes a node with count/at/draw)."""
    if node.__class__ is str:
        node = _Seq([node])
    _finish_all(node, set())
    node = _resolve(node)
    _check_height(node, where)
    return node


def _check_height(node, where: str) -> None:
    """Expansion recurses once per level of choices (through wildcards too): bound it, so a deep
    template is an error naming it, not a RecursionError."""
    if node.height > MAX_NESTING:
        raise TemplateError(f"{where}: choices and wildcards nest {node.height} levels deep (at most {MAX_NESTING})")


# ----------------------------------------------------------------------------- variables


@dataclass
class Variable:
    """A named value source: a list (``fields`` is None) or a table with named fields."""

    name: str
    values: dict[str | None, list]  # field (None for a list) -> values
    weights: list[float] | None
    source: str
    rows: int = 0
    strings: dict[str | None, list[str]] = field(default_factory=dict)

    @property
    def fields(self) -> list[str] | None:
        return None if None in self.values else list(self.values)

    def column_values(self, field_name: str | None) -> list:
        return self.values[field_name]

    def string_values(self, field_name: str | None) -> list[str]:
        if field_name not in self.strings:
            self.strings[field_name] = ["" if v is None else _fmt(v) for v in self.values[field_name]]
        return self.strings[field_name]


def _fmt(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    return str(value)


def _read_table_file(path: Path, where: str) -> tuple[list[str], dict[str, list]]:
    """(column names, columns) of a csv / parquet / json / jsonl / yaml table file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(str(path))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(str(path))
        elif suffix == ".jsonl":
            import pyarrow.json as pajson

            table = pajson.read_json(str(path))
        else:  # .json / .yaml / .yml: a list of mappings or of scalars
            from .spec import read_text_limited, strict_yaml_load

            text = read_text_limited(path, MAX_TEMPLATE_BYTES, "table file")
            data = strict_yaml_load(text, str(path), "table file") if suffix != ".json" else json.loads(text)
            return _rows_to_columns(data, f"{where} ({path})")
    except TemplateError:
        raise
    except InputError as exc:  # too large, not UTF-8, alias, duplicate key: the message names the file
        raise TemplateError(f"{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001  (pyarrow / yaml / json raise many types)
        raise TemplateError(f"{where}: cannot read {path}: {exc}") from None
    return table.column_names, {name: table.column(name).to_pylist() for name in table.column_names}


def _rows_to_columns(data, where: str) -> tuple[list[str] | None, dict]:
    if not isinstance(data, list):
        raise TemplateError(f"{where}: expected a list of values or of mappings, got {type(data).__name__}")
    if not data:
        return None, {None: []}
    if all(isinstance(r, dict) for r in data):
        names: list[str] = []
        for r in data:
            for k in r:
                if str(k) not in names:
                    names.append(str(k))
        for i, r in enumerate(data):
            missing = [n for n in names if n not in {str(k) for k in r}]
            if missing:
                raise TemplateError(f"{where}: row {i} has no {', '.join(missing)} (every row needs the same keys)")
        return names, {n: [next(v for k, v in r.items() if str(k) == n) for r in data] for n in names}
    if any(isinstance(r, (dict, list)) for r in data):
        raise TemplateError(f"{where}: mix of mappings and values; give all rows as mappings or all as values")
    return None, {None: list(data)}


def _load_variable(name: str, spec, base: Path, where_of) -> Variable:
    """Load one ``variables`` entry; ``where_of(subkey)`` locates a key below it for errors."""
    where = where_of()
    weights = None
    weight_col = None
    if isinstance(spec, list):
        names, cols = _rows_to_columns(spec, where)
        source = "inline list"
    elif isinstance(spec, dict):
        unknown = [k for k in spec if k not in VARIABLE_KEYS]
        if unknown:
            raise TemplateError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(VARIABLE_KEYS)})")
        if ("file" in spec) == ("values" in spec):
            raise TemplateError(f"{where}: give exactly one of 'file' (a table or .txt file) or 'values' (a list)")
        if "values" in spec:
            names, cols = _rows_to_columns(spec["values"], where_of('values'))
            source = "inline values"
        else:
            path = base / str(spec["file"])
            source = str(path)
            if not path.is_file():
                raise TemplateError(f"{where_of('file')}: no such file {path}")
            if path.suffix.lower() not in TABLE_SUFFIXES:
                raise TemplateError(f"{where_of('file')}: {path.name}: unsupported file type "
                                    f"(supported: {', '.join(TABLE_SUFFIXES)})")
            if path.suffix.lower() == ".txt":
                names, cols = None, {None: _txt_lines(path)}
            else:
                names, cols = _read_table_file(path, where_of('file'))
        if "weights" in spec:
            weights = spec["weights"]
            if not isinstance(weights, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                        and w >= 0 for w in weights):
                raise TemplateError(f"{where_of('weights')}: a list of numbers >= 0")
            weights = [float(w) for w in weights]
        weight_col = spec.get("weight")
    else:
        raise TemplateError(f"{where}: a variable is a list, {{values: [...]}} or {{file: ...}}, "
                            f"got {type(spec).__name__}")
    rows = len(next(iter(cols.values()))) if cols else 0
    if rows == 0:
        raise TemplateError(f"{where}: empty choice set: variable {name!r} has no values ({source})")
    if weight_col is not None:
        if names is None or weight_col not in cols:
            raise TemplateError(f"{where_of('weight')}: no column {weight_col!r} in {source} (columns: {names})")
        weights = cols.pop(weight_col)
        names = [n for n in names if n != weight_col]
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights):
            raise TemplateError(f"{where_of('weight')}: column {weight_col!r} must hold numbers >= 0")
        weights = [float(w) for w in weights]
    if weights is not None:
        if len(weights) != rows:
            raise TemplateError(f"{where}: {len(weights)} weights for {rows} values")
        if sum(weights) <= 0:
            raise TemplateError(f"{where}: every weight is 0")
        if not math.isfinite(sum(weights)):  # inf (.inf in YAML, a huge CSV value) or a sum that overflows
            raise TemplateError(f"{where}: weights must be finite and add up to at most {sys.float_info.max:g}")
    if names is not None:
        bad = [n for n in names if not COLUMN_RE.match(n)]
        if bad:
            raise TemplateError(f"{where}: field name {bad[0]!r} of {source} cannot be referenced; field names "
                                "are letters, digits and '_' (not starting with a digit)")
    return Variable(name, cols, weights, source, rows)


def _txt_lines(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


# ----------------------------------------------------------------------------- the template


@dataclass
class _Template:
    name: str
    index: int
    prompt: Any
    negative: Any  # node or None
    variables: list[str]  # the variables this template's rows choose, in declaration order
    count: int | None  # sampled rows per group
    where: str


@dataclass
class _Column:
    name: str
    variable: str
    field: str | None
    arrow_type: Any
    values: list


class PromptTemplate:
    """A parsed, validated template file. Build it with :func:`load_template`."""

    def __init__(self, path: Path, data: dict, text: str, *, seed: int | None = None, count: int | None = None,
                 limit: int | None = None, mode: str | None = None):
        self.path = path
        self.sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        self._lines = _key_lines(path, text)
        self._wildcard_cache: dict[Path, _Choice | None] = {}
        self._wildcard_vars: dict[int, set[str]] = {}  # id(wildcard choice node) -> variables it uses
        data = dict(data)
        self._check_keys(data, TOP_KEYS, ())
        self.seed = self._int(data, "seed", 0, 0) if seed is None else int(seed)
        self.mode = mode or data.get("mode", "sampled")
        if self.mode not in MODES:
            raise self._err(("mode",), f"unknown mode {self.mode!r} (use one of: {', '.join(MODES)})")
        self._count_override = count  # --count: every template, over template-level counts too
        self.count = self._int(data, "count", None, 1) if count is None else int(count)
        if data.get("version", 1) != 1:
            raise self._err(("version",), f"unsupported template version {data['version']!r} (this is version 1)")
        self.limit = self._int(data, "limit", None, 1) if limit is None else int(limit)
        self.max_depth = self._int(data, "max_depth", 8, 1)
        if self.max_depth > MAX_WILDCARD_DEPTH:
            raise self._err(("max_depth",), f"max_depth must be <= {MAX_WILDCARD_DEPTH}, got {self.max_depth}")
        self.id_column = data.get("id_column", "id")
        if not isinstance(self.id_column, str) or not COLUMN_RE.match(self.id_column) \
                or self.id_column in RESERVED_COLUMNS:
            raise self._err(("id_column",), f"bad id column name {self.id_column!r}")
        self.wildcard_dirs = self._wildcard_dirs(data.get("wildcards"))
        self.variables = self._load_variables(data.get("variables") or {})
        self.per = data.get("per")
        if self.per is not None:
            if self.mode != "sampled":
                raise self._err(("per",), "'per' applies to mode: sampled only (combinatorial already "
                                          "enumerates every variable)")
            if self.per not in self.variables:
                raise self._err(("per",), f"unknown variable {self.per!r}" + self._known_vars(self.per))
        self.templates = self._load_templates(data)
        if self.mode == "sampled":
            missing = [t.name for t in self.templates if t.count is None]
            if missing:
                raise self._err(("count",), f"mode: sampled needs 'count' (rows per template"
                                            f"{' and ' + self.per + ' row' if self.per else ''}), at the top "
                                            f"level or in template {missing[0]!r}")
        self.columns = self._columns(data.get("columns"))
        self._check_size()

    # -- validation helpers ------------------------------------------------------------------

    def _where(self, key: tuple) -> _Where:
        line, block = self._lines.get(key, (None, False))
        return _Where(str(self.path), _key_name(key) or None, line, block)

    def _err(self, key: tuple, message: str) -> TemplateError:
        return TemplateError(f"{self._where(key).at()}: {message}")

    def _check_keys(self, data: dict, allowed: tuple, key: tuple) -> None:
        for k in data:
            if k not in allowed:
                close = difflib.get_close_matches(str(k), allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise self._err(key + (k,), f"unknown key {k!r} (allowed: {', '.join(allowed)}){hint}")

    def _int(self, data: dict, key: str, default, lo: int):
        value = data.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise self._err((key,), f"{key} must be an integer >= {lo}, got {value!r}")
        return value

    def _known_vars(self, name: str) -> str:
        names = list(self.variables)
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f" (variables: {', '.join(names) if names else 'none defined'}){hint}"

    def _wildcard_dirs(self, spec) -> list[Path]:
        base = self.path.parent
        if spec is None:
            return [base, base / "wildcards"]
        items = spec if isinstance(spec, list) else [spec]
        if not all(isinstance(s, str) for s in items):
            raise self._err(("wildcards",), "wildcards: a folder or a list of folders (relative to the template)")
        dirs = [base / s for s in items]
        for i, d in enumerate(dirs):
            if not d.is_dir():
                key = ("wildcards", i) if isinstance(spec, list) else ("wildcards",)
                raise self._err(key, f"no such wildcard folder {d}")
        return dirs

    def _load_variables(self, spec) -> dict[str, Variable]:
        if not isinstance(spec, dict):
            raise self._err(("variables",), "variables: a mapping of name -> list / {values: ...} / {file: ...}")
        out = {}
        for name, vspec in spec.items():
            if not isinstance(name, str) or not COLUMN_RE.match(name):
                raise self._err(("variables", name), f"bad variable name {name!r} (letters, digits, '_')")
            out[name] = _load_variable(name, vspec, self.path.parent,
                                       lambda *sub, n=name: self._where(("variables", n, *sub)).at())
        return out

    # -- templates, wildcards ----------------------------------------------------------------

    def _parse(self, text, key: tuple, refs: _Refs):
        if not isinstance(text, str):
            raise self._err(key, f"expected a string, got {type(text).__name__}")
        return _Parser(text, self._where(key), refs).parse()

    def _load_templates(self, data: dict) -> list[_Template]:
        raw = data.get("templates")
        if not isinstance(raw, list) or not raw:
            raise self._err(("templates",), "templates: a non-empty list of prompts or {name, prompt, ...} entries")
        default_neg = data.get("negative_prompt")
        out: list[_Template] = []
        names: set[str] = set()
        for i, entry in enumerate(raw):
            key = ("templates", i)
            if isinstance(entry, str):
                entry = {"prompt": entry}
                prompt_key = key
            elif isinstance(entry, dict):
                self._check_keys(entry, TEMPLATE_KEYS, key)
                if "prompt" not in entry:
                    raise self._err(key, "template has no 'prompt'")
                prompt_key = key + ("prompt",)
            else:
                raise self._err(key, f"a template is a string or a mapping, got {type(entry).__name__}")
            name = entry.get("name", f"t{i}")
            if not isinstance(name, str) or not NAME_RE.match(name) or set(name) == {"."}:
                raise self._err(key + ("name",), f"template name {name!r} must be 1..64 characters of "
                                                 "[A-Za-z0-9._-] (it starts every row id)")
            if name in names:
                raise self._err(key + ("name",), f"duplicate template name {name!r}")
            names.add(name)
            refs = _Refs()
            prompt = self._parse(entry["prompt"], prompt_key, refs)
            negative = None
            if "negative_prompt" in entry:
                if entry["negative_prompt"] is not None:
                    negative = self._parse(entry["negative_prompt"], key + ("negative_prompt",), refs)
            elif default_neg is not None:
                negative = self._parse(default_neg, ("negative_prompt",), refs)
            count = entry.get("count", self.count)
            if "count" in entry and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
                raise self._err(key + ("count",), f"count must be an integer >= 1, got {count!r}")
            if self._count_override is not None:
                count = int(self._count_override)
            self._link(refs, [])
            used = self._used_variables(refs)
            if self.per is not None:
                used.add(self.per)
            variables = [v for v in self.variables if v in used]
            prompt = _as_node(prompt, self._where(prompt_key).at())
            negative = _as_node(negative, self._where(key).at()) if negative is not None else None
            out.append(_Template(name, i, prompt, negative, variables, count, self._where(prompt_key).at()))
        return out

    def _check_var_ref(self, name: str, fld: str | None, where: str) -> None:
        var = self.variables.get(name)
        if var is None:
            raise TemplateError(f"{where}: unknown variable {{{name}{'.' + fld if fld else ''}}}"
                                + self._known_vars(name))
        if fld is None and var.fields is not None:
            raise TemplateError(f"{where}: variable {name!r} is a table; name a field: "
                                + ", ".join(f"{{{name}.{f}}}" for f in var.fields))
        if fld is not None and var.fields is None:
            raise TemplateError(f"{where}: variable {name!r} is a list of values, it has no fields; write {{{name}}}")
        if fld is not None and fld not in var.fields:
            close = difflib.get_close_matches(fld, var.fields, n=1)
            raise TemplateError(f"{where}: variable {name!r} has no field {fld!r} (fields: {', '.join(var.fields)})"
                                + (f"; did you mean {close[0]!r}?" if close else ""))

    def _link(self, refs: _Refs, chain: list[str]) -> None:
        """Resolve variables and wildcards of ``refs`` (loading wildcard files, recursively)."""
        for node, (name, fld, where) in zip(refs.var_nodes, refs.variables):
            self._check_var_ref(name, fld, where)
            node.strings = self.variables[name].string_values(fld)
        for node in refs.wild_nodes:
            node.target = self._wildcard(node.name, node.where, chain)

    def _wildcard(self, name: str, where: str, chain: list[str]) -> _Choice:
        if name in chain:
            loop = " -> ".join(f"__{n}__" for n in chain[chain.index(name):] + [name])
            raise TemplateError(f"{where}: wildcard cycle {loop}")
        if len(chain) >= self.max_depth:
            path = " -> ".join(f"__{n}__" for n in chain + [name])
            raise TemplateError(f"{where}: wildcards nest deeper than max_depth={self.max_depth} ({path}); "
                                "raise max_depth in the template if this is intended")
        parts = name.split("/")
        path = next((d.joinpath(*parts[:-1], parts[-1] + ".txt") for d in self.wildcard_dirs
                     if d.joinpath(*parts[:-1], parts[-1] + ".txt").is_file()), None)
        if path is None:
            known = sorted({p.relative_to(d).with_suffix("").as_posix() for d in self.wildcard_dirs if d.is_dir()
                            for p in d.rglob("*.txt")})
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean __{close[0]}__?" if close else ""
            raise TemplateError(f"{where}: unknown wildcard __{name}__: no {'/'.join(parts)}.txt in "
                                f"{', '.join(str(d) for d in self.wildcard_dirs)}{hint}")
        path = path.resolve()
        if path in self._wildcard_cache:
            node = self._wildcard_cache[path]
            if node is None:  # being loaded further up this chain under another name
                raise TemplateError(f"{where}: wildcard cycle through {path}")
            return node
        self._wildcard_cache[path] = None  # type: ignore[assignment]
        options, weights = [], []
        refs = _Refs()
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            lw = _Where(str(path), None, lineno)
            wm = _WEIGHT_RE.match(stripped)
            weights.append(float(wm.group(1)) if wm else 1.0)
            if not math.isfinite(weights[-1]):
                raise TemplateError(f"{lw.at()}: {_too_large(wm.group(1))}")
            body = stripped[wm.end():] if wm else stripped
            parser = _Parser(body, lw, refs)
            options.append(parser.parse())
        if not options:
            raise TemplateError(f"{where}: empty choice set: wildcard file {path} has no lines "
                                "(blank lines and # comments are skipped)")
        if sum(weights) <= 0:
            raise TemplateError(f"{path}: every line has weight 0")
        if not math.isfinite(sum(weights)):
            raise TemplateError(f"{path}: the line weights add up to more than {sys.float_info.max:g}")
        self._link(refs, chain + [name])
        node = _Choice(options, weights)
        _finish_all(node, set())
        _check_height(node, where)
        self._wildcard_cache[path] = node
        self._wildcard_vars[id(node)] = self._used_variables(refs)
        return node

    def _used_variables(self, refs: _Refs) -> set[str]:
        """Variables used by ``refs`` directly or through the wildcards they use (already linked)."""
        used = {name for name, _, _ in refs.variables}
        for node in refs.wild_nodes:
            used |= self._wildcard_vars[id(node.target)]
        return used

    # -- output columns ----------------------------------------------------------------------

    def _columns(self, spec) -> list[_Column]:
        import pyarrow as pa

        pairs: list[tuple[str, str, str | None, tuple]] = []
        if spec is None:
            used = [v for v in self.variables if any(v in t.variables for t in self.templates)]
            for v in used:
                var = self.variables[v]
                for f in (var.fields or [None]):
                    pairs.append((v if f is None else f"{v}_{f}", v, f, ("variables", v)))
        else:
            if not isinstance(spec, dict):
                raise self._err(("columns",), "columns: a mapping of column name -> variable or variable.field")
            for col, ref in spec.items():
                key = ("columns", col)
                m = _REF_RE.match(ref) if isinstance(ref, str) else None
                if m is None:
                    raise self._err(key, f"column {col!r}: expected a variable or variable.field, got {ref!r}")
                self._check_var_ref(m.group(1), m.group(2), self._where(key).at())
                pairs.append((str(col), m.group(1), m.group(2), key))
        out, seen = [], {self.id_column, *RESERVED_COLUMNS}
        for col, v, f, key in pairs:
            if not COLUMN_RE.match(col):
                raise self._err(key, f"bad column name {col!r} (letters, digits, '_')")
            if col in seen:
                raise self._err(key, f"column {col!r} clashes with another output column "
                                     f"({', '.join(sorted(seen))}); name it in 'columns'")
            seen.add(col)
            values = self.variables[v].column_values(f)
            try:
                typ = pa.array(values).type
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                values = [None if x is None else _fmt(x) for x in values]
                typ = pa.string()
            if pa.types.is_null(typ):
                typ = pa.string()
            out.append(_Column(col, v, f, typ, values))
        return out

    # -- sizes -------------------------------------------------------------------------------

    def _template_rows(self, t: _Template) -> int:
        if self.mode == "sampled":
            return t.count * (self.variables[self.per].rows if self.per else 1)
        return self._combinations(t)

    def _combinations(self, t: _Template) -> int:
        n = math.prod(self.variables[v].rows for v in t.variables)
        n *= t.prompt.count
        if t.negative is not None:
            n *= t.negative.count
        return n

    def _check_size(self) -> None:
        total = sum(self._template_rows(t) for t in self.templates)
        if self.mode == "combinatorial" and self.limit is None and total > MAX_ROWS_WITHOUT_LIMIT:
            raise self._err(("templates",), f"combinatorial expansion gives {total:.3g} rows; set 'limit' "
                                            "(or use mode: sampled)")

    def row_count(self) -> int:
        """The number of rows the expansion writes."""
        total = sum(self._template_rows(t) for t in self.templates)
        return min(total, self.limit) if self.limit is not None else total

    @property
    def has_negative(self) -> bool:
        return any(t.negative is not None for t in self.templates)

    def schema(self):
        import pyarrow as pa

        fields = [pa.field(self.id_column, pa.string(), nullable=False),
                  pa.field("prompt", pa.string(), nullable=False)]
        if self.has_negative:
            fields.append(pa.field("negative_prompt", pa.string()))
        fields.append(pa.field("template", pa.string(), nullable=False))
        fields += [pa.field(c.name, c.arrow_type) for c in self.columns]
        meta = {"batchgen.prompts": json.dumps({"template_sha256": self.sha256, "seed": self.seed, "mode": self.mode,
                                                "rows": self.row_count()}, sort_keys=True)}
        return pa.schema(fields, metadata=meta)

    # -- expansion ---------------------------------------------------------------------------

    def iter_rows(self) -> Iterator[tuple[str, str, str | None, str, dict]]:
        """(id, prompt, negative_prompt, template, ctx) per row; ctx maps variable -> table row index."""
        remaining = self.row_count()
        for t in self.templates:
            if remaining <= 0:
                return
            gen = self._sampled(t) if self.mode == "sampled" else self._combinatorial(t)
            for row in gen:
                yield row
                remaining -= 1
                if remaining <= 0:
                    return

    def _combinatorial(self, t: _Template):
        radices = [(v, self.variables[v].rows) for v in t.variables]
        rest = [(v, n) for v, n in reversed(radices)]
        pc = t.prompt.count
        nc = t.negative.count if t.negative is not None else 1
        total = self._combinations(t)
        width = len(str(max(total - 1, 0)))
        name, prompt, negative = t.name, t.prompt, t.negative
        for k in range(total):
            q, kn = divmod(k, nc) if nc > 1 else (k, 0)
            q, kp = divmod(q, pc) if pc > 1 else (q, 0)
            ctx = {}
            for v, n in rest:
                q, ctx[v] = divmod(q, n)
            yield (f"{name}-{k:0{width}d}", prompt.at(kp, ctx),
                   negative.at(kn, ctx) if negative is not None else None, name, ctx)

    def _sampled(self, t: _Template):
        per = self.per
        groups = self.variables[per].rows if per else 1
        draw = []
        for v in t.variables:
            if v == per:
                continue
            var = self.variables[v]
            cw = None
            if var.weights is not None:
                cw, acc = [], 0.0
                for w in var.weights:
                    acc += w
                    cw.append(acc)
            draw.append((v, var.rows, cw, cw[-1] if cw else 0.0))
        kw = len(str(max(t.count - 1, 0)))
        gw = len(str(max(groups - 1, 0)))
        name, prompt, negative, seed = t.name, t.prompt, t.negative, self.seed
        for g in range(groups):
            prefix = f"{name}-{g:0{gw}d}-" if per else f"{name}-"
            for k in range(t.count):
                rng = row_stream(row_key(seed, name, g, k))
                ctx = {per: g} if per else {}
                for v, n, cw, tot in draw:
                    if cw is None:
                        ctx[v] = int(next(rng) * n)
                    else:
                        j = bisect.bisect_right(cw, next(rng) * tot)
                        ctx[v] = j if j < n else n - 1
                yield (f"{prefix}{k:0{kw}d}", prompt.draw(rng, ctx),
                       negative.draw(rng, ctx) if negative is not None else None, name, ctx)

    def iter_batches(self, batch_rows: int = DEFAULT_ROW_GROUP_ROWS):
        """The expansion as ``pyarrow.RecordBatch`` es of at most ``batch_rows`` rows."""
        import pyarrow as pa

        schema = self.schema()
        has_neg = self.has_negative

        def batch(rows: list) -> pa.RecordBatch:
            ids, prompts, negs, tnames, ctxs = zip(*rows)
            arrays = [pa.array(ids, pa.string()), pa.array(prompts, pa.string())]
            if has_neg:
                arrays.append(pa.array(negs, pa.string()))
            arrays.append(pa.array(tnames, pa.string()))
            for c in self.columns:
                v, values = c.variable, c.values
                idx = [ctx.get(v) for ctx in ctxs]
                arrays.append(pa.array([None if j is None else values[j] for j in idx], c.arrow_type))
            return pa.RecordBatch.from_arrays(arrays, schema=schema)

        rows: list = []
        for row in self.iter_rows():
            rows.append(row)
            if len(rows) >= batch_rows:
                yield batch(rows)
                rows = []
        if rows:
            yield batch(rows)

    def rows(self, limit: int | None = None) -> Iterator[dict]:
        """Rows as dicts (column name -> value), for previews and tests."""
        for i, (rid, prompt, neg, tname, ctx) in enumerate(self.iter_rows()):
            if limit is not None and i >= limit:
                return
            row = {self.id_column: rid, "prompt": prompt}
            if self.has_negative:
                row["negative_prompt"] = neg
            row["template"] = tname
            for c in self.columns:
                j = ctx.get(c.variable)
                row[c.name] = None if j is None else c.values[j]
            yield row


def load_template(path: str | os.PathLike, *, seed: int | None = None, count: int | None = None,
                  limit: int | None = None, mode: str | None = None) -> PromptTemplate:
    """Parse and validate a template file; keyword arguments override its top-level keys."""
    import yaml

    from .spec import read_text_limited, strict_yaml_load

    path = Path(path)
    if not path.is_file():
        raise TemplateError(f"template {path}: no such file")
    try:
        text = read_text_limited(path, MAX_TEMPLATE_BYTES, "prompt template")
        data = strict_yaml_load(text, str(path), "prompt template")
    except InputError as exc:  # too large, not UTF-8, alias, duplicate key: the message names the file
        raise TemplateError(str(exc)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise TemplateError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: a template file is a YAML mapping with a 'templates' key")
    return PromptTemplate(path, data, text, seed=seed, count=count, limit=limit, mode=mode)


def expand_to_parquet(template: PromptTemplate | str | os.PathLike, out: str | os.PathLike, *,
                      row_group_rows: int = DEFAULT_ROW_GROUP_ROWS, storage_config=None, overwrite: bool = True,
                      progress=None) -> int:
    """Write the expansion of ``template`` to the Parquet file ``out`` (local or s3://); the row count.

    Row groups are written as they fill, so memory stays bounded whatever the row count (an S3
    object goes up as a multipart upload). The file appears only when complete
    (:meth:`batchgen.storage.Location.open_atomic`), so a reader never sees half a file.
    """
    import pyarrow.parquet as pq

    tpl = template if isinstance(template, PromptTemplate) else load_template(template)
    if row_group_rows < 1:
        raise ValueError(f"row_group_rows must be >= 1, got {row_group_rows}")
    from .storage import Location

    loc = Location.parse(os.fspath(out), storage_config)
    if not overwrite and loc.exists():
        raise InputError(f"--out {loc.uri} exists; pass --overwrite to replace it")
    schema = tpl.schema()
    written = 0
    # Published only when complete: interrupted, nothing (no truncated Parquet, no temp file) is left.
    with loc.open_atomic() as sink, pq.ParquetWriter(sink, schema) as writer:
        for batch in tpl.iter_batches(row_group_rows):
            writer.write_batch(batch, row_group_size=row_group_rows)
            written += batch.num_rows
            if progress is not None:
                progress(written, tpl.row_count())
    return written


# ----------------------------------------------------------------------------- CLI


def help_epilog() -> str:
    """The template format, prompt syntax, modes and output columns for ``prompts --help``: the
    module docstring's reference part (one text, so the help and the docstring cannot differ)."""
    doc = __doc__ or ""
    text = doc[doc.index("Template format"):doc.index("Rows are written")]
    return text.replace("``", "").replace("::\n", ":\n").rstrip() + "\n"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = help_epilog()
    parser.add_argument("template", help="template YAML file (format below)")
    parser.add_argument("--out", help="output Parquet file (local path or s3://...)")
    parser.add_argument("--seed", type=int, default=None, help="override the template's seed")
    parser.add_argument("--count", type=int, default=None,
                        help="sampled mode: rows per template (and per row of `per`) for every template")
    parser.add_argument("--limit", type=int, default=None, help="write only the first N rows (overrides 'limit')")
    parser.add_argument("--row-group-rows", type=int, default=DEFAULT_ROW_GROUP_ROWS, metavar="N",
                        help=f"rows per Parquet row group (default {DEFAULT_ROW_GROUP_ROWS})")
    parser.add_argument("--preview", type=int, default=None, metavar="N",
                        help="print the first N rows as JSON lines instead of writing (no --out needed)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default AWS_ENDPOINT_URL)")


def run(args) -> int:
    for name in ("seed", "count", "limit"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "seed" else 1):
            raise ValueError(f"--{name} must be >= {0 if name == 'seed' else 1}, got {value}")
    tpl = load_template(args.template, seed=args.seed, count=args.count, limit=args.limit)
    if args.preview is not None:
        for row in tpl.rows(args.preview):
            print(json.dumps(row, ensure_ascii=False))
        sys.stdout.flush()  # the rows before the count, also when both streams go to one pipe
        print(f"{tpl.row_count()} rows in all", file=sys.stderr)
        return 0
    if not args.out:
        raise ValueError("--out is required (or use --preview N)")
    storage_config = None
    if "://" in args.out and not args.out.startswith("file://"):
        from .storage import StorageConfig

        storage_config = StorageConfig(endpoint_url=args.endpoint_url)
    n = expand_to_parquet(tpl, args.out, row_group_rows=args.row_group_rows, storage_config=storage_config,
                          overwrite=args.overwrite)
    cols = [f.name for f in tpl.schema()]
    print(json.dumps({"rows": n, "out": args.out, "columns": cols, "id_column": tpl.id_column}))
    return 0


configure_prompts = configure
run_prompts = run
__all__ = ["load_template", "expand_to_parquet", "PromptTemplate", "TemplateError", "row_stream", "row_key"]
