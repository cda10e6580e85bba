"""seer_train.data: bad files, folders, synthetic textures, crops, sharding, resume, kornia."""

import io
import os
import pickle
import struct
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from seer_train.data import (
    FAMILIES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadImage,
    DataError,
    ImageFolder,
    LabelledImageFolder,
    MultiCropSpec,
    ShardedBatchSampler,
    SyntheticImages,
    decode_rgb,
    eval_loader,
    pretrain_loader,
    sample_crop_box,
)

TINY = MultiCropSpec.from_sizes((64, 64, 32, 32, 32, 32))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w=48, h=40, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def _png_claiming(width: int, height: int) -> bytes:
    """A 1×1 PNG whose header says width × height: a decompression bomb's first bytes."""
    data = bytearray(_encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


JPEG = _encode(_noise(), "JPEG")
PNG = _encode(_noise(), "PNG")
SOS = JPEG.index(b"\xff\xda")  # start-of-scan marker
GARBAGE = bytes(np.random.default_rng(1).integers(0, 256, 2000, np.uint8))
BAD_FILES = {  # name -> (bytes, reason)
    "empty.jpg": (b"", "empty"),
    "truncated.jpg": (JPEG[: len(JPEG) // 2], "truncated"),
    "truncated.png": (PNG[: len(PNG) // 2], "truncated"),
    "corrupt.png": (PNG[:50] + GARBAGE, "corrupt"),
    # Scan header naming a component the frame does not have (garbage *inside* the scan
    # decodes, to garbage pixels: libjpeg resynchronises).
    "corrupt.jpg": (JPEG[: SOS + 5] + b"\x09" + JPEG[SOS + 6 :], "corrupt"),
    "html.jpg": (b"<html><body>404 not found</body></html>", "not_image"),
    "random.jpg": (GARBAGE[:500], "not_image"),
    "bomb.png": (_png_claiming(100_000, 100_000), "too_large"),
}


# --- decoding: every bad kind is a BadImage with its reason; odd modes become RGB ------------


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_raises_bad_image_with_reason(tmp_path, name):
    data, reason = BAD_FILES[name]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(BadImage) as e:
        decode_rgb(tmp_path / name)
    assert e.value.reason == reason
    assert str(tmp_path / name) in str(e.value) and reason in str(e.value)
    assert isinstance(e.value, ValueError)
    again = pickle.loads(pickle.dumps(e.value))  # as it would leave a loader worker
    assert (again.path, again.reason, str(again)) == (e.value.path, reason, str(e.value))


def test_unreadable_path_is_bad_image(tmp_path):
    with pytest.raises(BadImage, match="unreadable"):
        decode_rgb(tmp_path / "missing.jpg")


def _decode(tmp_path, img: Image.Image, name: str, **kw) -> Image.Image:
    img.save(tmp_path / name, **kw)
    out = decode_rgb(tmp_path / name)
    assert out.mode == "RGB" and out.size == img.size
    return out


def test_grayscale_cmyk_and_palette_become_rgb(tmp_path):
    grey = _decode(tmp_path, Image.new("L", (8, 6), 77), "g.png")
    assert grey.getpixel((0, 0)) == (77, 77, 77)
    cmyk = _decode(tmp_path, Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "c.jpg")
    r, g, b = cmyk.getpixel((3, 3))
    assert r > 200 and g < 50 and b < 50  # CMYK (0, 1, 1, 0) is red
    pal = _decode(tmp_path, Image.new("RGB", (8, 6), (10, 200, 30)).convert("P"), "p.gif")
    assert np.abs(np.subtract(pal.getpixel((0, 0)), (10, 200, 30))).max() < 40


def test_transparency_becomes_white(tmp_path):
    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue
    out = _decode(tmp_path, rgba, "a.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((5, 5)) == (255, 0, 0)
    pal = Image.new("P", (8, 6), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    out = _decode(tmp_path, pal, "t.png", transparency=0)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((4, 4)) == (0, 255, 0)


def test_16_bit_grey_is_rescaled_not_clipped(tmp_path):
    a = np.array([[0, 32896, 65535, 1000]], np.uint16)  # 32896 = 128 × 257
    out = np.asarray(_decode(tmp_path, Image.fromarray(a), "16.png"))
    assert out[0, :, 0].tolist() == [0, 128, 255, 3]


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert decode_rgb(tmp_path / "anim.gif").getpixel((2, 2))[0] > 200


def test_huge_jpeg_is_drafted_under_the_pixel_limit(tmp_path):
    _noise(400, 320).save(tmp_path / "big.jpg")  # 128,000 pixels
    out = decode_rgb(tmp_path / "big.jpg", max_pixels=10_000)
    assert out.mode == "RGB" and out.size == (100, 80)  # libjpeg at 1/4 scale
    assert decode_rgb(tmp_path / "big.jpg").size == (400, 320)  # under the limit: untouched
    _noise(400, 320).save(tmp_path / "big.png")
    with pytest.raises(BadImage, match=r"too_large.*128,000 pixels > 10,000"):
        decode_rgb(tmp_path / "big.png", max_pixels=10_000)
    with pytest.raises(BadImage, match="too_large"):  # even 1/8 scale (50 × 40) is too big
        decode_rgb(tmp_path / "big.jpg", max_pixels=1_000)


def test_pillow_bomb_limit_is_restored(tmp_path):
    (tmp_path / "bomb.png").write_bytes(BAD_FILES["bomb.png"][0])
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImage):
        decode_rgb(tmp_path / "bomb.png")
    assert before == Image.MAX_IMAGE_PIXELS


# --- folders ----------------------------------------------------------------------------------


def test_image_folder_is_recursive_sorted_and_case_insensitive(tmp_path):
    for rel in ["b/x/deep.PNG", "a.jpg", "b/c.JpEg", "z.webp", "notes.txt", "b/y/z.tiff"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    os.symlink(tmp_path / "b", tmp_path / "b" / "x" / "loop")  # must not recurse forever
    ds = ImageFolder(tmp_path)
    assert [str(ds.path(i).relative_to(tmp_path)) for i in range(len(ds))] == [
        "a.jpg",
        "b/c.JpEg",
        "b/x/deep.PNG",
        "b/y/z.tiff",
        "z.webp",
    ]
    with pytest.raises(BadImage, match="not_image"):  # "x" is not an image
        ds[0]


def test_image_folder_errors_say_what_to_do(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for path, what in [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty", "holds no image files"),
        (tmp_path / "notes.txt", "is not a folder"),
    ]:
        with pytest.raises(DataError, match=what) as e:
            ImageFolder(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_labelled_folder(tmp_path):
    for rel in ["dog/1.jpg", "cat/a/2.png", "cat/3.png", "loose.jpg", "bird/readme.md"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        _noise().save(tmp_path / rel) if rel.endswith(("jpg", "png")) else None
    ds = LabelledImageFolder(tmp_path)
    assert ds.classes == ["cat", "dog"] and len(ds) == 3
    assert [ds.label(i) for i in range(3)] == [0, 0, 1]
    assert ds[2].mode == "RGB"
    (tmp_path / "dog" / "1.jpg").unlink()
    with pytest.raises(DataError, match=r"1 class folder.*at least 2 classes"):
        LabelledImageFolder(tmp_path)


# --- synthetic textures ----------------------------------------------------------------------


def test_synthetic_is_deterministic_per_index_and_seed():
    a, b, c = SyntheticImages(50, seed=0), SyntheticImages(50, seed=0), SyntheticImages(50, seed=1)
    assert a[7].mode == "RGB" and a[7].size == (96, 96)
    assert a[7].tobytes() == b[7].tobytes()
    assert a[7].tobytes() != a[8].tobytes() and a[7].tobytes() != c[7].tobytes()
    assert [a.label(i) for i in range(50)] == [b.label(i) for i in range(50)]
    assert SyntheticImages(5, size=40)[0].size == (40, 40)


@pytest.mark.parametrize("n, k", [(100, 10), (101, 3), (7, 2)])
def test_synthetic_labels_are_balanced_and_spread_over_ranks(n, k):
    ds = SyntheticImages(n, num_classes=k)
    counts = Counter(ds.label(i) for i in range(n))
    assert set(counts) == set(range(k)) and max(counts.values()) - min(counts.values()) <= 1
    assert ds.classes == list(FAMILIES[:k])
    if n >= 100:  # a strided eval shard sees every class (labels are not i % k)
        assert {ds.label(i) for i in range(1, n, 2)} == set(range(k))


def test_synthetic_nuisances_do_not_give_away_the_class():
    """Mean colour and brightness are independent of the class: a nearest-class-mean
    classifier on mean RGB is at chance level."""
    ds = SyntheticImages(800, num_classes=10, size=64)
    x = np.stack([np.asarray(ds[i], np.float32).mean((0, 1)) for i in range(800)])
    y = np.array([ds.label(i) for i in range(800)])
    means = np.stack([x[:400][y[:400] == k].mean(0) for k in range(10)])
    pred = np.argmin(((x[400:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == y[400:]).mean() < 0.2  # chance is 0.1


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticImages(10, num_classes=len(FAMILIES) + 1)
    with pytest.raises(ValueError, match="num_images"):
        SyntheticImages(0)
    with pytest.raises(ValueError, match="colour_cells"):
        SyntheticImages(3, colour_cells=0)
    with pytest.raises(IndexError):
        SyntheticImages(3)[3]


def test_synthetic_colour_cells():
    """One cell: one pair of inks (corners differ by light and coverage only); three: varying."""
    for cells, varies in [(1, False), (3, True)]:
        ds = SyntheticImages(20, num_classes=2, colour_cells=cells)
        spreads = []
        for i in range(20):
            a = np.asarray(ds[i], np.float32)
            corners = np.stack([a[:8, :8], a[:8, -8:], a[-8:, :8], a[-8:, -8:]]).mean((1, 2))
            spreads.append(np.ptp(corners, axis=0).max())  # corner mean colours, max spread
        assert (np.median(spreads) > 100) == varies  # measured: ~65 vs ~135


def test_synthetic_orientation_and_edges_carry_no_per_image_signal():
    """Only the family survives cropping: stripes are exactly axis-aligned and every image has
    the same edge profile, so tilt and sharpness cannot tell two images of a class apart."""
    ds = SyntheticImages(40, num_classes=2)
    for i in range(40):
        mask = ds._pattern(ds.classes[ds.label(i)], np.random.default_rng(i))  # (S, S)
        if ds.classes[ds.label(i)] == "hstripes":
            assert np.ptp(mask, axis=1).max() < 1e-5  # constant along every row
        else:
            assert np.ptp(mask, axis=0).max() < 1e-5  # vstripes: constant down every column
    # Same edge profile: the steepest step between neighbouring pixels is alike in every image.
    steps = [np.abs(np.diff(ds._pattern("hstripes", np.random.default_rng(i)), axis=0)).max()
             for i in range(20)]  # fmt: skip
    assert max(steps) / min(steps) < 1.6


# --- crops ------------------------------------------------------------------------------------


def test_multicrop_spec_defaults_and_from_sizes():
    seer = MultiCropSpec()
    assert seer.sizes == (160, 160, 96, 96, 96, 96)
    assert seer.scales == ((0.14, 1.0),) * 2 + ((0.05, 0.14),) * 4
    assert TINY.scales == seer.scales and TINY.pixels_per_image == 2 * 64**2 + 4 * 32**2
    with pytest.raises(ValueError, match="scale ranges"):
        MultiCropSpec(sizes=(32,), scales=((0.1, 1.0),) * 2)
    with pytest.raises(ValueError, match="scale range"):
        MultiCropSpec(sizes=(32,), scales=((0.0, 1.0),))


@given(
    w=st.integers(1, 3000),
    h=st.integers(1, 3000),
    lo=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_crop_box_is_inside_the_image_and_in_scale(w, h, lo, seed):
    scale, ratio = (lo, min(1.0, lo * 3)), (3 / 4, 4 / 3)
    left, top, cw, ch = sample_crop_box(w, h, scale, ratio, np.random.default_rng(seed))
    assert min(left, top) >= 0 and min(cw, ch) >= 1
    assert left + cw <= w and top + ch <= h
    if min(w, h) >= 100 and 0.75 <= w / h <= 4 / 3:  # a box in range always fits in 10 tries
        area = cw * ch / (w * h)  # rounding to pixels moves the area slightly
        assert scale[0] * 0.95 - 0.01 <= area <= scale[1] * 1.05 + 0.01


@pytest.mark.parametrize("spec", [MultiCropSpec(), TINY], ids=["seer", "tiny"])
def test_loader_crops_have_the_spec_shapes(spec):
    crops, info = next(pretrain_loader(SyntheticImages(16, size=120), spec, 4))
    assert [tuple(c.shape) for c in crops] == [(4, 3, s, s) for s in spec.sizes]
    assert all(c.dtype == torch.uint8 for c in crops)
    assert (info.epoch, info.step, info.step_in_epoch) == (0, 0, 0)
    assert info.indices.shape == (4,) and torch.equal(info.indices, info.used)


# --- sharding, determinism, resume -----------------------------------------------------------


@given(n=st.integers(1, 300), b=st.integers(1, 16), world=st.integers(1, 5), seed=st.integers(0, 9))
def test_rank_shards_are_disjoint_equal_and_cover_all_but_the_tail(n, b, world, seed):
    if n < b * world:
        with pytest.raises(DataError, match="fewer than one global batch"):
            ShardedBatchSampler(n, b, 0, world, seed)
        return
    samplers = [ShardedBatchSampler(n, b, r, world, seed) for r in range(world)]
    steps = samplers[0].steps_per_epoch
    assert steps == n // (b * world)
    for epoch in range(2):
        shards = [
            np.concatenate([s.indices(epoch * steps + k) for k in range(steps)]) for s in samplers
        ]
        everything = np.concatenate(shards)
        assert all(len(x) == steps * b for x in shards)  # same number of samples per rank
        assert len(set(everything.tolist())) == len(everything)  # disjoint, no repeats
        assert len(everything) == n - n % (b * world)  # only the tail is dropped
        assert set(everything.tolist()) <= set(range(n))


def test_epochs_are_different_permutations():
    s = ShardedBatchSampler(64, 8, 0, 1, seed=3)
    assert not np.array_equal(s.permutation(0), s.permutation(1))
    assert np.array_equal(s.permutation(1), ShardedBatchSampler(64, 8, 0, 1, seed=3).permutation(1))
    assert not np.array_equal(
        s.permutation(0), ShardedBatchSampler(64, 8, 0, 1, seed=4).permutation(0)
    )


def _take(it, n):
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _same(a, b):
    (ca, ia), (cb, ib) = a, b
    return (
        all(torch.equal(x, y) for x, y in zip(ca, cb, strict=True))
        and (ia.epoch, ia.step, ia.step_in_epoch) == (ib.epoch, ib.step, ib.step_in_epoch)
        and torch.equal(ia.indices, ib.indices)
    )


def test_batches_do_not_depend_on_the_number_of_workers():
    ds = SyntheticImages(48, size=64)
    runs = [_take(pretrain_loader(ds, TINY, 4, seed=5, num_workers=w), 14) for w in (0, 2)]
    assert all(_same(a, b) for a, b in zip(*runs, strict=True))  # 14 steps: crosses an epoch
    assert runs[0][12][1].epoch == 1 and runs[0][12][1].step_in_epoch == 0


def test_resume_at_step_k_gives_the_tail_of_a_straight_run():
    ds = SyntheticImages(40, size=48)
    straight = _take(pretrain_loader(ds, TINY, 4, rank=1, world_size=2, seed=7), 9)
    for k in (3, 5, 6):  # 5 steps per epoch: resume inside epoch 0, at the boundary, inside 1
        resumed = _take(pretrain_loader(ds, TINY, 4, 1, 2, 7, start_step=k, num_workers=1), 9 - k)
        assert all(_same(a, b) for a, b in zip(straight[k:], resumed, strict=True))
    other_rank = _take(pretrain_loader(ds, TINY, 4, rank=0, world_size=2, seed=7), 1)
    assert not set(other_rank[0][1].indices.tolist()) & set(straight[0][1].indices.tolist())


# --- skips ------------------------------------------------------------------------------------


def _folder_with_bad_files(tmp_path) -> ImageFolder:
    for i in range(12):
        _noise(40, 36, seed=i).save(tmp_path / f"good{i:02d}.png")
    for name, (data, _) in BAD_FILES.items():
        (tmp_path / name).write_bytes(data)
    return ImageFolder(tmp_path)


def test_skip_counts_reach_the_main_process_with_workers(tmp_path):
    ds = _folder_with_bad_files(tmp_path)
    bad = {
        i: reason
        for i in range(len(ds))
        for name, (_, reason) in BAD_FILES.items()
        if ds.path(i).name == name
    }
    assert len(bad) == len(BAD_FILES) and len(ds) == 20
    batches = _take(pretrain_loader(ds, TINY, 4, seed=1, num_workers=2), 10)  # 2 epochs
    expected: Counter[str] = Counter()
    for _, info in batches:
        for i in info.indices.tolist():
            while i in bad:  # the rule: the next index that decodes
                expected[bad[i]] += 1
                i = (i + 1) % len(ds)
        assert all(c.shape[0] == 4 for c in _)  # batch size is kept
        assert not set(info.used.tolist()) & set(bad)
    assert batches[-1][1].skipped_total == dict(expected)
    assert sum(sum(info.skipped.values()) for _, info in batches) == expected.total() > 0
    assert set(expected) <= set(r for _, r in BAD_FILES.values())


def test_a_folder_of_only_bad_files_is_a_data_error(tmp_path):
    for name, (data, _) in list(BAD_FILES.items())[:4]:
        (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match="undecodable images in a row"):
        next(pretrain_loader(ImageFolder(tmp_path), TINY, 2))


# --- evaluation -------------------------------------------------------------------------------


def test_eval_loader_shards_resizes_and_labels():
    ds = SyntheticImages(23, num_classes=4, size=80)
    seen = []
    for rank in range(2):
        loader = eval_loader(ds, 64, 5, rank=rank, world_size=2, num_workers=rank)
        batches = list(loader)
        assert len(batches) == len(loader) == 3  # 12 and 11 images in batches of 5
        for b in batches:
            assert b.images.dtype == torch.float32 and b.images.shape[1:] == (3, 64, 64)
            assert b.labels.tolist() == [ds.label(i) for i in b.indices.tolist()]
            seen += b.indices.tolist()
    assert sorted(seen) == list(range(23))
    one = next(iter(eval_loader(ds, 80, 23, resize=80)))  # resize = size: the whole image
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (torch.from_numpy(np.array(ds[0])).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(one.images[0], expected)
