"""Noise schedules and samplers, step-for-step equal to diffusers' schedulers.

``get_sampler(name, scheduler_config, steps, strength=None, options=None, sigmas=None, mu=None)``
returns a :class:`Sampler`; ``SAMPLER_NAMES`` lists every accepted name, ``FLOW_SAMPLER_NAMES`` the
ones for flow-matching checkpoints (SD3, FLUX.1); ``flux_mu`` gives FLUX.1-dev's dynamic shift.
"""

from .registry import FLOW_SAMPLER_NAMES, SAMPLER_NAMES, SPECS, Sampler, explicit_steps, get_sampler
from .schedules import flux_mu

__all__ = ["FLOW_SAMPLER_NAMES", "SAMPLER_NAMES", "SPECS", "Sampler", "explicit_steps", "flux_mu", "get_sampler"]
