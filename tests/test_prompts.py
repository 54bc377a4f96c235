"""`batchgen prompts`: template expansion (choices, wildcards, variables), both modes, the
Parquet it writes (ids, columns, types, row groups), determinism, streaming and errors."""

from __future__ import annotations

import collections
import hashlib
import json
import re
import struct
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.prompts import TemplateError, expand_to_parquet, load_template, row_key, row_stream

ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def prompts_of(path, **kw):
    return [r["prompt"] for r in load_template(path, **kw).rows()]


@pytest.fixture
def classes(tmp_path):
    write(tmp_path, "classes.csv", """
        name,id
        cat,0
        dog,1
        red fox,2
    """)
    return tmp_path


# ----------------------------------------------------------------------------- syntax


def test_inline_choices_combinatorial_order(tmp_path):
    t = write(tmp_path, "t.yaml", """
        mode: combinatorial
        templates: ["{a|b} {x|y|z}", "{a {1|2}|b}!{| very}"]
    """)
    tpl = load_template(t)
    rows = list(tpl.rows())
    assert [r["prompt"] for r in rows] == [
        "a x", "a y", "a z", "b x", "b y", "b z",  # first choice slowest
        "a 1!", "a 1! very", "a 2!", "a 2! very", "b!", "b! very",  # nesting, empty option
    ]
    assert [r["id"] for r in rows][:3] == ["t0-0", "t0-1", "t0-2"]
    assert [r["id"] for r in rows][6:8] == ["t1-0", "t1-1"]
    assert tpl.row_count() == 12 and [r["template"] for r in rows] == ["t0"] * 6 + ["t1"] * 6


def test_escapes_and_a1111_syntax_pass_through(tmp_path):
    t = write(tmp_path, "t.yaml", r"""
        count: 1
        templates:
          - 'a \{literal\} \| pipe, \_\_notawildcard__, (word:1.2) [a|b] \(x\) snake_case | top'
    """)
    assert prompts_of(t) == [r"a {literal} | pipe, __notawildcard__, (word:1.2) [a|b] \(x\) snake_case | top"]


def test_wildcards_files_folders_nesting_and_comments(tmp_path):
    write(tmp_path, "style.txt", "# a comment\n\noil\n  watercolor  \n")
    write(tmp_path, "wildcards/people/kids.txt", "a boy\na girl by __artist__\n")
    write(tmp_path, "wildcards/artist.txt", "ann\nbo\n")
    t = write(tmp_path, "t.yaml", """
        mode: combinatorial
        templates: ["__people/kids__, __style__"]
    """)
    assert prompts_of(t) == ["a boy, oil", "a boy, watercolor", "a girl by ann, oil", "a girl by ann, watercolor",
                             "a girl by bo, oil", "a girl by bo, watercolor"]
    # an explicit wildcards folder replaces the defaults
    write(tmp_path, "other/style.txt", "ink\n")
    t2 = write(tmp_path, "t2.yaml", """
        mode: combinatorial
        wildcards: other
        templates: ["__style__"]
    """)
    assert prompts_of(t2) == ["ink"]


def test_variables_one_row_per_item_typed_columns(classes):
    t = write(classes, "t.yaml", """
        mode: combinatorial
        variables:
          class: {file: classes.csv}
          color: [red, blue]
        templates:
          - name: photo
            prompt: "a {color} {class.name}, a {class.name} again"
    """)
    tpl = load_template(t)
    rows = list(tpl.rows())
    assert len(rows) == 6
    assert rows[0] == {"id": "photo-0", "prompt": "a red cat, a cat again", "template": "photo",
                       "class_name": "cat", "class_id": 0, "color": "red"}
    assert rows[5]["prompt"] == "a blue red fox, a red fox again" and rows[5]["class_id"] == 2
    schema = tpl.schema()
    assert schema.names == ["id", "prompt", "template", "class_name", "class_id", "color"]
    assert schema.field("class_id").type == pa.int64() and schema.field("color").type == pa.string()


def test_columns_mapping_and_variables_in_wildcards(classes):
    write(classes, "wildcards/scene.txt", "a {class.name} at {dawn|dusk}\n")
    t = write(classes, "t.yaml", """
        mode: combinatorial
        variables:
          class: {file: classes.csv}
          light: {values: [soft, hard]}
        columns: {label: class.id, class_name: class.name}
        templates:
          - "__scene__"
          - "{light} light"
    """)
    rows = list(load_template(t).rows())
    # the class used inside the wildcard file is an axis of t0; t1 does not use class -> null label
    assert [(r["prompt"], r["label"]) for r in rows[:2]] == [("a cat at dawn", 0), ("a cat at dusk", 0)]
    assert len(rows) == 3 * 2 + 2
    assert rows[-1] == {"id": "t1-1", "prompt": "hard light", "template": "t1", "label": None, "class_name": None}


def test_negative_prompts_default_and_null(tmp_path):
    t = write(tmp_path, "t.yaml", """
        count: 1
        negative_prompt: "blurry, {low|bad} quality"
        templates:
          - "a"
          - {prompt: "b", negative_prompt: "cartoon"}
          - {prompt: "c", negative_prompt: null}
    """)
    rows = list(load_template(t).rows())
    assert rows[0]["negative_prompt"] in ("blurry, low quality", "blurry, bad quality")
    assert rows[1]["negative_prompt"] == "cartoon"
    assert rows[2]["negative_prompt"] is None  # `run` falls back to the job's negative prompt


# ----------------------------------------------------------------------------- sampled mode


def test_sampled_per_class_ids_labels_and_determinism(classes, tmp_path):
    t = write(classes, "t.yaml", """
        seed: 5
        count: 4
        per: class
        variables:
          class: {file: classes.csv}
          color: [red, green, blue]
        columns: {label: class.id, class_name: class.name, color: color}
        templates:
          - name: photo
            prompt: "a {photo|painting} of a {color} {class.name}"
    """)
    tpl = load_template(t)
    rows = list(tpl.rows())
    assert len(rows) == 12 and tpl.row_count() == 12
    assert [r["id"] for r in rows[:5]] == ["photo-0-0", "photo-0-1", "photo-0-2", "photo-0-3", "photo-1-0"]
    assert [r["label"] for r in rows] == [0] * 4 + [1] * 4 + [2] * 4
    for r in rows:
        assert r["prompt"].endswith(f" of a {r['color']} {r['class_name']}")
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert expand_to_parquet(t, str(a)) == 12
    expand_to_parquet(load_template(t), str(b))
    assert a.read_bytes() == b.read_bytes()  # same template + seed: byte-identical file
    other = [r["prompt"] for r in load_template(t, seed=6).rows()]
    assert other != [r["prompt"] for r in rows]
    table = pq.read_table(a)
    assert table.schema.field("label").type == pa.int64()
    assert json.loads(table.schema.metadata[b"batchgen.prompts"])["seed"] == 5


def test_sampled_row_k_does_not_depend_on_other_rows(tmp_path):
    body = """
        seed: 11
        count: {n}
        templates: ["{{a|b|c|d}} {{1|2|3}} {{x|y}}"]
    """
    few = prompts_of(write(tmp_path, "few.yaml", body.format(n=5)))
    many = prompts_of(write(tmp_path, "many.yaml", body.format(n=500)))
    assert many[:5] == few
    assert len(set(many)) == 24  # all 4*3*2 combinations show up


def test_row_stream_is_blake2b_of_the_row_key():
    key = row_key(7, "photo", 2, 3)
    assert key == b"batchgen.prompts\x007\x00photo\x002\x003"
    stream = row_stream(key)
    words = struct.unpack(">8Q", hashlib.blake2b(key + (0).to_bytes(4, "big"), digest_size=64).digest())
    first = [next(stream) for _ in range(9)]
    assert first[:8] == [(w >> 11) / 2.0**53 for w in words]
    nxt = struct.unpack(">8Q", hashlib.blake2b(key + (1).to_bytes(4, "big"), digest_size=64).digest())[0]
    assert first[8] == (nxt >> 11) / 2.0**53


def test_sampled_weights(tmp_path):
    t = write(tmp_path, "t.yaml", """
        count: 4000
        variables:
          size: {values: [big, small], weights: [1, 3]}
        templates: ["{9::red|1::blue} {size}"]
    """)
    counts = collections.Counter(p.split()[0] for p in prompts_of(t))
    assert abs(counts["red"] / 4000 - 0.9) < 0.03
    sizes = collections.Counter(p.split()[1] for p in prompts_of(t))
    assert abs(sizes["small"] / 4000 - 0.75) < 0.03
    t0 = write(tmp_path, "z.yaml", 'count: 200\ntemplates: ["{0::never|1::always}"]\n')
    assert set(prompts_of(t0)) == {"always"}


def test_combinatorial_limit_keeps_ids(tmp_path):
    t = write(tmp_path, "t.yaml", """
        mode: combinatorial
        limit: 4
        templates: ["{a|b|c|d|e|f|g|h|i|j|k|l} {1|2}"]
    """)
    rows = list(load_template(t).rows())
    assert [r["id"] for r in rows] == ["t0-00", "t0-01", "t0-02", "t0-03"]  # padded for all 24 rows
    assert [r["prompt"] for r in rows] == ["a 1", "a 2", "b 1", "b 2"]
    assert len(list(load_template(t, limit=30).rows())) == 24


# ----------------------------------------------------------------------------- output, streaming


def test_streams_row_groups_and_is_lazy(tmp_path):
    t = write(tmp_path, "t.yaml", """
        seed: 1
        count: 50000
        templates:
          - name: big
            prompt: "a {red|green|blue} {cat|dog|bird|fish} in the {day|night}, {1|2|3|4|5|6|7|8|9}"
    """)
    out = tmp_path / "p.parquet"
    assert expand_to_parquet(t, str(out), row_group_rows=8192) == 50000
    meta = pq.ParquetFile(out).metadata
    assert meta.num_rows == 50000 and meta.num_row_groups == 7
    assert all(meta.row_group(i).num_rows <= 8192 for i in range(meta.num_row_groups))
    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == 50000 and all(ID_RE.match(i) for i in ids)
    assert ids[0] == "big-00000" and ids[-1] == "big-49999"
    assert not list(tmp_path.glob(".*.tmp"))  # written to a temp file, renamed into place
    # a huge combinatorial template yields its first rows at once (nothing is materialized)
    huge = write(tmp_path, "huge.yaml", 'mode: combinatorial\nlimit: 1000000000\ntemplates: ["'
                 + "{a|b|c|d|e|f|g|h|i|j}" * 12 + '"]\n')
    tpl = load_template(huge)
    assert tpl.row_count() == 10**9
    assert [r["prompt"] for r in tpl.rows(2)] == ["a" * 12, "a" * 11 + "b"]


def test_cli_writes_and_previews(classes, tmp_path, capsys):
    from batchgen.cli import main

    t = write(classes, "t.yaml", """
        count: 2
        per: class
        variables: {class: {file: classes.csv}}
        columns: {label: class.id}
        templates: ["a photo of a {class.name}"]
    """)
    out = tmp_path / "out" / "prompts.parquet"
    assert main(["prompts", str(t), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 6 and report["columns"] == ["id", "prompt", "template", "label"]
    assert pq.read_table(out).column("prompt").to_pylist()[::2] == ["a photo of a cat", "a photo of a dog",
                                                                     "a photo of a red fox"]
    assert main(["prompts", str(t), "--out", str(out)]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["prompts", str(t), "--out", str(out), "--overwrite", "--count", "1"]) == 0
    assert pq.read_metadata(out).num_rows == 3
    capsys.readouterr()
    assert main(["prompts", str(t), "--preview", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["t0-0-0", "t0-0-1"]


def test_writes_to_s3(s3_server, s3_bucket, tmp_path):
    from batchgen.storage import Location, StorageConfig

    t = write(tmp_path, "t.yaml", """
        seed: 3
        count: 10
        templates: ["a {red|green} {cat|dog}"]
    """)
    cfg = StorageConfig(endpoint_url=s3_server)
    uri = f"s3://{s3_bucket}/prompts/p.parquet"
    assert expand_to_parquet(t, uri, storage_config=cfg, row_group_rows=4) == 10
    local = tmp_path / "p.parquet"
    expand_to_parquet(t, str(local), row_group_rows=4)
    assert Location.parse(uri, cfg).read_bytes() == local.read_bytes()
    with pytest.raises(Exception, match="--overwrite"):
        expand_to_parquet(t, uri, storage_config=cfg, overwrite=False)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("prompt,message", [
    ("a {red|green", r"line 3, character 3 .*unbalanced '\{'"),
    ("a red} cat", r"line 3, character 6 .*unbalanced '\}'"),
    ("a {colr} cat", r"unknown variable \{colr\} \(variables: color\); did you mean 'color'\?"),
    ("__stlye__ cat", r"unknown wildcard __stlye__: no stlye.txt in .*did you mean __style__\?"),
    ("a {} cat", r"empty choice set '\{\}'"),
    ("a {big dog} x", r"neither a choice .* nor a variable reference"),
    ("a {color.name}", r"variable 'color' is a list of values, it has no fields"),
])
def test_errors_name_file_key_and_problem(tmp_path, prompt, message):
    write(tmp_path, "style.txt", "oil\n")
    t = write(tmp_path, "t.yaml", f"""
        variables: {{color: [red]}}
        templates:
          - {{name: x, count: 1, prompt: "{prompt}"}}
    """)
    with pytest.raises(TemplateError, match=message) as err:
        load_template(t)
    assert str(err.value).startswith(f"{t}, templates[0].prompt, line 3")


def test_errors_in_files_and_keys(tmp_path, classes):
    write(tmp_path, "wildcards/a.txt", "x\n__b__\n")
    write(tmp_path, "wildcards/b.txt", "# only\n__a__\n")
    write(tmp_path, "wildcards/empty.txt", "# nothing here\n\n")
    write(tmp_path, "wildcards/bad.txt", "ok\nnot {closed\n")
    cases = {
        "count: 1\ntemplates: ['__a__']\n": r"wildcards/b.txt, line 2, .*wildcard cycle __a__ -> __b__ -> __a__",
        "count: 1\ntemplates: ['__empty__']\n": r"empty choice set: wildcard file .*empty.txt has no lines",
        "count: 1\ntemplates: ['__bad__']\n": r"wildcards/bad.txt, line 2, character 5 .*unbalanced",
        "count: 1\nvariables: {c: []}\ntemplates: ['{c}']\n": r"variables.c, line 2: empty choice set: variable 'c'",
        "count: 1\nbogus: 2\ntemplates: ['x']\n": r"bogus, line 2: unknown key 'bogus'",
        "templates: ['x']\n": r"mode: sampled needs 'count'",
        "count: 1\ntemplates: [{name: a, prompt: x}, {name: a, prompt: y}]\n": r"duplicate template name 'a'",
        "count: 1\ntemplates: [{name: 'a b', prompt: x}]\n": r"template name 'a b' must be",
        "count: 1\nper: klass\nvariables: {k: [1]}\ntemplates: ['x']\n": r"per, line 2: unknown variable 'klass'",
        "mode: combinatorial\nper: k\nvariables: {k: [1]}\ntemplates: ['x']\n": r"'per' applies to mode: sampled",
        "count: 1\nvariables: {k: [1]}\ncolumns: {prompt: k}\ntemplates: ['{k}']\n": r"column 'prompt' clashes",
        "count: 1\nvariables: {k: {file: nope.csv}}\ntemplates: ['{k}']\n": r"variables.k.file, line 2: no such file",
        "count: 1\ntemplates: ['x'\n": r"line 3: not valid YAML",
        "count: 1\nmax_depth: 1\ntemplates: ['__a__']\n": r"nest deeper than max_depth=1 \(__a__ -> __b__\)",
    }
    for text, message in cases.items():
        t = write(tmp_path, "t.yaml", text)
        with pytest.raises(TemplateError, match=message):
            load_template(t)
    with pytest.raises(TemplateError, match="no such file"):
        load_template(tmp_path / "missing.yaml")
