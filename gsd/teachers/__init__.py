"""Teachers: loading one given by path with the one fit check (`loading`), training and the
default-teacher cache (`training`), the restricted EDM-pickle reader (`edm_pickle`) and the
diffusers UNet2DModel wrapper (`diffusers_teacher`)."""
