"""Jobs beyond SD 1.x: the settings table, family defaults and the new per-row columns end to end.

Real Ray jobs on tiny models: an SDXL job with per-row micro-conditioning, per-row LoRAs,
passthrough labels and several images per prompt; a DiT job whose class labels reach the manifest
and both exports; a FLUX job from a single-file checkpoint; a job with CLIP scores; and the
pre-flight errors of these features, which fail before Ray starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.errors import CheckpointError, InputError
from batchgen.jobcli import rerender_item
from batchgen.runner import run_job
from batchgen.spec import spec_from_dict
from tests.test_lora import _pairs, _peft
from tests.test_scoring import clip_dir  # noqa: F401 - a fixture of this module too

from .fixtures_jobs import job_dict, write_prompts


def _manifest(out: Path) -> dict[str, dict]:
    return {r["item_id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}


def _rerenders_identically(out: Path, item_id: str) -> None:
    data, row = rerender_item(str(out), item_id)
    assert data == Path(row["image_uri"]).read_bytes(), item_id


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory):
    """A PEFT LoRA for two attention projections of the tiny SDXL UNet."""
    from batchgen import load_pipeline
    from batchgen.builtin import builtin_model_path

    pipe = load_pipeline(builtin_model_path("tiny-sdxl"), device="cpu")
    names = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
             "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"]
    return _peft(tmp_path_factory.mktemp("lora") / "style.safetensors", {"unet": _pairs(pipe.unet, names, 4, 7, 1.0)})


def test_sdxl_job_with_row_settings_loras_labels_and_images_per_prompt(tmp_path, ray_local, sdxl_lora):
    inp, out = tmp_path / "p.parquet", tmp_path / "out"
    lora = json.dumps([{"uri": str(sdxl_lora), "scale": 0.8}])
    write_prompts(inp, 3, id=["a", "b", "c"], label=pa.array([0, 1, 1], pa.int64()),
                  original_width=pa.array([1024, None, 2048], pa.int32()),
                  loras=pa.array([None, lora, None], pa.string()), seed=pa.array([5, 6, 7], pa.int64()))
    data = job_dict(inp, out, model={"uri": "builtin:tiny-sdxl"},
                    input={"id_column": "id", "passthrough": ["label"]},
                    sampling={"images_per_prompt": 2, "guidance_scale": None})
    result = run_job(spec_from_dict(data))
    assert result.all_ok and result.total == 6
    rows = _manifest(out)
    assert sorted(rows) == ["a-0", "a-1", "b-0", "b-1", "c-0", "c-1"]
    assert [rows[i]["seed"] for i in ("a-0", "a-1", "c-1")] == [5, 6, 8]  # row seed + image number
    assert {r["model_family"] for r in rows.values()} == {"sdxl"}
    assert {r["sampler"] for r in rows.values()} == {"euler"}  # "auto": the family's default
    assert {r["guidance_scale"] for r in rows.values()} == {5.0}  # None: the family's default
    assert rows["a-0"]["original_width"] == 1024 and rows["b-0"]["original_width"] is None
    assert rows["b-1"]["label"] == 1 and rows["a-0"]["image_index"] == 0 and rows["a-1"]["image_index"] == 1
    applied = json.loads(rows["b-0"]["loras"])
    assert applied[0]["uri"] == str(sdxl_lora) and applied[0]["scale"] == 0.8 and len(applied[0]["sha256"]) == 64
    assert rows["a-0"]["loras"] == "[]" and rows["c-0"]["loras"] == "[]"
    job = json.loads((out / "job.json").read_text())
    assert job["resolved"]["family"] == "sdxl" and job["resolved"]["sampler"] == "euler"
    # The LoRA item and the items rendered without it (the LoRA removed exactly) all rerender alone.
    for item in ("b-0", "c-1", "a-0"):
        _rerenders_identically(out, item)


def test_dit_job_labels_reach_the_manifest_and_both_exports(tmp_path, ray_local):
    import datasets
    import webdataset

    from batchgen.export import export_output

    inp, out = tmp_path / "p.parquet", tmp_path / "out"
    write_prompts(inp, 3, prompt=["tabby", "golden retriever", "417"])
    data = job_dict(inp, out, model={"uri": "builtin:tiny-dit"},
                    sampling={"width": None, "height": None, "guidance_scale": 4.0})
    assert run_job(spec_from_dict(data)).all_ok
    rows = sorted(_manifest(out).values(), key=lambda r: r["source_row"])
    assert [(r["class_id"], r["class_name"]) for r in rows] == [
        (281, "tabby, tabby cat"), (207, "golden retriever"), (417, "balloon")]
    assert {r["sampler"] for r in rows} == {"ddim"} and {r["width"] for r in rows} == {64}
    export_output(str(out), "webdataset", str(tmp_path / "wds"), shard_size=10)
    samples = list(webdataset.WebDataset(str(tmp_path / "wds" / "000000.tar"), shardshuffle=False).decode())
    assert sorted(s["cls"] for s in samples) == [207, 281, 417]
    export_output(str(out), "parquet", str(tmp_path / "hf"), shard_size=10)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "hf" / "data" / "*.parquet"), split="train")
    names = ds.features["label"].names
    assert names[281] == "tabby, tabby cat" and sorted(ds["label"]) == [207, 281, 417]


def test_flux_job_from_a_single_file_checkpoint(tmp_path, ray_local):
    from batchgen.tiny import make_tiny_single_file

    model = make_tiny_single_file(tmp_path / "flux.safetensors", "flux-schnell")
    inp, out = tmp_path / "p.parquet", tmp_path / "out"
    write_prompts(inp, 3)
    data = job_dict(inp, out, model={"uri": str(model)},
                    sampling={"steps": None, "guidance_scale": None, "width": 32, "height": 32})
    assert run_job(spec_from_dict(data)).all_ok
    rows = _manifest(out)
    assert {r["model_family"] for r in rows.values()} == {"flux"}
    assert {(r["sampler"], r["steps"]) for r in rows.values()} == {("flow_euler", 4)}  # schnell's defaults
    _rerenders_identically(out, sorted(rows)[1])


def test_zimage_job_with_cfg_rows_and_rerender(tmp_path, ray_local):
    """Z-Image end to end: the family's defaults (its flow sampler, guidance 0 = one model row per
    item), a per-row guidance that turns CFG on (its own settings group), a per-job Qwen3 length,
    img2img rows, and rerender byte-identical for each kind of item."""
    from PIL import Image

    Image.new("RGB", (40, 24), (200, 90, 30)).save(tmp_path / "init.png")
    inp = write_prompts(tmp_path / "p.parquet", 4, id=["a", "b", "c", "d"],
                        guidance_scale=[None, 3.0, None, None],
                        init_image=[None, None, str(tmp_path / "init.png"), None])
    out = tmp_path / "out"
    data = job_dict(inp, out, model={"uri": "builtin:tiny-zimage"}, input={"id_column": "id"},
                    sampling={"steps": None, "guidance_scale": None, "width": 32, "height": 32,
                              "max_sequence_length": 48})
    assert run_job(spec_from_dict(data)).all_ok
    rows = _manifest(out)
    assert {r["model_family"] for r in rows.values()} == {"zimage"}
    assert (rows["a"]["guidance_scale"], rows["b"]["guidance_scale"]) == (0.0, 3.0)
    assert rows["c"]["init_image"] and rows["a"]["max_sequence_length"] == 48
    for item in ("a", "b", "c"):
        _rerenders_identically(out, item)


def test_sd3_job_rerender_compare_and_exports(tmp_path, ray_local):
    """SD3 end to end: family defaults, a per-job T5 length, rerender, compare of two runs that
    differ in one setting, and both exports, with nothing family-specific in the job tools."""
    import datasets

    from batchgen.compare import compare_outputs
    from batchgen.export import export_output

    inp = write_prompts(tmp_path / "p.parquet", 3, id=["a", "b", "c"])
    outs = {}
    for name, shift in (("base", None), ("cand", 2.0)):
        outs[name] = tmp_path / name
        options = {} if shift is None else {"shift": shift}
        data = job_dict(inp, outs[name], model={"uri": "builtin:tiny-sd3"}, input={"id_column": "id"},
                        sampling={"sampler": "flow_heun", "sampler_options": options, "max_sequence_length": 32,
                                  "guidance_scale": None, "width": 32, "height": 32})
        assert run_job(spec_from_dict(data)).all_ok
    rows = _manifest(outs["base"])
    assert {(r["model_family"], r["sampler"], r["guidance_scale"], r["max_sequence_length"])
            for r in rows.values()} == {("sd3", "flow_heun", 7.0, 32)}
    _rerenders_identically(outs["base"], "b")
    res = compare_outputs(str(outs["base"]), str(outs["cand"]))
    assert res.counts["changed"] == 3 and res.settings_differ == {"sampler_options": 3}
    export_output(str(outs["base"]), "webdataset", str(tmp_path / "wds"), shard_size=2)
    assert json.loads((tmp_path / "wds" / "sizes.json").read_text()) == {"000000.tar": 2, "000001.tar": 1}
    export_output(str(outs["base"]), "parquet", str(tmp_path / "hf"))
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "hf" / "data" / "*.parquet"), split="train")
    assert sorted(ds["item_id"]) == ["a", "b", "c"] and ds[0]["image"].size == (32, 32)


def test_job_with_clip_scores(tmp_path, ray_local, builtin_tiny, clip_dir):  # noqa: F811
    from batchgen.export import export_output
    from batchgen.outputs import Output
    from batchgen.scoring import ClipScorer

    inp, out = tmp_path / "p.parquet", tmp_path / "out"
    write_prompts(inp, 4)
    data = job_dict(inp, out, scoring={"clip": {"model": str(clip_dir), "batch_size": 2}})
    assert run_job(spec_from_dict(data)).all_ok
    output = Output.open(str(out))
    rows = sorted(output.manifest.to_pylist(), key=lambda r: r["item_id"])
    scorer = ClipScorer.load(clip_dir, device="cpu", batch_size=2)
    expected = scorer.score([output.read_image(r) for r in rows], [r["prompt"] for r in rows])
    scores = [r["clip_score"] for r in rows]
    assert [round(x, 4) for x in scores] == [round(float(x), 4) for x in expected]
    cosine = scorer.cosine([output.read_image(r) for r in rows], [r["prompt"] for r in rows])
    assert [round(x, 4) for x in scores] == [round(100 * max(float(c), 0.0), 4) for c in cosine]
    # The tiny random CLIP scores some pairs 0 (negative cosine): filter just above the smallest score.
    cut = min(scores) + 1e-6
    export_output(str(out), "webdataset", str(tmp_path / "wds"), shard_size=10, min_score=cut)
    counts = json.loads((tmp_path / "wds" / "export.json").read_text())
    assert counts["filtered_out"] == sum(s < cut for s in scores) > 0


# ----------------------------------------------------------------------------- pre-flight (no Ray)


@pytest.mark.parametrize("case, error, fragment", [
    ("sdxl column on sd", InputError, "row 1, column 'original_width': applies to sdxl models; this model is sd"),
    ("sdxl setting on sd", InputError, "sampling.aesthetic_score applies to sdxl models; this model is sd"),
    ("bad loras json", InputError, "row 0, column 'loras': not a JSON list of LoRAs"),
    ("sdxl lora on sd", CheckpointError, "style.safetensors"),
    ("dit unknown class", InputError, "row 1, column 'prompt': prompt 'siamese kitten': not a class name"),
    ("flow sampler on sd", InputError, "row 0: the model (sd) cannot render it: sampler 'flow_euler'"),
])
def test_preflight_errors_name_the_row_and_column(tmp_path, builtin_tiny, sdxl_lora, case, error, fragment):
    inp, out = tmp_path / "p.parquet", tmp_path / "out"
    data = job_dict(inp, out)
    if case == "sdxl column on sd":
        write_prompts(inp, 2, original_width=pa.array([None, 512], pa.int32()))
    elif case == "sdxl setting on sd":
        write_prompts(inp, 1)
        data["sampling"]["aesthetic_score"] = 7.0
    elif case == "bad loras json":
        write_prompts(inp, 1, loras=["[{broken"])
    elif case == "sdxl lora on sd":  # an SDXL LoRA on the SD 1.x model: names match, shapes do not
        write_prompts(inp, 1)
        data["model"]["loras"] = [{"uri": str(sdxl_lora)}]
    elif case == "dit unknown class":
        write_prompts(inp, 2, prompt=["macaw", "siamese kitten"])
        data["model"]["uri"] = "builtin:tiny-dit"
        data["sampling"].update(width=None, height=None)
    elif case == "flow sampler on sd":
        write_prompts(inp, 1)
        data["sampling"]["sampler"] = "flow_euler"
    with pytest.raises(error) as err:
        run_job(spec_from_dict(data))  # pre-flight: Ray is never started, nothing is written
    assert fragment in str(err.value)
    assert not (out / "job.json").exists()


def test_a_lora_file_changed_under_its_uri_is_refused_on_resume(tmp_path, sdxl_lora):
    """The digest holds LoRA URIs and scales; job.json also records each file's sha256, so a
    resume with other bytes under the same URI (which would mix images of both) is refused."""
    import shutil

    from batchgen.runner import prepare

    lora = tmp_path / "style.safetensors"
    shutil.copy(sdxl_lora, lora)
    inp, out = write_prompts(tmp_path / "p.parquet", 2), tmp_path / "out"
    spec = spec_from_dict(job_dict(inp, out, model={"uri": "builtin:tiny-sdxl", "loras": [{"uri": str(lora)}]},
                                   sampling={"guidance_scale": None}))
    prepare(spec).lease.release()
    recorded = json.loads((out / "job.json").read_text())["lora_sha256"]
    assert list(recorded) == [str(lora)] and len(recorded[str(lora)]) == 64
    prepare(spec).lease.release()  # same bytes: resumes
    data = bytearray(lora.read_bytes())
    data[-1] ^= 1  # one weight bit flipped: still a valid file with the same keys
    lora.write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"LoRA {lora} changed since this job started .*--overwrite"):
        prepare(spec)
    prepare(spec, overwrite=True).lease.release()
    assert json.loads((out / "job.json").read_text())["lora_sha256"][str(lora)] != recorded[str(lora)]


def test_dit_unknown_class_lists_close_matches(tmp_path):
    inp, out = tmp_path / "p.parquet", tmp_path / "out"
    write_prompts(inp, 1, prompt=["golden retreiver"])
    data = job_dict(inp, out, model={"uri": "builtin:tiny-dit"}, sampling={"width": None, "height": None})
    with pytest.raises(InputError, match="golden retriever"):
        run_job(spec_from_dict(data))


def test_settings_table_drives_spec_rows_and_manifest():
    """One entry in the table is a spec field, an input column, a manifest column and a generate()
    argument: the four lists agree."""
    from batchgen.dataset import row_schema
    from batchgen.manifest import MANIFEST_SCHEMA
    from batchgen.settings import ROW_SETTINGS, SPEC_SETTINGS
    from batchgen.spec import SamplingSpec

    assert {s.name for s in SPEC_SETTINGS} <= set(SamplingSpec.model_fields)
    assert {s.name for s in ROW_SETTINGS} <= set(row_schema().names)
    assert {s.name for s in ROW_SETTINGS} <= set(MANIFEST_SCHEMA.names)
