"""LLaDA2.x: block-causal masked block diffusion on an MoE stack, with an exact cache of
finished blocks and LLaDA2.1's token editing."""
