"""Issue 9 hardening, usability: scripts that find the virtualenv, `generate --out`, `--version`,
sampler aliases, publishing exports without local paths, and the submit probe's decision."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchgen.cli import main
from batchgen.images import read_generation_parameters

REPO = Path(__file__).resolve().parents[1]


def test_nightly_script_finds_the_checkouts_venv_or_says_what_to_do(tmp_path):
    """Item 19: jobs/nightly.sh runs without an activated virtualenv."""
    root = tmp_path / "checkout"
    (root / "jobs").mkdir(parents=True)
    shutil.copy(REPO / "jobs" / "nightly.sh", root / "jobs" / "nightly.sh")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SAMPLERS": "ddim"}
    proc = subprocess.run(["bash", "jobs/nightly.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "command not found" not in proc.stderr
    assert "no batchgen found: run `make install`" in proc.stderr
    venv = root / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "batchgen").write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/calls.txt"\n')
    (venv / "batchgen").chmod(0o755)
    proc = subprocess.run(["bash", "jobs/nightly.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls[0].startswith("run jobs/nightly.yaml --overwrite --set sampling.sampler=ddim")
    assert calls[1].startswith("compare baselines/nightly/ddim out/nightly/ddim")


def test_baselines_are_ignored_by_git():
    """Item 19: rendered baselines do not show up as untracked files."""
    assert "baselines/" in (REPO / ".gitignore").read_text().split()


def test_version_flag(capsys):
    """Item 20."""
    from batchgen import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"batchgen {__version__}"


def test_generate_refuses_to_mix_outputs_and_takes_a1111_names(tmp_path, tiny_sd1, capsys):
    """Item 20: a non-empty --out needs --overwrite (and only our files are replaced); A1111 sampler
    names work; an unknown one gets a suggestion."""
    out = tmp_path / "out"
    args = ["generate", "--model", str(tiny_sd1), "--prompt", "a cat", "--steps", "2", "--width", "64",
            "--height", "64", "--out", str(out)]
    assert main(args + ["--prompt", "a dog", "--sampler", "Euler a"]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["0000-seed0.png", "0001-seed1.png"]
    assert read_generation_parameters(first["0000-seed0.png"])["sampler"] == "euler_a"
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds 2 image(s) of an earlier run; pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--seed", "5"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000-seed5.png"]
    (out / "notes.txt").write_text("mine")
    assert main(args + ["--overwrite"]) == 2
    assert "holds files `generate` did not write" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_sd1), "--prompt", "x", "--sampler", "eulr",
                 "--out", str(tmp_path / "o2")]) == 2
    assert "(did you mean 'euler'?)" in capsys.readouterr().err


def test_progress_bar_is_off_without_a_terminal(tmp_path):
    """Item 17: `generate`'s bar (usable from the Python API) draws only on a TTY."""
    import io

    from batchgen.generate import progress_bar

    buf = io.StringIO()
    progress = progress_bar(4, file=buf)
    progress(2, 4)
    progress(4, 4)
    progress.close()
    assert buf.getvalue() == ""
    import fcntl
    import select
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal's size
    try:
        with os.fdopen(slave, "w") as tty:
            progress = progress_bar(4, file=tty)
            progress(4, 4)
            progress.close()
        drawn = b""
        while select.select([master], [], [], 1.0)[0]:  # everything written, however it was split
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the slave side is closed and drained
                break
            if not chunk:
                break
            drawn += chunk
        drawn = drawn.decode(errors="replace")
    finally:
        os.close(master)
    assert "4/4" in drawn


def test_export_can_relativize_or_drop_provenance(tmp_path):
    """Item 20: absolute local paths and host:pid stay out of exports meant for publishing."""
    from tests.fixtures_regression import noise_image, write_job_output

    items = [dict(item_id=f"i{k}", image=noise_image(k), source_file=f"/srv/data/in/part-{k}.parquet",
                  worker=f"node-7:{1000 + k}", init_image="/home/me/init.png", model_uri="/srv/models/sd15")
             for k in range(2)]
    out = write_job_output(tmp_path / "job", items)
    (out / "job.json").write_text(json.dumps({"name": "x", "inputs": [
        {"uri": f"/srv/data/in/part-{k}.parquet", "rel": f"part-{k}.parquet"} for k in range(2)]}))
    assert main(["export", str(out), "--format", "parquet", "--to", str(tmp_path / "rel"),
                 "--provenance", "relative"]) == 0
    rows = pq.read_table(next((tmp_path / "rel" / "data").iterdir())).to_pylist()
    assert [r["source_file"] for r in rows] == ["part-0.parquet", "part-1.parquet"]
    assert [r["image_uri"] for r in rows] == ["images/i0.png", "images/i1.png"]
    assert {r["worker"] for r in rows} == {None} and {r["init_image"] for r in rows} == {"init.png"}
    assert {r["model_uri"] for r in rows} == {"sd15"}
    assert main(["export", str(out), "--format", "webdataset", "--to", str(tmp_path / "wds"),
                 "--provenance", "drop"]) == 0
    blob = b"".join(p.read_bytes() for p in (tmp_path / "wds").iterdir())
    assert b"/srv/" not in blob and b"node-7" not in blob and b"/home/me" not in blob
    names = pq.read_table(tmp_path / "wds" / "000000.parquet").column_names
    assert "source_file" not in names and "worker" not in names and "item_id" in names


def test_submit_ships_the_code_when_the_cluster_lacks_it():
    """Item 18: the probe's report decides; a missing torch is an error, not a failed job."""
    from batchgen.submit import SubmitError, local_code_info, shipping_decision

    local = local_code_info()
    same = {**local, "torch": "2.13.0", "ray": "2.60.0"}
    assert shipping_decision(local, same, None) == (False, None)
    assert shipping_decision(local, same, True) == (True, None)
    ship, note = shipping_decision(local, {"batchgen_error": "ModuleNotFoundError: No module named 'batchgen'",
                                           "torch": "2.13.0", "ray": "2.60.0"}, None)
    assert ship and "cannot import batchgen (ModuleNotFoundError" in note and "shipping" in note
    ship, note = shipping_decision(local, {**same, "batchgen_digest": "0" * 64}, None)
    assert ship and "other sources" in note
    ship, note = shipping_decision(local, {**same, "batchgen": "0.0.9"}, False)
    assert not ship and "--no-ship-code" in note
    with pytest.raises(SubmitError, match="cannot import torch"):
        shipping_decision(local, {**same, "torch_error": "ModuleNotFoundError: No module named 'torch'"}, None)
