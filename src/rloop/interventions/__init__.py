"""Interventions and the measurements under them: head / component ablation and patching
edits, the R_V engine (clean or edited), the exact batched head sweep, gradients (saliency,
attribution) and KV-cache substitution and mixing."""
