"""What every data error suggests: the forms data.dataset accepts, and the local-folder way out."""

HF_PREFIX = "huggingface:"
LOCAL_FOLDER_HINT = "point data.dataset at a local folder of images: --config.data.dataset=/path/to/images"
ACCEPTED_FORMS = (
    "a TFDS name (cifar10, mnist, cifar10:3.0.2), huggingface:OWNER/NAME, "
    "or a local folder of images (or of MNIST-style IDX files)"
)
