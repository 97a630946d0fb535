"""Model: presets, layer specs (TE vs local), SDPA core attention with CP, and the builder."""
