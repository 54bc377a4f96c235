"""The job pre-flight accepts SD3 and FLUX.1 ControlNets (model.controlnets + a control_image
column) and refuses a ControlNet of another family naming it; nothing is written when refused."""

from __future__ import annotations

import pytest

from batchgen.errors import BatchgenError
from batchgen.spec import spec_from_dict

from .faults import prepare
from .fixtures_jobs import job_dict, write_prompts
from .test_job_conditioning import _png


def _spec(tmp_path, base, controlnet):
    ids = ["a", "b"]
    image = _png(tmp_path / "c.png")
    inp = write_prompts(tmp_path / "in.parquet", 2, id=ids, control_image=[image, image])
    model = {"uri": base, "controlnets": [{"uri": controlnet}]}
    return spec_from_dict(job_dict(inp, tmp_path / "out", input={"id_column": "id"}, model=model,
                                   sampling={"steps": 2, "width": 64, "height": 64, "guidance_scale": 3.0,
                                             "max_sequence_length": 16})), tmp_path / "out"


@pytest.mark.parametrize("base, controlnet", [("builtin:tiny-sd3", "builtin:tiny-sd3-controlnet"),
                                              ("builtin:tiny-flux-dev", "builtin:tiny-flux-controlnet")])
def test_preflight_accepts_dit_controlnets(tmp_path, base, controlnet):
    spec, _ = _spec(tmp_path, base, controlnet)
    plan = prepare(spec)
    assert plan is not None


def test_preflight_refuses_a_controlnet_of_another_family(tmp_path):
    spec, out = _spec(tmp_path, "builtin:tiny-sd3", "builtin:tiny-flux-controlnet")
    with pytest.raises(BatchgenError) as err:
        prepare(spec)
    assert "model.controlnets[0] 'builtin:tiny-flux-controlnet'" in str(err.value)
    assert "FLUX.1 ControlNet" in str(err.value)
    assert not out.exists()
