"""``builtin:null``: a model with no weights that renders seeded noise.

For dry runs of a job (every input row read, validated, routed through the actor pool, encoded,
stored and committed, without a checkpoint or torch), for the control-plane benchmark and for the
job tests. It is a real built-in model: the pre-flight accepts it (no family: the generic defaults
fill in what the spec leaves to the model), the actors load it like any other, and job.json and
the manifest record its URI and fixed fingerprint. An item's image is noise drawn from its seed,
so a rerender reproduces it byte for byte.

Kept apart from :mod:`batchgen.builtin` (which builds the tiny checkpoints and imports torch) so
that the driver and the workers can recognise it with numpy alone.
"""

from __future__ import annotations

import numpy as np

NULL_NAME = "null"
NULL_URI = "builtin:null"
NULL_FINGERPRINT = "0" * 64  # fixed: the weights are the seed


def is_null_model(uri) -> bool:
    """Whether a model URI names ``builtin:null``."""
    return str(uri).strip() == NULL_URI


class NullRenderer:
    """Seeded random images instead of a model (``builtin:null``)."""

    model_info = {"uri": NULL_URI, "fingerprint": NULL_FINGERPRINT}
    family = None

    def generate(self, prompts, seeds, negative_prompts=None, width=64, height=64, **_):
        return [np.random.default_rng(int(s)).integers(0, 256, (height, width, 3), dtype=np.uint8) for s in seeds]
