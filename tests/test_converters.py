"""Converters on tiny fake releases built here, error cases, the CLI, and exact counts on the shared copies."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usad_bench.cli import main
from usad_bench.data.converters import prepare
from usad_bench.data.images import load_mask
from usad_bench.data.manifest import read_manifest
from usad_bench.data.summary import summarise
from usad_bench.errors import UsadError

GREEN, RED, BLACK = (0, 255, 0), (255, 0, 0), (0, 0, 0)


def _image(path: Path, size: tuple[int, int] = (24, 16), seed: int = 0) -> Path:
    """A small grayscale speckle-like PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (24, 16), box=None, colour=(255, 255, 255), mode="L") -> Path:
    """A mask of ``size`` with the rectangle ``box`` = (x0, y0, x1, y1) painted in ``colour``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        arr[y0:y1, x0:x1] = colour
    Image.fromarray(arr).convert(mode).save(path)
    return path


def _rows(out: Path) -> dict:
    return read_manifest(out / "manifest.csv").by_id()


def _lesion(sample) -> np.ndarray:
    with Image.open(sample.image) as im:
        size = im.size
    return load_mask(sample.masks, size, sample.image)


# ----------------------------------------------------------------------------- BUSI
@pytest.fixture
def busi_tree(tmp_path: Path) -> Path:
    root = tmp_path / "busi" / "Dataset_BUSI_with_GT"
    _image(root / "normal" / "normal (1).png")
    _mask(root / "normal" / "normal (1)_mask.png")
    _image(root / "benign" / "benign (1).png")
    _mask(root / "benign" / "benign (1)_mask.png", box=(0, 0, 4, 4))
    _mask(root / "benign" / "benign (1)_mask_1.png", box=(10, 10, 14, 14))
    # "benign (10)_mask" must not be taken for a mask of "benign (1)".
    _image(root / "benign" / "benign (10).png", seed=1)
    _mask(root / "benign" / "benign (10)_mask.png", box=(5, 5, 8, 8))
    _image(root / "malignant" / "malignant (1).png", size=(20, 20))
    _mask(root / "malignant" / "malignant (1)_mask.png", size=(20, 20), box=(2, 2, 6, 6))
    return tmp_path / "busi"


@pytest.mark.parametrize("level", ["parent", "release"])
def test_busi_unites_masks_and_treats_normals_as_background(busi_tree: Path, tmp_path: Path, level: str):
    src = busi_tree if level == "parent" else busi_tree / "Dataset_BUSI_with_GT"
    rows = _rows(prepare("busi", src, tmp_path / "out").parent)
    assert list(rows) == ["busi/normal (1)", "busi/benign (1)", "busi/benign (10)", "busi/malignant (1)"]
    normal, two, one = rows["busi/normal (1)"], rows["busi/benign (1)"], rows["busi/benign (10)"]
    assert normal.masks == () and not normal.is_anomaly and normal.group == normal.id
    assert [m.name for m in two.masks] == ["benign (1)_mask.png", "benign (1)_mask_1.png"]
    assert _lesion(two).sum() == 32  # two 4x4 lesions, united
    assert [m.name for m in one.masks] == ["benign (10)_mask.png"]
    assert {s.domain for s in rows.values()} == {"busi"} and rows["busi/malignant (1)"].label == "malignant"


def test_busi_missing_class_folder_is_named(busi_tree: Path, tmp_path: Path):
    for f in (busi_tree / "Dataset_BUSI_with_GT" / "malignant").iterdir():
        f.unlink()
    (busi_tree / "Dataset_BUSI_with_GT" / "malignant").rmdir()
    with pytest.raises(UsadError, match="lacks malignant"):
        prepare("busi", busi_tree, tmp_path / "out")


# ----------------------------------------------------------------------------- BUS-UCLM
def _uclm_tree(tmp_path: Path, rows: list[tuple[str, str]]) -> Path:
    root = tmp_path / "uclm" / "BUS-UCLM"
    lines = ["Image;Resolution;Label;Doppler;Marks;Combined"] + [f"{n};856x606;{lab};No;No;No" for n, lab in rows]
    root.mkdir(parents=True)
    (root / "INFO.csv").write_text("\n".join(lines) + "\n", encoding="utf-8-sig")  # with the release's BOM
    return root


@pytest.fixture
def uclm_tree(tmp_path: Path) -> Path:
    rows = [("ALWI_000.png", "Benign"), ("ALWI_001.png", "Normal"), ("BOTA_000.png", "Malignant")]
    rows += [("HESN_000.png", "Benign"), ("ZETA_000.png", "Malignant")]
    root = _uclm_tree(tmp_path, rows)
    for i, (name, _) in enumerate(rows):
        _image(root / "images" / name, seed=i)
    _mask(root / "masks" / "ALWI_000.png", box=(2, 2, 6, 6), colour=GREEN, mode="RGB")
    _mask(root / "masks" / "ALWI_001.png", mode="RGB")
    _mask(root / "masks" / "BOTA_000.png", box=(3, 3, 9, 9), colour=RED, mode="RGB")
    _mask(root / "masks" / "ZETA_000.png", box=(3, 3, 9, 9), colour=GREEN, mode="RGB")  # colour contradicts label
    # Like the release's HESN_*: same field of view at another scale (and a slightly different aspect).
    _mask(root / "masks" / "HESN_000.png", size=(48, 28), box=(0, 0, 24, 14), colour=GREEN, mode="RGB")
    return tmp_path / "uclm"


def test_bus_uclm_labels_patients_and_binary_masks(uclm_tree: Path, tmp_path: Path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        rows = _rows(prepare("bus_uclm", uclm_tree, out).parent)
    assert [s.label for s in rows.values()] == ["benign", "normal", "malignant", "benign", "malignant"]
    assert rows["bus_uclm/ALWI_001"].group == rows["bus_uclm/ALWI_000"].group == "bus_uclm:ALWI"
    assert rows["bus_uclm/ALWI_001"].masks == ()
    benign = rows["bus_uclm/ALWI_000"]
    assert benign.masks == ((out / "masks" / "ALWI_000.png").resolve(),)
    assert set(np.unique(np.asarray(Image.open(benign.masks[0])))) == {0, 255}
    assert _lesion(benign).sum() == 16 and _lesion(rows["bus_uclm/BOTA_000"]).sum() == 36
    hesn = _lesion(rows["bus_uclm/HESN_000"])  # resized to its 24x16 image: the lesion is the top-left quarter
    assert hesn.shape == (16, 24) and hesn[:8, :12].all() and not hesn[8:, :].any() and not hesn[:, 12:].any()
    assert "1 masks whose colour disagrees with the INFO.csv label (ZETA_000.png)" in caplog.text


@pytest.mark.parametrize(
    ("name", "size"),
    [("BOTA_000.png", (48, 32)), ("HESN_000.png", (16, 24))],
    ids=["not-hesn", "hesn-other-aspect"],
)
def test_bus_uclm_size_mismatch_is_an_error(uclm_tree: Path, tmp_path: Path, name: str, size: tuple[int, int]):
    _mask(uclm_tree / "BUS-UCLM" / "masks" / name, size=size, colour=RED, mode="RGB")
    stem, (w, h) = name[:-4], size
    with pytest.raises(
        UsadError, match=rf"1 mask\(s\) differ.*{stem}\.png is {w}x{h} but its image {stem}\.png is 24x16"
    ):
        prepare("bus_uclm", uclm_tree, tmp_path / "out")


def test_bus_uclm_missing_info_csv(uclm_tree: Path, tmp_path: Path):
    (uclm_tree / "BUS-UCLM" / "INFO.csv").unlink()
    with pytest.raises(UsadError, match=r"lacks INFO\.csv"):
        prepare("bus_uclm", uclm_tree, tmp_path / "out")


# ----------------------------------------------------------------------------- BUS-BRA
def test_bus_bra_cases_and_devices(tmp_path: Path):
    root = tmp_path / "BUSBRA"
    table = ["ID,Case,Histology,Pathology,BIRADS,Device,Width,Height,Side,BBOX"]
    for i, (name, case, path, device) in enumerate(
        [
            ("bus_0001-l", 1, "malignant", "GE A"),
            ("bus_0001-r", 1, "malignant", "GE A"),
            ("bus_0002-l", 2, "benign", "T"),
        ]
    ):
        table.append(f'{name},{case},x,{path},4,{device},24,16,left,"[1,2,3,4]"')
        _image(root / "Images" / f"{name}.png", seed=i)
        _mask(root / "Masks" / f"mask_{name[4:]}.png", box=(1, 1, 5, 5), mode="1")
    (root / "bus_data.csv").write_text("\n".join(table) + "\n", encoding="utf-8")
    rows = _rows(prepare("bus_bra", root, tmp_path / "out").parent)
    assert [s.group for s in rows.values()] == ["bus_bra:1", "bus_bra:1", "bus_bra:2"]
    assert [s.domain for s in rows.values()] == ["bus_bra:GE A", "bus_bra:GE A", "bus_bra:T"]
    assert all(_lesion(s).sum() == 16 for s in rows.values()) and rows["bus_bra/bus_0002-l"].label == "benign"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"ID,Case\nbus_0001-l,1\n", r"lacks columns \['Pathology', 'Device'\]"),
        (b"ID,Case,Pathology,Device\n\xff\xfe\xfa,1,benign,X\n", "cannot read"),
        (b"ID,Case,Pathology,Device\nbus_0009-l,9,benign,X\n", r"bus_0009-l\.png listed in .* is missing"),
        (b"ID,Case,Pathology,Device\nbus_0009-l,9,cyst,X\n", r"bus_data\.csv:2: unknown class 'cyst'"),
    ],
    ids=["columns", "encoding", "missing-image", "class"],
)
def test_bus_bra_table_errors(tmp_path: Path, content: bytes, message: str):
    (tmp_path / "BUSBRA" / "Images").mkdir(parents=True)
    (tmp_path / "BUSBRA" / "bus_data.csv").write_bytes(content)
    with pytest.raises(UsadError, match=message):
        prepare("bus_bra", tmp_path, tmp_path / "out")


# ----------------------------------------------------------------------------- class folders
@pytest.fixture
def folder_tree(tmp_path: Path) -> Path:
    root = tmp_path / "mydata"
    _image(root / "normal" / "n1.png")
    _image(root / "Benign" / "b1.png", seed=1)
    _mask(root / "masks" / "Benign" / "b1.png", box=(0, 0, 3, 3))
    _image(root / "malignant" / "m1.jpg", seed=2)
    _mask(root / "malignant" / "m1_mask.png", box=(0, 0, 5, 2))
    return root


def test_folder_layout(folder_tree: Path, tmp_path: Path):
    rows = _rows(prepare("folder", folder_tree, tmp_path / "out").parent)
    assert sorted(rows) == ["mydata/b1", "mydata/m1", "mydata/n1"]
    assert {s.id: (s.label, s.is_anomaly) for s in rows.values()} == {
        "mydata/b1": ("benign", True),
        "mydata/m1": ("malignant", True),
        "mydata/n1": ("normal", False),
    }
    assert _lesion(rows["mydata/b1"]).sum() == 9 and _lesion(rows["mydata/m1"]).sum() == 10
    assert rows["mydata/n1"].masks == () and {s.domain for s in rows.values()} == {"mydata"}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: (r / "normal" / "n1.png").unlink(), "class folder .*normal has no images"),
        (lambda r: (r / "normal" / "n1.png").write_bytes(b"not a png"), r"cannot read image .*n1\.png"),
        (lambda r: _mask(r / "masks" / "Benign" / "b1.png", size=(30, 16)), r"b1\.png is 30x16 but its image"),
        (lambda r: _image(r / "normal" / "b1.png"), "share a stem"),
    ],
    ids=["empty-class", "corrupt-image", "mask-size", "duplicate-stem"],
)
def test_folder_errors_keep_the_previous_manifest(folder_tree: Path, tmp_path: Path, damage, message):
    out = tmp_path / "out"
    manifest = prepare("folder", folder_tree, out)
    before = manifest.read_bytes()
    damage(folder_tree)
    with pytest.raises(UsadError, match=message):
        prepare("folder", folder_tree, out)
    assert manifest.read_bytes() == before  # atomic writes: a failed run loses nothing


def test_folder_without_class_folders_and_unknown_kind(tmp_path: Path):
    _image(tmp_path / "flat" / "a.png")
    with pytest.raises(UsadError, match="no class folders"):
        prepare("folder", tmp_path / "flat", tmp_path / "out")
    with pytest.raises(UsadError, match="unknown data kind 'isic'; known: busi, bus_uclm, bus_bra, folder"):
        prepare("isic", tmp_path / "flat", tmp_path / "out")


def test_summary_lists_classes_masks_patients_domains(folder_tree: Path, tmp_path: Path):
    text = summarise(read_manifest(prepare("folder", folder_tree, tmp_path / "out")))
    assert "3 images (mydata): normal 1, benign 1, malignant 1" in text
    assert "masks: 2 images (2 of 2 abnormal)" in text
    assert "patients: 3 groups (one per image: no patient ids)" in text
    assert "mydata      3 images: normal 1, benign 1, malignant 1" in text


def test_cli_prepare(folder_tree: Path, tmp_path: Path, capsys):
    assert main(["data", "prepare", "folder", str(folder_tree), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["data", "prepare", "folder", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: source folder not found")


# ----------------------------------------------------------------------------- shared copies
@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("kind", "classes", "masks", "patients", "domains"),
    [
        ("busi", (133, 437, 210), 647, 780, 1),
        ("bus_uclm", (419, 174, 90), 264, 38, 1),
        ("bus_bra", (0, 1268, 607), 1875, 1064, 4),
    ],
)
def test_shared_release_counts(shared_datasets: Path, tmp_path: Path, kind, classes, masks, patients, domains):
    manifest = read_manifest(prepare(kind, shared_datasets / kind, tmp_path / kind))
    counts = Counter(s.label for s in manifest)
    assert (counts["normal"], counts["benign"], counts["malignant"]) == classes
    assert sum(s.has_mask for s in manifest) == masks and all(s.is_anomaly for s in manifest if s.has_mask)
    assert len({s.group for s in manifest}) == patients
    assert len({s.domain for s in manifest}) == domains
