"""Conditioned jobs: ControlNets in the model block, per-row control images (given or derived by
Canny), masks and outpainting, with files on a moto S3 server.

- pre-flight: every bad conditioning input is an error naming file, row and column, and nothing
  is written (no output folder appears);
- end to end on a local Ray: a ControlNet job whose control images and ControlNet come from S3
  survives a generator actor killed mid-job, records every conditioning file with its sha256,
  re-renders a missing image byte-identically on resume, rerenders items byte-identically,
  refuses a changed control image on resume naming it; an inpainting job with masks from S3 too;
- two ControlNets with a JSON list of control images per row: a driver SIGKILLed mid-job and run
  again gives every item exactly once, byte-equal to a clean run; a control image or ControlNet
  replaced after the pre-flight fails the items (or the worker's items) naming the file;
- compare names a changed control image even when the pixels are equal; the WebDataset export
  carries control images and masks beside the generated image.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchgen.errors import BatchgenError, InputError
from batchgen.spec import spec_from_dict

from .faults import prepare, run_job
from .fixtures_jobs import job_dict, write_prompts
from .fixtures_s3 import s3_client

CN = "builtin:tiny-sd1-controlnet"


def _png(path, size=(64, 64), seed=0, mode="RGB"):
    rng = np.random.RandomState(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    Image.fromarray(rng.randint(0, 255, shape).astype(np.uint8), mode).save(path)
    return str(path)


def _mask(path, size=(64, 64)):
    m = np.zeros((size[1], size[0]), np.uint8)
    m[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = 255
    Image.fromarray(m, "L").save(path)
    return str(path)


def _spec(inp, out, controlnets=(), **sections):
    model = {"uri": "builtin:tiny"}
    if controlnets:
        model["controlnets"] = [{"uri": u} for u in controlnets]
    return spec_from_dict(job_dict(inp, out, input={"id_column": "id", **sections.pop("input", {})}, model=model,
                                   **sections))


# ---- pre-flight ----------------------------------------------------------------------------------


def _refused(tmp_path, columns: dict, controlnets=(CN,), **sections) -> str:
    inp = write_prompts(tmp_path / "in.parquet", len(columns["id"]), **columns)
    out = tmp_path / "out"
    with pytest.raises(BatchgenError) as err:
        prepare(_spec(inp, out, controlnets, **sections))
    assert not out.exists(), "a refused pre-flight wrote something"
    return str(err.value)


def test_preflight_refuses_bad_conditioning_inputs(tmp_path):
    good = _png(tmp_path / "good.png")
    wide = _png(tmp_path / "wide.png", size=(64, 32))
    mask = _mask(tmp_path / "mask.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    ids = ["a", "b"]

    msg = _refused(tmp_path, dict(id=ids, control_image=[good, None]))
    assert "row 1, column 'control_image'" in msg and "every row needs a control image" in msg
    msg = _refused(tmp_path, dict(id=ids, control_image=[None, good]), controlnets=())
    assert "row 1, column 'control_image'" in msg and "no controlnets" in msg
    msg = _refused(tmp_path, dict(id=ids, control_image=[good, str(tmp_path / "gone.png")]))
    assert "row 1, column 'control_image'" in msg and "gone.png" in msg
    msg = _refused(tmp_path, dict(id=ids, control_image=[str(tmp_path / "junk.png"), good]))
    assert "row 0, column 'control_image'" in msg and "junk.png" in msg and "not a readable image" in msg
    msg = _refused(tmp_path, dict(id=ids, control_image=[good, good]), input={"max_init_image_pixels": 1000})
    assert "row 0, column 'control_image'" in msg and "more than input.max_init_image_pixels" in msg
    msg = _refused(tmp_path, dict(id=ids, control_image=[good, f'["{good}", "{good}"]']))
    assert "row 1, column 'control_image'" in msg and "2 control image(s) for 1 ControlNet" in msg
    msg = _refused(tmp_path, dict(id=ids, control_image=[good, good], control_preprocess=["canny", "sobel"]))
    assert "row 1, column 'control_preprocess'" in msg
    msg = _refused(tmp_path, dict(id=ids, mask_image=[None, mask]), controlnets=())
    assert "row 1, column 'mask_image'" in msg and "needs an init_image" in msg
    msg = _refused(tmp_path, dict(id=ids, init_image=[good, wide], mask_image=[mask, mask]), controlnets=())
    assert "row 1, column 'mask_image'" in msg and "aspect ratio" in msg
    msg = _refused(tmp_path, dict(id=ids, init_image=[good, good], mask_image=[mask, str(tmp_path / "nomask.png")]),
                   controlnets=())
    assert "row 1, column 'mask_image'" in msg and "nomask.png" in msg
    half = _mask(tmp_path / "half.png", size=(32, 32))
    msg = _refused(tmp_path, dict(id=ids, init_image=[good, good], mask_image=[mask, half], padding_mask_crop=[None, 8]),
                   controlnets=())
    assert "row 1, column 'mask_image'" in msg and "padding_mask_crop finds its region on the mask" in msg
    msg = _refused(tmp_path, dict(id=ids, control_image=[good, good]), controlnets=("builtin:tiny-sdxl-controlnet",))
    assert "model.controlnets[0] 'builtin:tiny-sdxl-controlnet'" in msg and "does not fit the model" in msg


# ---- end to end on S3 ----------------------------------------------------------------------------


def _put(client, bucket, key, path) -> str:
    client.put_object(Bucket=bucket, Key=key, Body=Path(path).read_bytes())
    return f"s3://{bucket}/{key}"


def test_conditioned_jobs_from_s3(tmp_path, s3_server, s3_bucket, ray_local, builtin_tiny):
    from batchgen.builtin import builtin_model_path
    from batchgen.compare import compare_outputs, format_summary
    from batchgen.export import export_output
    from batchgen.jobcli import rerender_item
    from batchgen.storage import StorageConfig

    client = s3_client(s3_server)
    cfg = StorageConfig(endpoint_url=s3_server)
    storage = {"endpoint_url": s3_server}
    cn_dir = Path(builtin_model_path("tiny-sd1-controlnet"))
    for path in cn_dir.rglob("*"):
        if path.is_file():
            _put(client, s3_bucket, f"cn/{path.relative_to(cn_dir).as_posix()}", path)
    controls = [_put(client, s3_bucket, f"cond/c{i}.png", _png(tmp_path / f"c{i}.png", seed=i)) for i in range(3)]
    ids = [f"i{k}" for k in range(6)]
    inp = write_prompts(tmp_path / "in" / "cn.parquet", 6, id=ids,
                        control_image=[controls[0], controls[1], controls[2], controls[0], controls[1], controls[2]],
                        control_preprocess=[None, None, None, "canny", "canny", "canny"],
                        canny_low=[None, None, None, 50, None, 80],
                        controlnet_conditioning_scale=[1.0, 0.5, None, None, 0.7, None])
    out = tmp_path / "out"
    spec = _spec(inp, out, (f"s3://{s3_bucket}/cn",), storage=storage, compute={"batches_per_call": 1})

    flag = tmp_path / "died.flag"
    result = run_job(spec, faults={"die_once": {"flag": str(flag), "on_call": 2}})
    assert flag.exists() and result.all_ok and result.total == 6
    rows = {r["item_id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    job = json.loads((out / "job.json").read_text())
    assert set(job["controlnet_sha256"]) == {f"s3://{s3_bucket}/cn"}
    assert set(job["condition_sha256"]) == set(controls)
    for r in rows.values():
        assert r["control_image_sha256"] == job["condition_sha256"][r["control_image"]]
    assert rows["i3"]["control_preprocess"] == "canny" and (rows["i3"]["canny_low"], rows["i3"]["canny_high"]) == (50, 200)
    # an item's bytes never depend on its batch-mates: every item alone (rerender) == as rendered
    for item in ("i1", "i4"):
        data, _ = rerender_item(str(out), item, s3_server)
        assert data == (out / "images" / f"{item}.png").read_bytes()
    # resume: a lost image is rendered again, byte-identically
    lost = (out / "images" / "i5.png").read_bytes()
    (out / "images" / "i5.png").unlink()
    again = run_job(spec)
    assert again.rendered_this_run == 1 and (out / "images" / "i5.png").read_bytes() == lost

    # export: the control image beside the generated one (a Canny map for the derived rows)
    wds = tmp_path / "wds"
    export_output(str(out), "webdataset", str(wds), storage_config=cfg, with_conditioning=True)
    with tarfile.open(wds / "000000.tar") as tar:
        names = set(tar.getnames())
        edges = np.asarray(Image.open(io.BytesIO(tar.extractfile("i3.control.png").read())))
    assert {"i0.png", "i0.control.png", "i3.control.png"} <= names
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) <= {0, 255}
    # the Parquet export: an Image column named as diffusers' ControlNet training scripts read it
    hf = tmp_path / "hf"
    export_output(str(out), "parquet", str(hf), storage_config=cfg, with_conditioning=True)
    table = pq.read_table(hf / "data" / "train-00000-of-00001.parquet")
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["conditioning_image"] == {"_type": "Image"} and "mask" not in table.column_names
    by_id = {r["item_id"]: r for r in table.to_pylist()}
    with tarfile.open(wds / "000000.tar") as tar:
        assert by_id["i3"]["conditioning_image"]["bytes"] == tar.extractfile("i3.control.png").read()

    # compare: a copy whose manifest records another control image sha (equal pixels) names it
    import shutil

    import pyarrow as pa

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    table = pq.read_table(copy / "manifest.parquet")
    shas = table.column("control_image_sha256").to_pylist()
    shas[0] = "0" * 64
    table = table.set_column(table.schema.get_field_index("control_image_sha256"), "control_image_sha256",
                             pa.array(shas, pa.string()))
    pq.write_table(table, copy / "manifest.parquet")
    summary = format_summary(compare_outputs(str(out), str(copy)))
    assert f"control_image {controls[0]} changed" in summary and "control_image_sha256 (1 items)" in summary

    # a control image replaced under the same URI: the resume is refused, naming it
    _put(client, s3_bucket, "cond/c1.png", _png(tmp_path / "c1-new.png", seed=9))
    with pytest.raises(InputError, match=r"conditioning file s3://.*/cond/c1\.png changed since this job started"):
        run_job(spec)

    # inpainting and outpainting rows with masks from S3, on the ordinary tiny model
    inits = [_put(client, s3_bucket, f"cond/init{i}.png", _png(tmp_path / f"init{i}.png", seed=10 + i))
             for i in range(2)]
    mask = _put(client, s3_bucket, "cond/mask.png", _mask(tmp_path / "mask.png", size=(32, 32)))
    inp2 = write_prompts(tmp_path / "in2" / "inpaint.parquet", 4, id=["m0", "m1", "o0", "p0"],
                         init_image=[inits[0], inits[1], inits[0], None], mask_image=[mask, mask, None, None],
                         mask_blur=[None, 2, None, None], outpaint_left=[None, None, 8, None])
    out2 = tmp_path / "out2"
    result = run_job(_spec(inp2, out2, storage=storage))
    assert result.all_ok, result
    rows = {r["item_id"]: r for r in pq.read_table(out2 / "manifest.parquet").to_pylist()}
    assert rows["m0"]["strength"] == 1.0 and rows["m0"]["mask_image_sha256"] and rows["m0"]["init_image_sha256"]
    assert rows["o0"]["mask_image"] is None and rows["o0"]["strength"] == 1.0
    data, _ = rerender_item(str(out2), "m1", s3_server)
    assert data == (out2 / "images" / "m1.png").read_bytes()
    export_output(str(out2), "parquet", str(tmp_path / "hf2"), storage_config=cfg, with_conditioning=True)
    table = pq.read_table(tmp_path / "hf2" / "data" / "train-00000-of-00001.parquet")
    masks = {r["item_id"]: r["mask"] for r in table.to_pylist()}
    assert "conditioning_image" not in table.column_names and masks["p0"] is None and masks["o0"] is None
    m1 = np.asarray(Image.open(io.BytesIO(masks["m1"]["bytes"])))
    assert m1.shape == (64, 64) and set(np.unique(m1)) <= {0, 255}  # binarized after the blur, as used


def test_controlnet_synthetic_walkthrough(tmp_path, ray_local, monkeypatch):
    """jobs/controlnet_synthetic.yaml: source images -> Canny -> 4 variations each -> WebDataset with
    the source label and the control image."""
    import runpy

    import yaml

    from batchgen.export import export_output

    repo = Path(__file__).resolve().parent.parent
    make_input = runpy.run_path(str(repo / "jobs" / "controlnet" / "make_input.py"))["make_input"]
    for label in ("cat", "dog"):
        (tmp_path / "src" / label).mkdir(parents=True)
        for i in range(2):
            _png(tmp_path / "src" / label / f"{i}.png", size=(96, 96), seed=hash(label) % 100 + i)
    monkeypatch.chdir(tmp_path)
    assert make_input(tmp_path / "src", "out/controlnet/input.parquet") == 4
    spec = yaml.safe_load((repo / "jobs" / "controlnet_synthetic.yaml").read_text())
    result = run_job(spec_from_dict(spec))
    assert result.all_ok and result.total == 16
    export_output("out/controlnet/render", "webdataset", "out/controlnet/wds", with_conditioning=True)
    with tarfile.open("out/controlnet/wds/000000.tar") as tar:
        names = tar.getnames()
        sample = json.loads(tar.extractfile("cat-0-3.json").read())
    assert {"cat-0-3.png", "cat-0-3.control.png", "dog-1-0.control.png"} <= set(names)
    assert sample["class_name"] == "cat" and sample["control_preprocess"] == "canny" and sample["source"] == "0.png"


# ---- multi-ControlNet: a driver killed mid-job, resumed; files changed under running workers --------


def _two_net_job(tmp_path, n: int):
    """A job with two ControlNets (a local copy of the builtin beside the builtin itself) and a
    JSON list of two control images per row."""
    import shutil

    from batchgen.builtin import builtin_model_path

    local_cn = tmp_path / "cn-copy"
    shutil.copytree(builtin_model_path("tiny-sd1-controlnet"), local_cn)
    src = tmp_path / "src"
    src.mkdir()
    controls = [_png(src / f"c{i}.png", seed=20 + i) for i in range(3)]
    ids = [f"m{k:02d}" for k in range(n)]
    lists = [json.dumps([controls[k % 3], controls[(k + 1) % 3]]) for k in range(n)]
    scales = [0.5 if k % 2 else None for k in range(n)]  # a row's value applies to each of its nets
    inp = write_prompts(tmp_path / "in" / "multi.parquet", n, id=ids, control_image=lists,
                        controlnet_conditioning_scale=scales)
    return inp, (CN, str(local_cn)), ids, controls


def test_multi_controlnet_driver_sigkill_then_resume(tmp_path, ray_local, ray_tmpdir, builtin_tiny):
    """A conditioned job whose driver is SIGKILLed mid-job and run again renders every item exactly
    once, each image byte-equal to a clean run of the same job."""
    import yaml

    from .faults import run_and_kill_driver
    from .fixtures_jobs import image_digests
    from .fixtures_ray import subprocess_env

    n = 8
    inp, nets, ids, _ = _two_net_job(tmp_path, n)
    clean = _spec(inp, tmp_path / "clean", nets, compute={"batches_per_call": 1})
    result = run_job(clean)
    assert result.all_ok and result.total == n
    reference = image_digests(tmp_path / "clean")
    rows = {r["item_id"]: r for r in pq.read_table(tmp_path / "clean" / "manifest.parquet").to_pylist()}
    assert json.loads(rows["m01"]["control_image"]) == json.loads(pq.read_table(inp).column("control_image")[1].as_py())
    assert len(set(reference.values())) == n  # every item drew its own image

    out = tmp_path / "out"
    spec = job_dict(inp, out, input={"id_column": "id"}, compute={"batches_per_call": 1},
                    model={"uri": "builtin:tiny", "controlnets": [{"uri": u} for u in nets]})
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = subprocess_env(ray_tmpdir, BATCHGEN_TEST_FAULTS=json.dumps({"sleep_per_call_s": 1.0, "part_max_rows": 2}))
    done_before = run_and_kill_driver(spec_path, out, env, parts=1)
    assert 0 < done_before < n
    again = run_job(spec_from_dict(spec))
    assert again.skipped >= done_before and again.rendered_this_run == n - again.skipped
    table = pq.read_table(out / "manifest.parquet")
    assert sorted(table.column("item_id").to_pylist()) == ids and set(table.column("status").to_pylist()) == {"ok"}
    assert image_digests(out) == reference
    from batchgen.export import export_output

    export_output(str(out), "parquet", str(tmp_path / "hf"), with_conditioning=True)
    table = pq.read_table(tmp_path / "hf" / "data" / "train-00000-of-00001.parquet")
    assert {"conditioning_image_0", "conditioning_image_1"} <= set(table.column_names)
    row = table.slice(1, 1).to_pylist()[0]
    assert row["conditioning_image_0"]["bytes"] != row["conditioning_image_1"]["bytes"]


def test_workers_refuse_files_changed_after_the_preflight(tmp_path, ray_local, builtin_tiny):
    """Bytes that change between the pre-flight and the worker's read are never rendered: a control
    image fails its items naming the file; a ControlNet fails every item naming it. Nothing else is
    lost: the other items are written."""
    import shutil

    from safetensors.torch import load_file, save_file

    from batchgen.job.preflight import prepare as prepare_plain
    from batchgen.job.run import execute

    inp, nets, ids, controls = _two_net_job(tmp_path, 6)
    out = tmp_path / "out"
    plan = prepare_plain(_spec(inp, out, nets, compute={"batches_per_call": 1}), max_failures=6)
    try:
        shutil.copy(_png(tmp_path / "other.png", seed=99), controls[2])  # used by rows 1, 2, 4, 5
        result = execute(plan)
    finally:
        plan.release()
    rows = {r["item_id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    failed = sorted(k for k, r in rows.items() if r["status"] == "failed")
    assert failed == ["m01", "m02", "m04", "m05"] and result.failed == 4
    assert f"control_image {controls[2]} changed since the pre-flight" in rows["m01"]["error"]
    assert (out / "images" / "m00.png").exists() and (out / "images" / "m03.png").exists()

    out2 = tmp_path / "out2"
    plan = prepare_plain(_spec(inp, out2, nets, compute={"batches_per_call": 1}), max_failures=6)
    try:
        weights = next(Path(nets[1]).rglob("*.safetensors"))
        state = load_file(str(weights))
        key = next(iter(state))
        state[key] = state[key] + 1.0
        save_file(state, str(weights))
        result = execute(plan)
    finally:
        plan.release()
    rows = pq.read_table(out2 / "manifest.parquet").to_pylist()
    assert result.failed == 6 and {r["status"] for r in rows} == {"failed"}
    assert f"ControlNet {nets[1]} changed since the pre-flight" in rows[0]["error"]


def test_controlnet_and_mask_in_one_row(tmp_path, ray_local, builtin_tiny):
    """Rows with a control image and a mask (ControlNet inpainting), beside rows with a control
    image only: they render in their own model calls, and rerender byte-identically."""
    from batchgen.jobcli import rerender_item

    init, mask = _png(tmp_path / "init.png", seed=3), _mask(tmp_path / "mask.png")
    photo, photo_mask = _png(tmp_path / "photo.png", size=(96, 72), seed=5), _mask(tmp_path / "pm.png", (96, 72))
    control = _png(tmp_path / "control.png", seed=4)
    inp = write_prompts(tmp_path / "in.parquet", 4, id=["cm0", "cm1", "c2", "cp3"], control_image=[control] * 4,
                        init_image=[init, init, None, photo], mask_image=[mask, mask, None, photo_mask],
                        controlnet_conditioning_scale=[None, 1.2, None, None],
                        padding_mask_crop=[None, None, None, 4])
    out = tmp_path / "out"
    result = run_job(_spec(inp, out, (CN,)))
    assert result.all_ok and result.total == 4
    rows = {r["item_id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert rows["cm0"]["mask_image_sha256"] and rows["cm0"]["control_image_sha256"] == rows["c2"]["control_image_sha256"]
    # padding_mask_crop: rendered from the mask's region, pasted back: the photo's size
    assert Image.open(out / "images" / "cp3.png").size == (96, 72) and rows["cp3"]["padding_mask_crop"] == 4
    for item in ("cm0", "cm1", "cp3"):
        data, _ = rerender_item(str(out), item)
        assert data == (out / "images" / f"{item}.png").read_bytes()


# ---- IP-Adapter: reference images per row ----------------------------------------------------------


def test_ip_adapter_jobs_with_reference_images_from_s3(tmp_path, s3_server, s3_bucket, ray_local, builtin_tiny):
    """model.ip_adapter + an ip_adapter_image per row from S3: pre-flight refusals naming row and
    column; a worker killed mid-job; a lost image rendered again byte-identically; rerender; the
    files recorded with their sha256; a reference replaced on S3 refused on resume, naming it."""
    from batchgen.jobcli import rerender_item
    from batchgen.storage import StorageConfig

    client = s3_client(s3_server)
    storage = {"endpoint_url": s3_server}
    refs = [_put(client, s3_bucket, f"ref/r{i}.png", _png(tmp_path / f"r{i}.png", size=(80, 48), seed=30 + i))
            for i in range(2)]
    ip = {"uri": "builtin:tiny-sd1-ip-adapter"}
    ids = [f"p{k}" for k in range(5)]

    def spec(inp, out, **model):
        return spec_from_dict(job_dict(inp, out, input={"id_column": "id"}, storage=storage,
                                       compute={"batches_per_call": 1},
                                       model={"uri": "builtin:tiny", **model}))

    # pre-flight: nothing written, the row and column named
    bad = write_prompts(tmp_path / "bad" / "a.parquet", 2, id=["a", "b"], ip_adapter_image=[refs[0], None])
    with pytest.raises(BatchgenError, match=r"row 1, column 'ip_adapter_image'.*every row needs a reference image"):
        prepare(spec(bad, tmp_path / "nope", ip_adapter=ip))
    with pytest.raises(BatchgenError, match=r"row 0, column 'ip_adapter_image'.*no ip_adapter"):
        prepare(spec(bad, tmp_path / "nope"))
    with pytest.raises(BatchgenError, match=r"model.ip_adapter 'builtin:tiny-sdxl-ip-adapter'"):
        prepare(spec(write_prompts(tmp_path / "bad2" / "a.parquet", 1, id=["a"], ip_adapter_image=[refs[0]]),
                     tmp_path / "nope", ip_adapter={"uri": "builtin:tiny-sdxl-ip-adapter"}))
    gone = write_prompts(tmp_path / "bad3" / "a.parquet", 1, id=["a"], ip_adapter_image=[f"s3://{s3_bucket}/ref/x.png"])
    with pytest.raises(BatchgenError, match=r"row 0, column 'ip_adapter_image'.*ref/x\.png"):
        prepare(spec(gone, tmp_path / "nope", ip_adapter=ip))
    assert not (tmp_path / "nope").exists()

    inp = write_prompts(tmp_path / "in" / "ip.parquet", 5, id=ids, ip_adapter_image=[refs[k % 2] for k in range(5)],
                        ip_adapter_scale=[None, 0.5, 0.0, 1.5, None])
    out = tmp_path / "out"
    flag = tmp_path / "died.flag"
    result = run_job(spec(inp, out, ip_adapter=ip), faults={"die_once": {"flag": str(flag), "on_call": 2}})
    assert flag.exists() and result.all_ok and result.total == 5
    rows = {r["item_id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    job = json.loads((out / "job.json").read_text())
    assert "builtin:tiny-sd1-ip-adapter" in job["ip_adapter_sha256"] and len(job["ip_adapter_sha256"]) == 2
    assert rows["p1"]["ip_adapter_image"] == refs[1] and rows["p1"]["ip_adapter_scale"] == 0.5
    assert rows["p1"]["ip_adapter_image_sha256"] == job["condition_sha256"][refs[1]]
    for item in ("p1", "p3"):
        data, _ = rerender_item(str(out), item, s3_server)
        assert data == (out / "images" / f"{item}.png").read_bytes()
    from batchgen.export import export_output

    export_output(str(out), "parquet", str(tmp_path / "hf"), storage_config=StorageConfig(endpoint_url=s3_server),
                  with_conditioning=True)
    table = pq.read_table(tmp_path / "hf" / "data" / "train-00000-of-00001.parquet")
    by_id = {r["item_id"]: r for r in table.to_pylist()}
    assert Image.open(io.BytesIO(by_id["p1"]["reference_image"]["bytes"])).size == (80, 48)  # as given
    lost = (out / "images" / "p4.png").read_bytes()
    (out / "images" / "p4.png").unlink()
    again = run_job(spec(inp, out, ip_adapter=ip))
    assert again.rendered_this_run == 1 and (out / "images" / "p4.png").read_bytes() == lost

    _put(client, s3_bucket, "ref/r1.png", _png(tmp_path / "r1-new.png", size=(80, 48), seed=77))
    with pytest.raises(InputError, match=r"conditioning file s3://.*/ref/r1\.png changed since this job started"):
        run_job(spec(inp, out, ip_adapter=ip))
