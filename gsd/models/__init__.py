"""Denoiser networks: every architecture (SongUNet DDPM++, NCSN++, ADM, the MLP), EDM
preconditioning and the gsd .safetensors checkpoint format (`gsd.models.networks`)."""
