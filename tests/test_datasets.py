"""Dataset readers and transforms on tiny fake datasets (and the shared real subset)."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lpdseg.data.datasets import (
    FORMATS,
    BadFile,
    MaskedDataset,
    csv_class_names,
    get_format,
    list_split,
    mask_to_label,
    parse_label,
    read_image,
    read_mask,
)
from lpdseg.data.transforms import (
    AugmentConfig,
    EvalTransform,
    TrainTransform,
    stain_jitter,
    to_tensor,
    to_uint8,
)
from lpdseg.errors import ConfigError, DataError

torch.set_num_threads(1)
cv2.setNumThreads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsss4luad-val"
MEAN, STD = FORMATS["bcss_wsss"].mean, FORMATS["bcss_wsss"].std


# ------------------------------------------------------------------ helpers
def rgb(h: int = 16, w: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    im.save(path)
    return path


def save_mask(path: Path, mask: np.ndarray, palette: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask.astype(np.uint8), "L")
    if palette:
        im = im.convert("P")
        im.putpalette([0, 64, 128, 64, 128, 0, 243, 152, 0, 255, 255, 255] + [0] * 756)
    im.save(path)
    return path


def fmt_label(vec, fmt: str) -> str:
    if fmt == "bcss_wsss":
        return "[" + "".join(map(str, vec)) + "]"
    if fmt == "luad_histoseg":
        return "[" + " ".join(map(str, vec)) + "]"
    return "[" + ", ".join(map(str, vec)) + "]"


def train_name(vec, fmt: str, stem: str = "p1") -> str:
    sep = "+slideA" if fmt == "bcss_wsss" else "-12-34-"
    return f"{stem}{sep}{fmt_label(vec, fmt)}.png"


def make_masked_split(base: Path, n: int, num_classes: int, size=(16, 16), palette=False) -> None:
    for i in range(n):
        save(base / "img" / f"{i:02d}.png", rgb(*size, seed=i))
        mask = np.full(size, num_classes, np.uint8)
        mask[: size[0] // 2] = i % num_classes
        save_mask(base / "mask" / f"{i:02d}.png", mask, palette)


def make_dataset(
    root: Path, fmt: str, labels, val_name: str = "val", train_name_: str = "training"
):
    for i, vec in enumerate(labels):
        save(root / train_name_ / train_name(vec, fmt, stem=f"p{i}"), rgb(seed=i))
    c = len(FORMATS[fmt].class_names)
    make_masked_split(root / val_name, 3, c, palette=(fmt == "wsss4luad"))
    make_masked_split(root / "test", 2, c)
    return root


# ------------------------------------------------------------------ formats / labels
def test_formats_table():
    assert set(FORMATS) == {"bcss_wsss", "luad_histoseg", "wsss4luad"}
    assert get_format("bcss_wsss").class_names == ("TUM", "STR", "LYM", "NEC")
    assert get_format("bcss_wsss").mean == (0.6679, 0.4779, 0.7062)
    assert get_format("luad_histoseg").class_names == ("TE", "NEC", "LYM", "TAS")
    assert get_format("wsss4luad").class_names == ("TUM", "STR", "NOR")
    with pytest.raises(ConfigError, match="bcss_wsss.*luad_histoseg.*wsss4luad"):
        get_format("camelyon")


@pytest.mark.parametrize(
    ("name", "fmt", "expected"),
    [
        ("123+TCGA-A1-A0SK[1101].png", "bcss_wsss", [1, 1, 0, 1]),
        ("img_77-[0 1 0 1].png", "luad_histoseg", [0, 1, 0, 1]),
        ("436219-9328-56427-[1, 1, 0].png", "wsss4luad", [1, 1, 0]),
    ],
)
def test_parse_label_formats(name, fmt, expected):
    label = parse_label(name, fmt)
    assert label.dtype == np.uint8 and label.tolist() == expected


@pytest.mark.parametrize(
    ("name", "fmt", "word"),
    [
        ("a+b[110].png", "bcss_wsss", "3 values"),
        ("a+b[11011].png", "bcss_wsss", "5 values"),
        ("a+b[1201].png", "bcss_wsss", "non-0/1"),
        ("a-[1 x 0 1].png", "luad_histoseg", "non-0/1"),
        ("a+b.png", "bcss_wsss", "no image-level label"),
        ("x-1-2-1, 1, 0.png", "wsss4luad", "no image-level label"),
        ("a+b[0000].png", "bcss_wsss", "no positive class"),
        ("x-1-2-[0, 0, 0].png", "wsss4luad", "no positive class"),
    ],
)
def test_parse_label_errors_name_the_file(name, fmt, word, raises_naming):
    raises_naming(lambda: parse_label(name, fmt), name, word)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), fmt=st.sampled_from(sorted(FORMATS)))
def test_parse_label_roundtrip_property(data, fmt):
    c = len(FORMATS[fmt].class_names)
    vec = data.draw(st.lists(st.integers(0, 1), min_size=c, max_size=c).filter(any))
    stem = data.draw(st.text("abcXYZ0123_+-", min_size=1, max_size=12))
    assert parse_label(f"{stem}{fmt_label(vec, fmt)}.png", fmt).tolist() == vec
    assert parse_label(Path("/some/dir") / train_name(vec, fmt), fmt).tolist() == vec


# ------------------------------------------------------------------ layouts
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_layouts_parse(tmp_path, fmt):
    c = len(FORMATS[fmt].class_names)
    labels = [[1] + [0] * (c - 1), [0] * (c - 1) + [1], [1] * c]
    root = make_dataset(tmp_path / fmt, fmt, labels)
    train, bad = list_split(root, fmt, "train")
    assert not bad and len(train) == 3
    assert [s.label.tolist() for s in train] == labels  # sorted by path: p0, p1, p2
    assert all(s.mask is None for s in train)
    val, _ = list_split(root, fmt, "val")
    test, _ = list_split(root, fmt, "test")
    assert len(val) == 3 and len(test) == 2
    assert all(s.label is None and s.mask.stem == s.image.stem for s in val + test)
    assert [s.image for s in val] == sorted(s.image for s in val)


@pytest.mark.parametrize(("val_name", "train_dir"), [("val", "train"), ("valid", "training")])
def test_val_and_valid_and_train_folder_names(tmp_path, val_name, train_dir):
    root = make_dataset(tmp_path, "luad_histoseg", [[1, 0, 0, 1]], val_name, train_dir)
    assert len(list_split(root, "luad_histoseg", "val")[0]) == 3
    assert len(list_split(root, "luad_histoseg", "train")[0]) == 1


def test_val_falls_back_to_root_img_mask(tmp_path, raises_naming):
    make_masked_split(tmp_path, 2, 3, palette=True)
    val, _ = list_split(tmp_path, "wsss4luad", "val")
    assert [s.image.name for s in val] == ["00.png", "01.png"]
    raises_naming(lambda: list_split(tmp_path, "wsss4luad", "test"), str(tmp_path), "img/, mask/")


def test_bare_training_folder(tmp_path):
    save(tmp_path / train_name([1, 0, 0], "wsss4luad"), rgb())
    train, _ = list_split(tmp_path, "wsss4luad", "train")
    assert len(train) == 1


def test_missing_and_empty_folders(tmp_path, raises_naming):
    raises_naming(
        lambda: list_split(tmp_path / "nope", "bcss_wsss", "train"), "nope", "does not exist"
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "test").mkdir()
    msg = raises_naming(lambda: list_split(tmp_path, "bcss_wsss", "train"), "training", "train")
    assert "other/" in msg and "test/" in msg  # lists what was found
    msg = raises_naming(lambda: list_split(tmp_path, "bcss_wsss", "val"), "val", "valid")
    assert "other/" in msg
    (tmp_path / "training").mkdir()
    raises_naming(lambda: list_split(tmp_path, "bcss_wsss", "train"), "training", "empty")
    (tmp_path / "test" / "img").mkdir()
    raises_naming(lambda: list_split(tmp_path, "bcss_wsss", "test"), "mask", "missing")
    (tmp_path / "test" / "mask").mkdir()
    raises_naming(lambda: list_split(tmp_path, "bcss_wsss", "test"), "img", "empty")
    with pytest.raises(ConfigError, match="train, val, test"):
        list_split(tmp_path, "bcss_wsss", "holdout")


def test_image_without_mask_and_skip_bad(tmp_path, caplog, raises_naming):
    make_masked_split(tmp_path / "val", 3, 4)
    save(tmp_path / "val" / "img" / "lonely.png", rgb())
    raises_naming(lambda: list_split(tmp_path, "bcss_wsss", "val"), "lonely.png", "no mask")
    with caplog.at_level(logging.WARNING):
        val, bad = list_split(tmp_path, "bcss_wsss", "val", skip_bad=True)
    assert len(val) == 3
    assert [b.path.name for b in bad] == ["lonely.png"] and "no mask" in bad[0].reason
    assert isinstance(bad[0], BadFile)
    assert "lonely.png" in caplog.text


def test_bad_training_files_reported_or_skipped(tmp_path, caplog, raises_naming):
    fmt = "bcss_wsss"
    good = save(tmp_path / "training" / train_name([1, 0, 0, 0], fmt), rgb())
    names = {
        "x+s[110].png": "3 values",
        "y+s[0000].png": "no positive class",
        "notes.txt": "not an image",
        "z+s[1000].png": "empty",  # zero bytes
        "w+s[0100].png": "not a readable image",  # text named .png
    }
    for n in ("x+s[110].png", "y+s[0000].png"):
        save(tmp_path / "training" / n, rgb())
    (tmp_path / "training" / "notes.txt").write_text("hello")
    (tmp_path / "training" / "z+s[1000].png").write_bytes(b"")
    (tmp_path / "training" / "w+s[0100].png").write_text("this is text, not a PNG")
    (tmp_path / "training" / ".DS_Store").write_bytes(b"junk")  # ignored
    with pytest.raises(DataError) as info:
        list_split(tmp_path, fmt, "train")
    assert any(n in str(info.value) for n in names)
    with caplog.at_level(logging.WARNING):
        train, bad = list_split(tmp_path, fmt, "train", skip_bad=True)
    assert [s.image for s in train] == [good]
    reasons = {b.path.name: b.reason for b in bad}
    assert set(reasons) == set(names)
    for n, word in names.items():
        assert word in reasons[n], (n, reasons[n])
        assert n in caplog.text
    # without skip_bad each one alone raises with its name
    for n in names:
        folder = tmp_path / f"only_{n[0]}"
        (folder / "training").mkdir(parents=True)
        (folder / "training" / n).write_bytes((tmp_path / "training" / n).read_bytes())
        if n == "w+s[0100].png":
            raises_naming(lambda f=folder: list_split(f, fmt, "train", check_images=True), n)
        else:
            raises_naming(lambda f=folder: list_split(f, fmt, "train"), n)


# ------------------------------------------------------------------ reading images
def test_read_image_unreadable_files(tmp_path, raises_naming):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    raises_naming(lambda: read_image(empty), "empty.png", "0 bytes")
    text = tmp_path / "text.png"
    text.write_text("not an image at all")
    raises_naming(lambda: read_image(text), "text.png", "not a readable image")
    full = save(tmp_path / "full.png", rgb(64, 64))
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    raises_naming(lambda: read_image(trunc), "trunc.png", "truncated")
    raises_naming(lambda: read_image(tmp_path / "gone.png"), "gone.png", "does not exist")


def test_read_image_conversions(tmp_path):
    # images are at least MIN_IMAGE_SIDE (8) px on a side: small patterns are tiled up
    arr = rgb(9, 11)
    out = read_image(save(tmp_path / "rgb.png", arr))
    assert out.dtype == np.uint8 and out.shape == (9, 11, 3) and np.array_equal(out, arr)

    gray = arr[:, :, 0]
    out = read_image(save(tmp_path / "gray.png", gray, "L"))
    assert out.shape == (9, 11, 3) and all(np.array_equal(out[:, :, i], gray) for i in range(3))

    rgba = np.zeros((8, 9, 4), np.uint8)
    rgba[..., :3] = (200, 10, 50)
    rgba[..., 3] = [0, 255, 128] * 3
    out = read_image(save(tmp_path / "rgba.png", rgba, "RGBA"))
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert out[0, 1].tolist() == [200, 10, 50]  # opaque -> colour
    a = 128 / 255
    assert out[0, 2].tolist() == [round(c * a + 255 * (1 - a)) for c in (200, 10, 50)]

    g16 = np.tile(np.array([[0, 257 * 100, 65535]], np.uint16), (8, 3))
    path16 = tmp_path / "g16.png"
    Image.fromarray(g16).save(path16)
    assert Image.open(path16).mode.startswith("I")
    out = read_image(path16)
    assert out.shape == (8, 9, 3) and out[0, :3, 0].tolist() == [0, 100, 255]

    rgb16 = np.zeros((8, 8, 3), np.uint16)
    rgb16[..., 2], rgb16[..., 1] = 65535, 257 * 100  # cv2 writes BGR: R = 65535, G = 100 * 257
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16)
    assert read_image(tmp_path / "rgb16.png")[0, 0].tolist() == [255, 100, 0]

    pal = Image.fromarray(np.tile(np.array([[0, 1], [1, 0]], np.uint8), (4, 4)), "L").convert("P")
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    out = read_image(tmp_path / "pal.png")
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [200, 100, 50]


# ------------------------------------------------------------------ reading masks
def test_read_mask_modes_and_errors(tmp_path, raises_naming):
    m = np.array([[0, 1, 2], [3, 255, 3]], np.uint8)
    assert np.array_equal(read_mask(save_mask(tmp_path / "l.png", m), 3), m)
    pm = np.array([[0, 1, 2], [3, 3, 3]], np.uint8)
    p = save_mask(tmp_path / "p.png", pm, palette=True)
    assert Image.open(p).mode == "P"
    assert np.array_equal(read_mask(p, 3, expected_hw=(2, 3)), pm)

    raises_naming(lambda: read_mask(p, 3, expected_hw=(3, 2)), "p.png", "2x3", "3x2")
    bad = save_mask(tmp_path / "range.png", np.array([[0, 7, 9, 4]], np.uint8))
    msg = raises_naming(lambda: read_mask(bad, 3), "range.png", "7", "9", "0..2", "255")
    assert "4" in msg
    assert read_mask(bad, 9).max() == 9  # 9 = background when C = 9
    col = save(tmp_path / "rgbmask.png", rgb(4, 4))
    raises_naming(lambda: read_mask(col, 4), "rgbmask.png", "index PNG")
    empty = tmp_path / "emptymask.png"
    empty.write_bytes(b"")
    raises_naming(lambda: read_mask(empty, 4), "emptymask.png")


def test_mask_to_label():
    m = np.full((10, 10), 4, np.uint8)
    m[0, 0] = 0  # 1 %
    m[1:6] = 2  # 50 %
    m[9] = 255  # ignored
    assert mask_to_label(m, 4).tolist() == [1, 0, 1, 0]
    assert mask_to_label(m, 4, min_fraction=0.02).tolist() == [0, 0, 1, 0]
    assert mask_to_label(torch.from_numpy(m).long(), 4).tolist() == [1, 0, 1, 0]
    assert mask_to_label(np.full((3, 3), 255, np.uint8), 4).tolist() == [0, 0, 0, 0]


# ------------------------------------------------------------------ CSV
def write_csv(path: Path, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


def test_csv_manifest(tmp_path, raises_naming):
    save(tmp_path / "imgs" / "a.png", rgb())
    save(tmp_path / "imgs" / "b.png", rgb())
    save_mask(tmp_path / "masks" / "b.png", np.zeros((16, 16), np.uint8))
    csv = write_csv(
        tmp_path / "labels.csv",
        [
            "image,fat,muscle,mask,split",
            "imgs/b.png,0,1,masks/b.png,train",
            "imgs/a.png,1,1,,train",
            "imgs/b.png,0,1,masks/b.png,valid",
        ],
    )
    assert csv_class_names(csv) == ("fat", "muscle")
    train, bad = list_split(tmp_path, "csv", "train", csv_path="labels.csv")
    assert not bad and [s.image.name for s in train] == ["a.png", "b.png"]
    assert [s.label.tolist() for s in train] == [[1, 1], [0, 1]]
    assert train[0].mask is None and train[1].mask == tmp_path / "masks" / "b.png"
    val, _ = list_split(tmp_path, "csv", "val", csv_path=csv)
    assert len(val) == 1 and val[0].mask is not None and val[0].label is None
    raises_naming(
        lambda: list_split(tmp_path, "csv", "test", csv_path=csv), "labels.csv", "no test"
    )


def test_csv_errors_and_escape(tmp_path, raises_naming):
    root = tmp_path / "data"
    save(root / "a.png", rgb())
    save(tmp_path / "outside.png", rgb())
    write_csv(root / "train.csv", ["image,x,y", "a.png,1,0", "../outside.png,0,1"])
    raises_naming(
        lambda: list_split(root, "csv", "train"), "outside.png", "outside the CSV's folder"
    )
    train, bad = list_split(root, "csv", "train", skip_bad=True)
    assert [s.image.name for s in train] == ["a.png"] and len(bad) == 1
    both, _ = list_split(root, "csv", "train", allow_outside_root=True)
    assert len(both) == 2
    absolute = write_csv(root / "abs.csv", ["image,x,y", f"{tmp_path / 'outside.png'},1,0"])
    raises_naming(lambda: list_split(root, "csv", "train", csv_path=absolute), "outside.png")
    nonbin = write_csv(root / "nb.csv", ["image,x,y", "a.png,2,0"])
    raises_naming(
        lambda: list_split(root, "csv", "train", csv_path=nonbin), "a.png", "nb.csv", "0 or 1"
    )
    missing = write_csv(root / "m.csv", ["image,x,y", "nothere.png,1,0"])
    raises_naming(
        lambda: list_split(root, "csv", "train", csv_path=missing), "nothere.png", "m.csv"
    )
    nohead = write_csv(root / "h.csv", ["path,x", "a.png,1"])
    raises_naming(lambda: list_split(root, "csv", "train", csv_path=nohead), "h.csv", "'image'")
    raises_naming(lambda: list_split(root, "csv", "val"), str(root), "val.csv")


# ------------------------------------------------------------------ datasets / collate
def test_training_and_masked_datasets_and_eval_collate(tmp_path, raises_naming):
    from lpdseg.data.loaders import SeededWeakDataset, collate_eval

    root = make_dataset(tmp_path, "bcss_wsss", [[1, 0, 1, 0], [0, 1, 0, 0]])
    train, _ = list_split(root, "bcss_wsss", "train")
    ds = SeededWeakDataset(train, TrainTransform(AugmentConfig(crop_size=8)), seed=0, epoch=0)
    item = ds[0]
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0  # RGB: models normalise
    assert item["label"].tolist() == [1.0, 0.0, 1.0, 0.0] and item["label"].dtype == torch.float32
    assert torch.equal(item["image"], ds[0]["image"])  # seeded by (seed, epoch, index)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 8, 8)

    # a val image of another size -> the eval collate keeps lists
    save(root / "val" / "img" / "big.png", rgb(20, 12))
    big_mask = np.full((20, 12), 4, np.uint8)
    big_mask[0, 0] = 3
    save_mask(root / "val" / "mask" / "big.png", big_mask)
    val, _ = list_split(root, "bcss_wsss", "val")
    mds = MaskedDataset(val, 4, EvalTransform())
    item = mds[[s.image.name for s in val].index("big.png")]
    assert item["image"].shape == (3, 20, 12) and item["mask"].dtype == torch.long
    assert item["label"].tolist() == [0.0, 0.0, 0.0, 1.0]
    mixed = collate_eval([mds[i] for i in range(len(mds))])
    assert isinstance(mixed["image"], list) and len(mixed["image"]) == 4
    same = collate_eval([mds[i] for i in range(len(mds)) if val[i].image.name != "big.png"])
    assert same["image"].shape == (3, 3, 16, 16) and same["mask"].shape == (3, 16, 16)
    assert same["label"].shape == (3, 4) and len(same["name"]) == 3

    # a mask of the wrong size is reported when read
    save_mask(root / "val" / "mask" / "big.png", np.zeros((5, 5), np.uint8))
    mds = MaskedDataset(val, 4, EvalTransform())
    raises_naming(
        lambda: mds[[s.image.name for s in val].index("big.png")], "big.png", "5x5", "20x12"
    )


# ------------------------------------------------------------------ transforms
def coord_image(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image with R = row, G = column (so content encodes coordinates), and masks of each."""
    ys, xs = np.mgrid[:h, :w]
    image = np.stack([ys, xs, np.full_like(ys, 77)], axis=-1).astype(np.uint8)
    return image, ys.astype(np.uint8), xs.astype(np.uint8)


@pytest.mark.parametrize(
    ("size", "scale"), [((200, 250), (1.0, 1.0)), ((40, 30), (1.0, 1.0)), ((150, 170), (0.8, 1.25))]
)
def test_train_transform_keeps_image_and_mask_aligned(size, scale):
    image, mask_y, mask_x = coord_image(*size)
    t = TrainTransform(AugmentConfig(crop_size=64, color_jitter=0.0, scale=scale))
    tol = 0 if scale == (1.0, 1.0) else 2
    seen = set()
    for seed in range(8):
        img_y, my = t(image, mask_y, rng=np.random.default_rng(seed))
        img_x, mx = t(image, mask_x, rng=np.random.default_rng(seed))
        assert torch.equal(img_y, img_x)
        assert img_y.shape == (3, 64, 64) and my.shape == (64, 64) and my.dtype == torch.long
        rgb_out = to_uint8(img_y).astype(int)
        valid = my.numpy() != 255
        assert np.abs(rgb_out[..., 0][valid] - my.numpy()[valid]).max() <= tol
        assert np.abs(rgb_out[..., 1][valid] - mx.numpy()[valid]).max() <= tol
        if size == (40, 30):  # smaller than the crop: padded with white / ignore
            assert valid.sum() == 40 * 30 and (rgb_out[~valid] == 255).all()
        seen.add(rgb_out.tobytes())
    assert len(seen) > 4  # geometry actually varies with the seed


def test_train_transform_reproducible_and_jitter():
    image = rgb(48, 48, seed=3)
    t = TrainTransform(AugmentConfig(crop_size=32, color_jitter=0.3, scale=(0.9, 1.1)))
    a = t(image, rng=np.random.default_rng(5))
    assert torch.equal(a, t(image, rng=np.random.default_rng(5)))
    torch.manual_seed(11)
    b = t(image)
    torch.manual_seed(11)
    assert torch.equal(b, t(image))
    assert not torch.equal(b, t(image))
    out = to_uint8(a)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    plain = TrainTransform(
        AugmentConfig(crop_size=48, hflip=False, vflip=False, rot90=False, color_jitter=0.0)
    )
    assert np.array_equal(to_uint8(plain(image)), image)
    with pytest.raises(ConfigError):
        AugmentConfig(color_jitter=1.5)
    with pytest.raises(ConfigError):
        AugmentConfig(scale=(1.2, 0.8))


def _stain_jitter_reference(x: np.ndarray, a, b) -> np.ndarray:
    """One pixel at a time: optical density, deconvolve, scale/shift each stain, reconvolve."""
    m = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    m = m / np.linalg.norm(m, axis=1, keepdims=True)  # stain vectors (rows) of unit length
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            od = -np.log(np.clip(x[i, j].astype(np.float64), 1 / 255, 1))
            amounts = np.linalg.solve(m.T, od)  # od = sum_k amount_k * m[k]
            new_od = sum((a[k] * amounts[k] + b[k]) * m[k] for k in range(3))
            out[i, j] = np.exp(-np.clip(new_od, 0, np.log(255)))
    return np.clip(out, 0, 1)


def test_stain_jitter_matches_colour_deconvolution_reference():
    x = rgb(6, 7, seed=8).astype(np.float32) / 255
    rng = np.random.default_rng(3)
    got = stain_jitter(x, 0.2, rng)
    draw = np.random.default_rng(3)
    a, b = draw.uniform(0.8, 1.2, 3), draw.uniform(-0.2, 0.2, 3)
    assert np.allclose(got, _stain_jitter_reference(x, a, b), atol=1e-5)
    assert got.dtype == np.float32
    # identity stain change gives the image back; strength 0 draws nothing
    assert np.allclose(_stain_jitter_reference(x, np.ones(3), np.zeros(3)), np.clip(x, 1 / 255, 1))
    rng0 = np.random.default_rng(4)
    assert stain_jitter(x, 0.0, rng0) is x
    assert rng0.random() == np.random.default_rng(4).random()
    # more eosin: pinker (green falls most, since eosin absorbs green)
    pink = stain_jitter(np.full((1, 1, 3), 0.7, np.float32), 0.0, rng0)
    more_e = _stain_jitter_reference(pink, [1, 1, 1], [0, 0.3, 0])
    assert more_e[0, 0, 1] < more_e[0, 0, 0] and more_e[0, 0, 1] < more_e[0, 0, 2]


def test_train_transform_stain_jitter_setting():
    image = rgb(32, 32, seed=9)
    plain = dict(crop_size=32, hflip=False, vflip=False, rot90=False, color_jitter=0.0)
    off = TrainTransform(AugmentConfig(**plain))(image, rng=np.random.default_rng(1))
    on = TrainTransform(AugmentConfig(**plain, stain_jitter=0.1))(
        image, rng=np.random.default_rng(1)
    )
    assert np.array_equal(to_uint8(off), image) and not torch.equal(on, off)
    with pytest.raises(ConfigError, match="stain_jitter"):
        AugmentConfig(stain_jitter=1.0)


def test_to_tensor_roundtrip_and_eval_transform():
    image = rgb(9, 11, seed=4)
    x = to_tensor(image)
    assert x.shape == (3, 9, 11) and x.dtype == torch.float32
    # the data pipeline gives RGB in [0, 1]; models normalise their own input
    assert np.array_equal(x[:, 0, 0].numpy(), (image[0, 0] / np.float32(255.0)).astype(np.float32))
    assert np.array_equal(to_uint8(x), image)
    assert np.array_equal(to_uint8(torch.stack([x, x]))[1], image)
    e = EvalTransform()
    assert torch.equal(e(image), x)
    with pytest.raises(ValueError, match="uint8"):
        e(image.astype(np.float32))


# ------------------------------------------------------------------ real data
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared WSSS4LUAD subset not found at {SHARED}")
def test_real_wsss4luad_subset():
    train, bad = list_split(SHARED, "wsss4luad", "train")
    assert not bad and len(train) == 4
    labels = {s.image.name: s.label.tolist() for s in train}
    assert labels["436219-9328-56427-[1, 1, 0].png"] == [1, 1, 0]
    assert labels["449636-23526-9666-[0, 0, 1].png"] == [0, 0, 1]
    val, bad = list_split(SHARED, "wsss4luad", "val")  # img/ + mask/ at the root
    assert not bad and len(val) == 31
    ds = MaskedDataset(val[:3], 3, EvalTransform())
    for i in range(3):
        item = ds[i]
        h, w = item["mask"].shape
        assert item["image"].shape == (3, h, w) and 150 <= min(h, w) and max(h, w) <= 900
        values = set(item["mask"].unique().tolist())
        assert values <= {0, 1, 2, 3}
        assert item["label"].tolist() == [float(c in values) for c in range(3)]
    image = read_image(train[0].image)
    assert image.dtype == np.uint8 and image.shape[2] == 3
