"""Noise schedules and samplers, step-for-step equal to diffusers' schedulers.

``get_sampler(name, scheduler_config, steps, strength=None, options=None)`` returns a
:class:`Sampler`; ``SAMPLER_NAMES`` lists every accepted name.
"""

from .registry import SAMPLER_NAMES, SPECS, Sampler, get_sampler

__all__ = ["SAMPLER_NAMES", "SPECS", "Sampler", "get_sampler"]
