"""SDAR (JetAstra's block diffusion on Qwen3): its config, weights map, model and decoding rules
(README.md in this folder)."""
