"""DiffusionGemma: uniform-state block diffusion (canvases of noise, an encoder writing
finished canvases into an exact cache)."""
