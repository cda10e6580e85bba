"""Image files: discovery, robust decoding to RGB, and the two folder datasets.

Uncurated data (SEER trained on 1B random Instagram images) contains every kind of file a
crawler finds: empty files, truncated downloads, HTML saved as ``.jpg``, CMYK JPEGs, 16-bit
PNGs, palette GIFs with transparency, 20,000-pixel panoramas. :func:`decode_rgb` turns each of
them into an RGB :class:`PIL.Image.Image` or raises :class:`BadImage` with a short reason code,
so that the loader can skip the file and count it (see ``_loader.py``).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Decoded-pixel limit: 64 Mi pixels is 192 MiB of RGB, an 8,192 × 8,192 image. Pillow's own
# guard (MAX_IMAGE_PIXELS, 89 M) only warns below twice its limit; ours is a hard, counted skip.
DEFAULT_MAX_PIXELS = 64 * 2**20

# Reason codes of BadImage, the keys of the loader's skip counts.
SKIP_REASONS = ("empty", "unreadable", "not_image", "truncated", "corrupt", "too_large", "bad_mode")


class DataError(ValueError):
    """A dataset cannot be used at all (missing or empty folder, too few classes or images)."""


class BadImage(ValueError):
    """One file cannot be decoded; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = "") -> None:
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{self.path}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # pickled with its fields (e.g. sent from a loader worker)
        return (type(self), (self.path, self.reason, self.detail))


@contextlib.contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """Disable Pillow's decompression-bomb check while opening: ``decode_rgb`` applies its own.

    Pillow raises in ``Image.open`` above 2 × MAX_IMAGE_PIXELS, before a JPEG can be drafted
    to 1/8 scale; the setting is process-global, so it is restored on exit (loader workers are
    processes, and only a thread opening images at the same moment would see the change).
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _draft_jpeg(img: Image.Image, max_pixels: int) -> None:
    """Ask libjpeg to decode at 1/2, 1/4 or 1/8 scale so that the result fits ``max_pixels``."""
    w, h = img.size
    k = 1
    while k < 8 and -(-w // k) * -(-h // k) > max_pixels:
        k *= 2
    # draft() picks the largest scale s in {1, 2, 4, 8} with s <= min(w // tw, h // th).
    img.draft(None, (max(1, w // k), max(1, h // k)))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparent pixels become white (how viewers show them)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", img.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode.startswith("I") or mode == "F":
        # 16/32-bit integer or float grey: Pillow's convert() clips to 0..255 (a white image),
        # so rescale: 16-bit ranges divide by 257; floats in [0, 1] scale by 255.
        a = np.asarray(img, dtype=np.float32)
        if mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0
        elif mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        grey = np.clip(a, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV; LAB raises -> bad_mode


def decode_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode the image file at ``path`` to an RGB image of at most ``max_pixels`` pixels.

    JPEGs over the limit are decoded at a reduced scale by libjpeg (``Image.draft``, down to
    1/8 per side, which is also 8× less decoding work); other formats over the limit, and JPEGs
    still over it at 1/8, raise ``BadImage(reason="too_large")``. Animated images give their
    first frame. Raises :class:`BadImage` for every undecodable file, never another error.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImage(path, "unreadable", e.strerror or type(e).__name__) from None
    if not data:
        raise BadImage(path, "empty", "zero bytes")
    try:
        with _own_pixel_limit():
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels and isinstance(img, JpegImagePlugin.JpegImageFile):
                _draft_jpeg(img, max_pixels)  # JPEG and MPO (cameras' JPEG)
                w, h = img.size
            if w * h > max_pixels:
                raise BadImage(path, "too_large", f"{w}×{h} = {w * h:,} pixels > {max_pixels:,}")
            img.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(path, "not_image", "no known image format") from None
    except Exception as e:
        # Pillow reports a file that ends early as OSError("image file is truncated ...");
        # anything else (OSError "broken data stream", SyntaxError, struct.error, a plugin's
        # IndexError, ...) is corruption: no decoder error may end a week-long run.
        reason = "truncated" if "truncated" in str(e) else "corrupt"
        raise BadImage(path, reason, f"{type(e).__name__}: {str(e)[:100]}") from None
    try:
        return _to_rgb(img)
    except (OSError, ValueError) as e:
        raise BadImage(path, "bad_mode", f"mode {img.mode}: {str(e)[:100]}") from None


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def find_images(root: str | os.PathLike) -> list[str]:
    """Paths of image files under ``root`` (recursive, symlinks followed once), relative, sorted.

    Sorted as POSIX strings so the list (and every index into it) is the same on every machine.
    """
    root = os.fspath(root)
    seen: set[str] = set()
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or a folder reached twice
            dirnames[:] = []
            continue
        seen.add(real)
        rel = os.path.relpath(dirpath, root)
        for f in filenames:
            if _is_image_name(f):
                out.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
    return sorted(out)


class _PathTable:
    """Paths packed in one bytes buffer + offsets.

    A list of 10 M Python strings in a fork()ed loader worker is copied page by page as reference
    counts are touched (pytorch/pytorch#13246); two numpy arrays are never written to.
    """

    def __init__(self, paths: list[str]) -> None:
        encoded = [p.encode() for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._buf[self._offsets[i] : self._offsets[i + 1]].tobytes().decode()


def _check_root(root: Path, what: str) -> None:
    if not root.exists():
        raise DataError(f"{what} {root} does not exist: pass the folder that holds the images")
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a folder: pass the folder that holds the images")


class ImageFolder:
    """Every image under ``root``, recursively, without labels: the uncurated pretraining set.

    Files are those whose extension is in :data:`IMAGE_EXTENSIONS` (any case), in sorted
    relative-path order. ``ds[i]`` is an RGB ``PIL.Image`` (see :func:`decode_rgb`) or raises
    :class:`BadImage`; ``max_pixels`` bounds the decoded size.
    """

    def __init__(self, root: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.root = Path(root)
        self.max_pixels = max_pixels
        _check_root(self.root, "image folder")
        files = find_images(self.root)
        if not files:
            raise DataError(
                f"image folder {self.root} holds no image files ({', '.join(IMAGE_EXTENSIONS)}, "
                "searched recursively): point it at the folder that holds the images"
            )
        self._paths = _PathTable(files)

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, i: int) -> Path:
        return self.root / self._paths[i]

    def __getitem__(self, i: int) -> Image.Image:
        return decode_rgb(self.path(i), self.max_pixels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, {len(self)} images)"


class LabelledImageFolder(ImageFolder):
    """``root/<class>/**/<image>``: one label per sub-folder (sorted names), for linear evaluation.

    Images directly in ``root`` are ignored. ``classes[k]`` is the name of label ``k``;
    ``label(i)`` the label of image ``i``. Needs at least 2 non-empty class folders.
    """

    def __init__(self, root: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.root = Path(root)
        self.max_pixels = max_pixels
        _check_root(self.root, "labelled image folder")
        classes, files, labels = [], [], []
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            found = find_images(d)
            if found:
                labels += [len(classes)] * len(found)
                classes.append(d.name)
                files += [f"{d.name}/{f}" for f in found]
        if len(classes) < 2:
            raise DataError(
                f"labelled image folder {self.root} has {len(classes)} class folder(s) with "
                "images; linear evaluation needs root/<class>/<image> with at least 2 classes"
            )
        self.classes: list[str] = classes
        self._paths = _PathTable(files)
        self._labels = np.asarray(labels, dtype=np.int64)

    def label(self, i: int) -> int:
        return int(self._labels[i])
