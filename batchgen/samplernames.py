"""Sampler names users type: our names, A1111 UI names as aliases, and "did you mean" hints.

No torch import here: the job spec normalizes aliases while it is validated (so the digest and
job.json hold the canonical name), and the full check against the sampler registry happens in
the job's pre-flight (``jobstate.check_sampler``).
"""

from __future__ import annotations

import difflib
import re

# A1111 / Forge UI sampler names -> our names (the README's samplers table). Matching ignores case,
# spaces, '+', '-' and '_' ("DPM++ 2M Karras", "dpm++_2m_karras" and "dpmpp 2m karras" all match).
A1111_NAMES = {
    "DDIM": "ddim",
    "PLMS": "plms",
    "Euler": "euler",
    "Euler a": "euler_a",
    "Heun": "heun",
    "LMS": "lms",
    "LMS Karras": "lms_karras",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M Karras": "dpmpp_2m_karras",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Karras": "dpmpp_2m_sde_karras",
    "UniPC": "unipc",
    "LCM": "lcm",
}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.lower().replace("++", "pp").replace("+", "p"))


_ALIASES = {_key(k): v for k, v in A1111_NAMES.items()}


def canonical_sampler(name: str) -> str:
    """``name`` itself when it is not an alias, else our name for that A1111 sampler."""
    if not isinstance(name, str):
        return name
    if re.fullmatch(r"[a-z0-9_]+", name):
        return name  # already in our style: checked against the registry in pre-flight
    return _ALIASES.get(_key(name), name)


def did_you_mean(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or ''."""
    if not isinstance(word, str):
        return ""
    choices = list(choices)
    hit = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not hit:
        lowered = {c.lower(): c for c in choices}
        hit = [lowered[m] for m in difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)]
    return f" (did you mean {hit[0]!r}?)" if hit else ""


def unknown_sampler_message(name: str, known) -> str:
    known = sorted(known)
    hint = did_you_mean(name, known) or did_you_mean(name, A1111_NAMES)
    return (f"unknown sampler {name!r}{hint}; choose one of: {', '.join(known)} "
            f"(A1111 names such as 'Euler a' or 'DPM++ 2M Karras' are accepted too)")
