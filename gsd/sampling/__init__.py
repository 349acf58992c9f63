"""Samplers of a denoiser: Heun/Euler ODE, churn, ancestral and loss-guided (`samplers`), and
the guidance losses, masks and classifier (`guidance`)."""
