"""Full-attention masked denoisers (LLaDA, Dream, Marble's own): every position sees every
other; the Fast-dLLM prefix and dual caches; WINO-style verify."""
