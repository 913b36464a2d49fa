"""Benchmark: anti-aliased minification, and what rendering larger than the input gives.

**Minification.** An image is fitted with the ``image`` preset; it is then rendered 2x, 3x
and 4x smaller (1) at the level of detail whose sample spacing matches (the default:
``lod = log2(factor)``, blended at fractional ratios), and (2) by naive point sampling of the
finest level (``--lod 0``). Each is compared (PSNR, 8-bit) with the input box-filtered by the
same factor (the input cropped to a multiple of 12 so that every factor divides it).

**Enlarging (the super-resolution protocol).** The image is box-filtered 2x and 4x, the
small image fitted, and the model rendered at the original size (1) by the default query
(each scale's samples interpolated linearly), (2) off the grid (the finest scale's MLPs
evaluated at the output pixels); against (3) bicubic and (4) bilinear upsampling of the small
image (scikit-image ``resize``, order 3 and 1). PSNR against the original.

Images: ``zoneplate`` (a generated chirp, high frequencies everywhere: where aliasing shows),
``astronaut`` and ``coffee`` (scikit-image's photographs, 512 x 512 and 400 x 600).

    python scripts/bench_lod.py
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np

import miner3d


def zoneplate(n: int = 516) -> np.ndarray:
    """A chirp ``cos(k r^2)`` reaching 0.45 cycles per pixel at the corners, 8-bit gray, with
    a second chirp along the diagonal so that no direction is free of detail."""
    y, x = (np.mgrid[0:n, 0:n] - n / 2) / n
    r2 = x**2 + y**2
    k = 0.45 * np.pi * n / 0.7071
    img = 0.5 + 0.35 * np.cos(k * r2) + 0.15 * np.cos(0.6 * k * (x + y) ** 2)
    return np.clip(np.rint(255 * img), 0, 255).astype(np.uint8)


def photo(name: str) -> np.ndarray:
    from skimage import data

    return getattr(data, name)()


def box(image: np.ndarray, factor: int) -> np.ndarray:
    """Box filter by ``factor`` (the size must divide), float in [0, 1]."""
    img = image.astype(np.float64) / 255
    h, w = img.shape[0] // factor, img.shape[1] // factor
    img = img[: h * factor, : w * factor]
    return img.reshape(h, factor, w, factor, *img.shape[2:]).mean(axis=(1, 3))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - b) ** 2)))


def quantized(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0, 1) * 255) / 255


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", default=["zoneplate", "astronaut", "coffee"])
    args = parser.parse_args()
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs")
    images = {n: zoneplate() if n == "zoneplate" else photo(n) for n in args.images}
    print(
        "\n| image | factor | output | lod (auto) | PSNR at auto lod | PSNR naive (lod 0) | gain |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, image in images.items():
        h, w = (image.shape[0] // 12) * 12, (image.shape[1] // 12) * 12
        image = image[:h, :w]
        model = miner3d.fit(image, kind="image").model
        for factor in (2, 3, 4):
            size = (h // factor, w // factor)
            reference = box(image, factor)
            reference = reference if reference.ndim == 3 else reference[..., None]
            auto = quantized(model.image(size=size))
            naive = quantized(model.image(lod=0, size=size))
            lod = np.log2(factor)
            a, b = psnr(auto, reference), psnr(naive, reference)
            print(
                f"| {name} {w}x{h} | {factor}x | {size[1]}x{size[0]} | {lod:.2f} | "
                f"{a:.2f} dB | {b:.2f} dB | {a - b:+.2f} dB |",
                flush=True,
            )
    from skimage.transform import resize

    print(
        "\n| image | factor | fitted | PSNR query | PSNR off-grid | PSNR bicubic | PSNR bilinear |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, image in images.items():
        h, w = (image.shape[0] // 4) * 4, (image.shape[1] // 4) * 4
        original = image[:h, :w].astype(np.float64) / 255
        original = original if original.ndim == 3 else original[..., None]
        for factor in (2, 4):
            small = box(image[:h, :w], factor)
            small8 = np.rint(small * 255).astype(np.uint8)
            fit = miner3d.fit(small8, kind="image")
            model = fit.model
            query = quantized(model.image(size=(h, w)))
            off = quantized(model.image(size=(h, w), off_grid=True))
            small_f = small8.astype(np.float64) / 255
            small_f = small_f if small_f.ndim == 3 else small_f[..., None]
            bicubic = quantized(resize(small_f, (h, w, small_f.shape[2]), order=3))
            bilinear = quantized(resize(small_f, (h, w, small_f.shape[2]), order=1))
            print(
                f"| {name} {w}x{h} | {factor}x | {small8.shape[1]}x{small8.shape[0]} "
                f"({fit.summary['psnr']:.1f} dB) | {psnr(query, original):.2f} dB | "
                f"{psnr(off, original):.2f} dB | {psnr(bicubic, original):.2f} dB | "
                f"{psnr(bilinear, original):.2f} dB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
