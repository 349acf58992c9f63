"""The terms of the Distiller's two steps, one module each (docs/definitions.md §3.3-3.5).

The Distiller (gsd.distill) is composed of these mixins; each names the Distiller attributes it
reads. They are split by term so that each can be read alone: `fake_score` (f_psi's step and
SiDA's discriminator), `generator` (how the generator's terms combine, raw or scale-free),
`isometry` (the isometric term and its latents), `regression` (the teacher-pair regression),
and `rows` (the dropping of non-finite rows and gradients that every term shares).
"""
