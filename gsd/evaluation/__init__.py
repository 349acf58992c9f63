"""Evaluation: the run loader and section composer (`core`), the metrics and their shared
sections (`metrics`, `feature_metrics`, `fid`, `ppl`), latent editing (`editing`) and figures
(`plots`)."""
