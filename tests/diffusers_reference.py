"""Which diffusers scheduler each batchgen sampler name stands for (the test-only reference)."""

from __future__ import annotations

# our name -> (diffusers scheduler class name, from_config options)
REFERENCE = {
    "ddim": ("DDIMScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    # diffusers 0.42's Euler-ancestral ignores use_karras_sigmas: the reference runs its ancestral
    # step over EulerDiscreteScheduler(use_karras_sigmas=True)'s sigmas and timesteps.
    "euler_a_karras": ("EulerAncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "heun": ("HeunDiscreteScheduler", {}),
    "heun_karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    # TCD's eta is a step() argument: the SD pipelines pass theirs (default 0.0), TCDScheduler.step
    # defaults to 0.3 as batchgen's `tcd` does; pass eta=<the sampler option> to the pipeline.
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow_heun": ("FlowMatchHeunDiscreteScheduler", {}),
    # Swapped into an SD3/FLUX pipeline from its FlowMatchEuler config; also pass
    # flow_shift=<the config's `shift`> (FLOW_SHIFT_FROM below): DPMSolver reads no `shift` key.
    "flow_dpmpp_2m": ("DPMSolverMultistepScheduler",
                      {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "algorithm_type": "dpmsolver++",
                       "solver_order": 2}),
}

# our name -> the from_config option that takes the checkpoint config's `shift` (or the `shift` sampler option)
FLOW_SHIFT_FROM = {"flow_euler": "shift", "flow_heun": "shift", "flow_dpmpp_2m": "flow_shift"}


def aligned(pipe):
    """``pipe`` with every weight copied into freshly allocated (64-byte aligned) memory.

    diffusers/transformers load safetensors weights memory-mapped, so a tensor may start at any
    8-byte offset, and the CPU's small-matrix GEMM kernels round differently for unaligned operands
    (measured: a CLIP text projection off by 2.4e-7, which a tiny random SDXL UNet with Heun turns
    into 21 levels). batchgen copies weights into its own allocations; cloning the reference's makes
    both sides run the same kernels.
    """
    import torch

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for param in component.parameters():
                param.data = param.data.clone()
    return pipe
