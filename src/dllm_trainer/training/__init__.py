"""Training: the MDLM trainer, its data collation and noise, launching workers, checkpoints, export."""
