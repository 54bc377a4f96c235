"""Issue 9, items 9, 3 and 10: credentials in endpoint URLs are refused and never echoed (CLI
options, ``--set``, ``submit --env``); spec and template files are read with bounded size and no
YAML aliases or duplicate keys; the init-image pixel limit changes no process-wide state."""

from __future__ import annotations

import os
import struct
import threading
import time
import types
import warnings
import zlib

import numpy as np
import pytest
import yaml

from batchgen.cli import main
from batchgen.errors import InputError
from batchgen.prompts import TemplateError, load_template
from batchgen.spec import MAX_SPEC_BYTES, load_spec, read_spec_file, spec_from_dict
from batchgen.storage import StorageConfig

SECRET = "s3cr3tKEYvalue"
KEY_ID = "AKIAKEYID42"


def _spec_file(tmp_path, **extra):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"input": {"uri": "s3://bucket/prompts/"}, "model": {"uri": "builtin:tiny"},
                                    "output": {"uri": str(tmp_path / "out")}, **extra}))
    return path


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb, header-wise)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- item 9: credentials


@pytest.mark.parametrize("endpoint", [f"http://{KEY_ID}:{SECRET}@minio:9000",
                                      f"http://{KEY_ID}:ab/{SECRET}@minio:9000",  # secret keys may hold '/'
                                      f"{KEY_ID}:{SECRET}@minio:9000"])
@pytest.mark.parametrize("command", ["status", "export", "compare"])
def test_endpoint_url_option_is_refused_without_echoing_the_secret(tmp_path, capsys, command, endpoint):
    """(a) --endpoint-url with user-info: a clean one-line error naming the setting; pydantic's
    'input_value=...' never reaches the terminal."""
    args = {"status": ["status", str(tmp_path / "out")],
            "export": ["export", str(tmp_path / "out"), "--format", "parquet", "--to", str(tmp_path / "exp")],
            "compare": ["compare", str(tmp_path / "a"), str(tmp_path / "b")]}[command]
    assert main([*args, "--endpoint-url", endpoint]) == 2
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert SECRET not in printed and KEY_ID not in printed
    assert "endpoint_url must not contain user:password@" in printed
    assert "validation error" not in printed and "input_value" not in printed
    assert not (tmp_path / "exp").exists()


def test_storage_config_errors_hold_no_secret(monkeypatch):
    """(a) The ValueError itself (str, repr, chained causes) carries no credentials, and the
    environment variables are checked by name, AWS_ENDPOINT_URL_S3 included."""
    with pytest.raises(ValueError) as err:
        StorageConfig(endpoint_url=f"https://{KEY_ID}:{SECRET}@minio.example")
    assert SECRET not in str(err.value) and SECRET not in repr(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert "(got 'https://***@minio.example')" in str(err.value)
    with pytest.raises(ValueError, match="endpoint_url must look like http"):
        StorageConfig(endpoint_url="http://minio:notaport")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{KEY_ID}:{SECRET}@minio:9000")
    with pytest.raises(ValueError) as err:
        StorageConfig().resolved_endpoint()
    assert str(err.value).startswith("AWS_ENDPOINT_URL_S3 must not contain user:password@")
    assert SECRET not in str(err.value) and KEY_ID not in str(err.value)


@pytest.mark.parametrize("value", [f"http://{KEY_ID}:{SECRET}@h:9", f"http://{KEY_ID}:{SECRET}/x@h:9",
                                   f"{KEY_ID}:{SECRET}@h:9"])
def test_set_endpoint_url_is_refused_and_the_set_echo_is_redacted(tmp_path, capsys, value):
    """(b) --set storage.endpoint_url=http://KEY:SECRET@host: the error names the --set with the
    user-info replaced, for `run` and `submit` alike; a '/' in the secret does not sneak it past."""
    spec = _spec_file(tmp_path)
    with pytest.raises(InputError) as err:
        load_spec(spec, [f"storage.endpoint_url={value}"])
    msg = str(err.value)
    assert SECRET not in msg and KEY_ID not in msg
    assert "--set 'storage.endpoint_url=" in msg and "***@h:9'" in msg
    assert "key 'storage.endpoint_url': must not contain user:password@" in msg
    for argv in (["run", str(spec)], ["submit", str(spec), "--address", "http://127.0.0.1:1", "--no-check"]):
        assert main([*argv, "--set", f"storage.endpoint_url={value}"]) == 2
        captured = capsys.readouterr()
        assert SECRET not in captured.out + captured.err and KEY_ID not in captured.out + captured.err
        assert "must not contain user:password@" in captured.err


def test_spec_errors_elsewhere_redact_urls(tmp_path):
    """(b) Other echoes of spec text: a YAML syntax error's snippet, a nested bad value, a --set
    that YAML refuses."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'input: {{uri: x}}\noutput: {{uri: o}}\nstorage: {{endpoint_url: "http://{KEY_ID}:{SECRET}@h\n')
    with pytest.raises(InputError) as err:
        read_spec_file(bad)
    assert "not valid YAML" in str(err.value) and SECRET not in str(err.value) and "http://***@h" in str(err.value)
    spec = _spec_file(tmp_path)
    for item in (f"storage.endpoint_url.x=http://{KEY_ID}:{SECRET}@h",
                 f"storage.endpoint_url={{a: &x 'http://{KEY_ID}:{SECRET}@h', b: *x}}",
                 f"storage.endpoint_url=[http://{KEY_ID}:{SECRET}@h, 2]"):
        with pytest.raises(InputError) as err:
            load_spec(spec, [item])
        assert SECRET not in str(err.value) and KEY_ID not in str(err.value), item


@pytest.mark.parametrize("key, value, expected", [
    ("AWS_ENDPOINT_URL", f"http://{KEY_ID}:{SECRET}@minio:9000", "--env AWS_ENDPOINT_URL contains user:password@"),
    ("AWS_ENDPOINT_URL_S3", f"http://{KEY_ID}:{SECRET}@minio:9000",
     "--env AWS_ENDPOINT_URL_S3 contains user:password@"),
    ("AWS_ENDPOINT_URL", f"http://{KEY_ID}:a/{SECRET}@minio:9000", "--env AWS_ENDPOINT_URL contains user:password@"),
    ("AWS_SECRET_ACCESS_KEY", SECRET, "--env AWS_SECRET_ACCESS_KEY: credentials are never sent with a job"),
    ("AWS_SESSION_TOKEN", SECRET, "--env AWS_SESSION_TOKEN: credentials are never sent with a job"),
    ("HF_ENDPOINT", f"https://{KEY_ID}:{SECRET}@hf.example", "--env HF_ENDPOINT: the value holds a URL with user:"),
])
def test_submit_env_refuses_credentials(tmp_path, monkeypatch, key, value, expected):
    """(c) `submit --env` goes into runtime_env env_vars (shown by the dashboard): credentials
    are refused there, before anything is staged, and the message names only the variable."""
    from batchgen.submit import prepare_submission

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InputError) as err:
        prepare_submission(_spec_file(tmp_path), extra_env={key: value}, staging_dir=tmp_path / "staging")
    assert expected in str(err.value)
    assert SECRET not in str(err.value) and KEY_ID not in str(err.value)
    assert not (tmp_path / "staging").exists()


def test_submit_env_cli_never_prints_the_secret(tmp_path, capsys, monkeypatch):
    """(c) The same through the CLI, including a malformed --env argument (not echoed either)."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    spec = str(_spec_file(tmp_path))
    for env in (f"AWS_ENDPOINT_URL=http://{KEY_ID}:{SECRET}@h", SECRET, f"AWS_SECRET_ACCESS_KEY={SECRET}"):
        assert main(["submit", spec, "--address", "http://127.0.0.1:1", "--no-check", "--env", env]) == 2
        captured = capsys.readouterr()
        assert SECRET not in captured.out + captured.err and KEY_ID not in captured.out + captured.err
        assert "--env" in captured.err


def test_endpoint_s3_variable_is_honoured_and_forwarded_alike(tmp_path, monkeypatch):
    """AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL here, so it travels with the job too (the
    cluster then resolves the same endpoint); with credentials in it, submit refuses it."""
    from batchgen.submit import prepare_submission

    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9001/")
    assert StorageConfig().resolved_endpoint() == "http://127.0.0.1:9001"
    sub = prepare_submission(_spec_file(tmp_path), staging_dir=tmp_path / "s1")
    assert sub.runtime_env["env_vars"] == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                                           "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9001/"}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{KEY_ID}:{SECRET}@minio:9000")
    with pytest.raises(InputError) as err:
        prepare_submission(_spec_file(tmp_path), staging_dir=tmp_path / "s2")
    msg = str(err.value)
    assert msg.startswith("AWS_ENDPOINT_URL_S3 contains user:password@ (got 'http://***@minio:9000'); it would be "
                          "sent to the cluster")
    assert SECRET not in msg and KEY_ID not in msg
    # an --env value replaces the local one (and is what gets checked)
    sub = prepare_submission(_spec_file(tmp_path), extra_env={"AWS_ENDPOINT_URL_S3": "http://minio:9000"},
                             staging_dir=tmp_path / "s3")
    assert sub.runtime_env["env_vars"]["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    with pytest.raises(InputError, match=r"^--env AWS_ENDPOINT_URL must look like http\(s\)://host\[:port\], "
                                         r"got 'minio:9000'"):
        prepare_submission(_spec_file(tmp_path), extra_env={"AWS_ENDPOINT_URL": "minio:9000"},
                           staging_dir=tmp_path / "s4")


# ----------------------------------------------------------------------------- item 3: bounded, strict YAML


def test_spec_file_read_is_bounded_for_a_fifo(tmp_path):
    """A FIFO reports size 0 to stat: the reader must still stop after MAX_SPEC_BYTES + 1 bytes
    instead of reading whatever the writer sends."""
    fifo = tmp_path / "job.yaml"
    os.mkfifo(fifo)
    written = [0]
    cap = 32 << 20

    def writer() -> None:
        chunk = b"#" * (1 << 16)
        try:
            with open(fifo, "wb") as fh:
                while written[0] < cap:
                    fh.write(chunk)
                    written[0] += len(chunk)
        except BrokenPipeError:  # the reader stopped reading: what we want
            pass

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        with pytest.raises(InputError) as err:
            read_spec_file(fifo)
    finally:
        thread.join(timeout=30)
        if thread.is_alive():  # never opened by the reader: unblock the writer's open()
            with open(fifo, "rb") as fh:
                while fh.read(1 << 20):
                    pass
            thread.join(timeout=30)
    assert str(fifo) in str(err.value) and "too large for a job spec" in str(err.value)
    assert written[0] < MAX_SPEC_BYTES + (4 << 20), f"read {written[0]} bytes of a FIFO"


def test_prompt_template_refuses_aliases_duplicates_and_large_files(tmp_path, monkeypatch):
    """Prompt templates follow the spec's YAML rules: no aliases (billion laughs), no duplicate
    keys, a size limit; errors name the file and the line."""
    import batchgen.prompts as prompts

    alias = tmp_path / "alias.yaml"
    alias.write_text("count: 1\nvariables:\n  a: &a [x, y]\n  b: *a\ntemplates: ['{a} {b}']\n")
    with pytest.raises(TemplateError) as err:
        load_template(alias)
    assert str(err.value).startswith(f"{alias}, line 4: YAML alias '*a' is not allowed in a prompt template")

    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("count: 1\nvariables:\n" + "".join(f"  {line}\n" for line in lines) + "templates: ['{a9}']\n")
    start = time.monotonic()
    with pytest.raises(TemplateError, match=r"line 4: YAML alias '\*a0'"):
        load_template(bomb)
    assert time.monotonic() - start < 5

    dup = tmp_path / "dup.yaml"
    dup.write_text("count: 1\ncount: 2\ntemplates: ['x']\n")
    with pytest.raises(TemplateError, match=rf"^{dup}, line 2: duplicate key 'count' \(first on line 1\)"):
        load_template(dup)

    monkeypatch.setattr(prompts, "MAX_TEMPLATE_BYTES", 100)
    big = tmp_path / "big.yaml"
    big.write_text("count: 1\ntemplates: ['x']\n# " + "x" * 200 + "\n")
    with pytest.raises(TemplateError, match=rf"^{big}: \d+ bytes is too large for a prompt template"):
        load_template(big)


def test_yaml_table_files_of_a_template_are_strict_too(tmp_path, monkeypatch):
    """A variable's .yaml table file: aliases and duplicate keys refused, size bounded; the error
    names the template key, the table file and its line."""
    import batchgen.prompts as prompts

    table = tmp_path / "classes.yaml"
    template = tmp_path / "t.yaml"
    template.write_text("count: 1\nvariables: {c: {file: classes.yaml}}\ntemplates: ['{c.name}']\n")
    table.write_text("- {name: cat, id: 1}\n- {name: dog, id: 2}\n")
    assert load_template(template).row_count() == 1

    table.write_text("- &row {name: cat, id: 1}\n- *row\n")
    with pytest.raises(TemplateError) as err:
        load_template(template)
    msg = str(err.value)
    assert "variables.c.file" in msg and f"{table}, line 2: YAML alias '*row' is not allowed" in msg

    table.write_text("- {name: cat, id: 1, name: dog}\n")
    with pytest.raises(TemplateError, match=rf"{table}, line 1: duplicate key 'name'"):
        load_template(template)

    monkeypatch.setattr(prompts, "MAX_TEMPLATE_BYTES", 150)  # the template fits, the table does not
    table.write_text("".join(f"- {{name: cat{i}, id: {i}}}\n" for i in range(20)))
    with pytest.raises(TemplateError, match=rf"variables.c.file.*{table}: \d+ bytes is too large for a table file"):
        load_template(template)


# ----------------------------------------------------------------------------- item 10: pixel limit


def test_read_init_image_changes_no_process_wide_state(tmp_path, monkeypatch):
    """The limit is checked from the header without touching PIL.Image.MAX_IMAGE_PIXELS or the
    warning filters (both process-wide: another thread's Image.open would lose its protection)."""
    from PIL import Image

    from batchgen.stages import read_init_image

    small = tmp_path / "small.png"
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(small)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(20000, 20000))
    writes: list[tuple[str, object]] = []

    class Spy(types.ModuleType):
        def __setattr__(self, name, value):
            if name in ("MAX_IMAGE_PIXELS", "filters"):
                writes.append((name, value))
            super().__setattr__(name, value)

    monkeypatch.setattr(Image, "__class__", Spy)
    monkeypatch.setattr(warnings, "__class__", Spy)
    try:
        assert read_init_image(str(small), None, 10_000).size == (64, 64)
        with pytest.raises(ValueError, match=r"20000x20000 pixels \(400.0 Mpx\) is more than "
                                             r"input.max_init_image_pixels \(40 Mpx\); not decoded"):
            read_init_image(str(bomb), None)
    finally:
        monkeypatch.undo()
    assert writes == [], f"read_init_image changed process-wide state: {writes}"


def test_init_image_limit_is_independent_of_pillows_global(tmp_path, monkeypatch):
    """Our limit alone decides: a strict global Pillow limit does not refuse an allowed image,
    and Pillow's check switched off does not let a too-large one through."""
    from PIL import Image

    from batchgen.stages import read_init_image

    small = tmp_path / "small.png"
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(small)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(13000, 13000))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow alone would refuse 64x64 (> 2 x 100)
    assert read_init_image(str(small), None, 10_000).size == (64, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ValueError, match=r"13000x13000 pixels \(169.0 Mpx\) is more than"):
        read_init_image(str(bomb), None)
    with pytest.raises(ValueError, match=r"64x64 pixels \(0.0 Mpx\) is more than input.max_init_image_pixels"):
        read_init_image(str(small), None, 4095)


@pytest.mark.parametrize("value", [0, -1, -40_000_000])
def test_non_positive_pixel_limit_is_refused(tmp_path, value):
    """input.max_init_image_pixels must be >= 1, with a message that says what the number is;
    read_init_image refuses such a limit too instead of reading 0 as 'the default'."""
    from PIL import Image

    from batchgen.stages import read_init_image

    with pytest.raises(InputError) as err:
        spec_from_dict({"input": {"uri": "x", "max_init_image_pixels": value}, "output": {"uri": "o"}})
    assert (f"key 'input.max_init_image_pixels': must be a positive number of pixels (width x height), "
            f"got {value}") in str(err.value)
    small = tmp_path / "small.png"
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(small)
    with pytest.raises(ValueError, match=rf"max_init_image_pixels must be a whole number of pixels >= 1, got {value}"):
        read_init_image(str(small), None, value)
