"""What the example workflows need from a ComfyUI install besides nodes: the inputs that name
a model file, and the models folder each file is looked up in. A name the server does not
list fails validation (and shows as a missing model in the frontend), so tests give each an
empty stand-in there."""

FILE_INPUTS = {
    "unet_name": "diffusion_models",
    "clip_name": "text_encoders",
    "clip_name1": "text_encoders",
    "clip_name2": "text_encoders",
    "vae_name": "vae",
}
