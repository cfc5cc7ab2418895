"""The ADM center crop used for ImageNet at 64 and 256 (as in the release)."""
import numpy as np
from PIL import Image


def center_crop_arr(pil_image, image_size):
    """Halve with a box filter while the short side is at least twice the target (cheap and
    alias-free), resize bicubically so the short side equals image_size, then crop the centre."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])
