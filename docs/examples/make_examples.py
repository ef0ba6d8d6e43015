"""Write the example images used in docs/evaluation.md's predict section, from Fashion-MNIST test images.

    python docs/examples/make_examples.py [/usr/share/datasets/fashion-mnist]

Each file stores one test image the way a user's file might arrive: a product photo (dark
object on white, colour JPEG), a cut-out with transparency, 16-bit grey, CMYK, a phone photo
with an EXIF rotation, an animated GIF, plus one truncated PNG.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
mirror = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist")
raw = gzip.decompress((mirror / "t10k-images-idx3-ubyte.gz").read_bytes())
images = np.frombuffer(raw[16:], np.uint8).reshape(-1, 28, 28)
labels = np.frombuffer(gzip.decompress((mirror / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:], np.uint8)


def first(label: int) -> np.ndarray:
    """The first test image of a class, enlarged 10x with a margin (like a product photo)."""
    image = Image.fromarray(images[int(np.argmax(labels == label))]).resize((240, 240), Image.Resampling.BICUBIC)
    return np.pad(np.asarray(image), 40)


# 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot
shade = first(0).astype(np.float32) / 255
photo = 255 - shade[..., None] * (255 - np.array([30, 40, 110]))  # navy garment on white
Image.fromarray(photo.astype(np.uint8)).save(HERE / "tshirt_photo.jpg", quality=90)

cut = first(7)
rgba = np.dstack([np.full_like(cut, 25)] * 3 + [cut])  # dark sneaker, alpha = shape, transparent black
Image.fromarray(rgba, "RGBA").save(HERE / "sneaker_cutout.png")

Image.fromarray(first(1).astype(np.uint16) * 250 + 800).save(HERE / "trouser_16bit.png")

Image.fromarray(255 - first(2)).convert("RGB").convert("CMYK").save(HERE / "pullover_cmyk.jpg", quality=90)

stored = Image.fromarray(255 - first(5)).convert("RGB").transpose(Image.Transpose.ROTATE_90)
exif = Image.Exif()
exif[0x0112] = 6  # the camera was turned: viewers rotate 90 degrees clockwise to display
stored.save(HERE / "sandal_rotated.jpg", exif=exif, quality=90)

frames = [Image.fromarray(first(8)), Image.fromarray(first(9))]
frames[0].save(HERE / "bag_animated.gif", save_all=True, append_images=frames[1:], duration=500, loop=0)

Image.fromarray(first(3)).save(HERE / "dress_truncated.png")
data = (HERE / "dress_truncated.png").read_bytes()
(HERE / "dress_truncated.png").write_bytes(data[: len(data) // 2])
