"""Users' own data (issue 12): each release layout that used to go through silently wrong, built here small.

Every test makes a tiny folder tree that reproduced one failure and checks the fixed behaviour:
the right ground truth, or a warning line with a count and example files, or one error line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from usad_bench.cli import main
from usad_bench.data.converters import prepare
from usad_bench.data.folder import FolderOptions, looks_normal, sequence_base
from usad_bench.data.images import MaskRule, load_mask, load_rgb, masks_among
from usad_bench.data.manifest import Manifest, Sample, read_manifest
from usad_bench.data.preprocess import Preprocess
from usad_bench.data.sampler import sample_support
from usad_bench.data.summary import empty_mask_lines
from usad_bench.errors import UsadError
from usad_bench.prompts import load_prompts
from usad_bench.runner import Collected, _unlabelled_samples, exclude_support, score_test

SIZE = (24, 16)  # (width, height) of every test image


def _image(path: Path, seed: int = 0, size=SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)).save(path)
    return path


def _array_mask(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _box(value, box=(2, 2, 6, 6), size=SIZE, channels: int = 0, dtype=np.uint8) -> np.ndarray:
    """A mask with ``box`` = (x0, y0, x1, y1) set to ``value`` (a number or an RGB triple)."""
    arr = np.zeros((size[1], size[0], channels) if channels else (size[1], size[0]), dtype=dtype)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = value
    return arr


def _prepare(src: Path, out: Path, **options) -> dict[str, Sample]:
    return read_manifest(prepare("folder", src, out, FolderOptions(**options) if options else None)).by_id()


def _lesion(sample: Sample) -> np.ndarray:
    return load_mask(sample.masks, SIZE, sample.image)


def _warning(caplog, text: str) -> str:
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]
    assert len(lines) == 1, (text, [r.getMessage() for r in caplog.records])
    return lines[0]


# ----------------------------------------------------------------------------- 1. mask codes
def test_low_colour_codes_and_label_indices_are_lesion(tmp_path: Path):
    root = tmp_path / "thyroid"
    _image(root / "normal" / "n1.png")
    codes = {"c1": (64, 0, 0), "c2": (0, 64, 0), "c3": (0, 0, 64), "c4": (64, 64, 64)}
    for i, (stem, colour) in enumerate(codes.items()):
        _image(root / "nodule" / f"{stem}.png", seed=i + 1)
        _array_mask(root / "masks" / "nodule" / f"{stem}.png", _box(colour, channels=3))
    _image(root / "nodule" / "idx.png", seed=9)
    label_index = _box(1)
    label_index[10:12, 10:14] = 2
    _array_mask(root / "masks" / "nodule" / "idx.png", label_index)
    rows = _prepare(root, tmp_path / "out")
    assert all(_lesion(rows[f"thyroid/{stem}"]).sum() == 16 for stem in codes)  # were read as empty (<= 127)
    assert _lesion(rows["thyroid/idx"]).sum() == 16 + 8
    assert empty_mask_lines(list(rows.values())) == ["empty masks (thyroid): 0 of 5"]


def test_background_and_keep_codes_write_binary_masks(tmp_path: Path):
    root = tmp_path / "liver"
    _image(root / "normal" / "n1.png")
    _image(root / "lesion" / "a.png", seed=1)
    two_codes = _box((64, 0, 0), channels=3)
    two_codes[10:12, 10:14] = (0, 64, 0)
    _array_mask(root / "masks" / "lesion" / "a.png", two_codes)
    rows = _prepare(root, tmp_path / "keep", mask_rule=MaskRule.parse(keep="64:0:0"))
    assert _lesion(rows["liver/a"]).sum() == 16  # only the kept code
    assert rows["liver/a"].masks[0].parent == (tmp_path / "keep" / "masks" / "lesion").resolve()
    _array_mask(root / "masks" / "lesion" / "a.png", 255 - _box(255))  # white background, black lesion
    rows = _prepare(root, tmp_path / "white", mask_rule=MaskRule.parse(background="255"))
    assert _lesion(rows["liver/a"]).sum() == 16
    with pytest.raises(UsadError, match="bad mask code '1:2'"):
        MaskRule.parse(keep="1:2")


def test_jpeg_masks_ignore_compression_ringing(tmp_path: Path):
    path = tmp_path / "m.jpg"
    Image.fromarray(_box(255, box=(4, 4, 12, 12), size=(32, 32))).save(path, quality=75)
    assert np.asarray(Image.open(path)).astype(int)[np.asarray(_box(255, (4, 4, 12, 12), (32, 32))) == 0].max() > 0
    assert load_mask([path], (32, 32)).sum() == 64


# ----------------------------------------------------------------------------- 2. upper-case suffixes
def test_upper_case_suffixes_are_matched(tmp_path: Path):
    root = tmp_path / "scans"
    _image(root / "normal" / "n1.PNG")
    _image(root / "benign" / "b1.PNG", seed=1)
    _array_mask(root / "masks" / "benign" / "b1.PNG", _box(255))
    _image(root / "malignant" / "m1.JPG", seed=2)
    _array_mask(root / "malignant" / "m1_MASK.PNG", _box(255))
    rows = _prepare(root, tmp_path / "out")
    assert sorted(rows) == ["scans/b1", "scans/m1", "scans/n1"]
    assert _lesion(rows["scans/b1"]).sum() == 16 and _lesion(rows["scans/m1"]).sum() == 16


# ----------------------------------------------------------------------------- 3. image modes
def _modes(tmp_path: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """The same 8-bit picture saved in several modes, with the RGB each must decode to."""
    gray = np.random.default_rng(0).integers(0, 256, (16, 24), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    files = {}
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "16bit.png")  # full 16-bit range
    files["16bit"] = (tmp_path / "16bit.png", rgb)
    Image.fromarray((gray.astype(np.uint32) * 4095 // 255).astype(np.uint16)).save(tmp_path / "12bit.png")
    files["12bit-in-16"] = (tmp_path / "12bit.png", rgb)
    Image.fromarray(gray).convert("P").save(tmp_path / "palette.png")
    files["palette"] = (tmp_path / "palette.png", np.asarray(Image.fromarray(gray).convert("P").convert("RGB")))
    Image.fromarray(gray > 127).save(tmp_path / "1bit.png")
    files["1bit"] = (tmp_path / "1bit.png", np.repeat(((gray > 127) * 255).astype(np.uint8)[..., None], 3, axis=2))
    Image.fromarray(np.dstack([rgb, np.full_like(gray, 255)])).save(tmp_path / "rgba.png")
    files["rgba"] = (tmp_path / "rgba.png", rgb)
    Image.fromarray(gray).save(tmp_path / "8bit.png")
    files["8bit"] = (tmp_path / "8bit.png", rgb)
    return files


def test_every_image_mode_decodes_to_the_same_0_255_range(tmp_path: Path):
    for name, (path, expected) in _modes(tmp_path).items():
        decoded = np.asarray(load_rgb(path))
        assert decoded.dtype == np.uint8 and decoded.shape == (16, 24, 3), name
        assert np.abs(decoded.astype(int) - expected).max() <= 1, name  # 16-bit used to be all white
    transparent = np.zeros((4, 4, 4), dtype=np.uint8)
    transparent[..., :3] = 200  # colour under alpha 0 is not shown: composited over black
    Image.fromarray(transparent).save(tmp_path / "clear.png")
    assert np.asarray(load_rgb(tmp_path / "clear.png")).max() == 0


def test_model_inputs_of_16_bit_and_8_bit_images_agree(tmp_path: Path):
    files = _modes(tmp_path)
    pre = Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    row = lambda p: Sample("d/x", p, (), "normal", False, "g", "d", "d")  # noqa: E731
    eight, sixteen = pre.load(row(files["8bit"][0])), pre.load(row(files["16bit"][0]))
    assert torch.allclose(eight, sixteen) and sixteen.min() < 0  # not saturated (all white = 1.0 everywhere)


def test_16_bit_images_go_through_prepare(tmp_path: Path):
    root = tmp_path / "kidney"
    for i, cls in enumerate(("normal", "cyst")):
        (root / cls).mkdir(parents=True)
        Image.fromarray(np.full((16, 24), 1000 * (i + 1), dtype=np.uint16)).save(root / cls / f"{cls}1.png")
    rows = _prepare(root, tmp_path / "out")
    assert np.asarray(load_rgb(rows["kidney/cyst1"].image)).max() == round(2000 * 255 / 4095)


# ----------------------------------------------------------------------------- 4. checks
def test_folder_checks_warn_and_keep_going(tmp_path: Path, caplog):
    root = tmp_path / "ovary"
    _image(root / "normal" / "n1.png")
    _array_mask(root / "normal" / "n1_mask.png", _box(255))  # lesion on a normal image
    _image(root / "benign" / "b1.png", seed=1)
    _array_mask(root / "benign" / "b1_mask.png", _box(0))  # empty
    _image(root / "benign" / "b2.png", seed=2)
    _array_mask(root / "benign" / "b2_mask.png", _box(255))
    _image(root / "benign" / "b3.png", seed=3)  # no mask, while b2 has one
    _array_mask(root / "benign" / "gone_mask.png", _box(255))  # its image is missing
    _array_mask(root / "masks" / "benign" / "lost.png", _box(255))  # matches no image
    with caplog.at_level(logging.WARNING):
        rows = _prepare(root, tmp_path / "out")
    assert rows["ovary/n1"].masks == () and rows["ovary/b1"].masks == () and rows["ovary/b2"].has_mask
    assert "ovary/gone_mask" not in rows and "ovary/lost" not in rows  # never read as images
    assert "1 normal images with a lesion mask" in _warning(caplog, "normal images with a lesion mask")
    assert "(b1.png)" in _warning(caplog, "1 abnormal images whose mask is empty")
    assert "(b3.png)" in _warning(caplog, "1 abnormal images without a mask")  # b1 counted once, as empty
    assert "benign/gone_mask.png" in _warning(caplog, "1 mask files that match no image")
    assert "(lost.png)" in _warning(caplog, "1 mask files in the mask tree that match no image")


# ----------------------------------------------------------------------------- 5. normal folders
@pytest.mark.parametrize("name", ["normal", "regular", "Ovary_Normal", "healthy", "benign_normal", "No_Tumor"])
def test_common_spellings_of_normal(name: str):
    assert looks_normal(name)


@pytest.mark.parametrize("name", ["abnormal", "benign", "non_normal", "malignant", "tumor"])
def test_not_normal(name: str):
    assert not looks_normal(name)


def test_renamed_normal_folders_and_the_normal_option(tmp_path: Path, caplog):
    root = tmp_path / "ovary"
    _image(root / "Ovary_Normal" / "a.png")
    _image(root / "Ovary_Cyst" / "b.png", seed=1)
    with caplog.at_level(logging.WARNING):
        rows = _prepare(root, tmp_path / "out")
    assert (rows["ovary/a"].label, rows["ovary/a"].is_anomaly) == ("normal", False)
    assert "Ovary_Normal read as class normal" in caplog.text
    rows = _prepare(root, tmp_path / "out2", normal=("ovary_cyst",))  # the user decides, in any case
    assert rows["ovary/b"].label == "normal" and rows["ovary/a"].label == "ovary_normal"
    with pytest.raises(UsadError, match="--normal names fine, not a class folder"):
        _prepare(root, tmp_path / "out3", normal=("fine",))


def test_no_normal_class_is_a_warning(tmp_path: Path, caplog):
    _image(tmp_path / "d" / "cyst" / "a.png")
    _image(tmp_path / "d" / "mass" / "b.png", seed=1)
    with caplog.at_level(logging.WARNING):
        _prepare(tmp_path / "d", tmp_path / "out")
    assert "no normal class among the folders cyst, mass" in caplog.text


# ----------------------------------------------------------------------------- 6. patients and videos
@pytest.fixture
def frames(tmp_path: Path) -> Path:
    root = tmp_path / "lung"
    for cls, videos in (("normal", ("v1", "v2")), ("b_lines", ("v3", "v4"))):
        for v in videos:
            for f in range(3):
                _image(root / cls / f"{v}_frame_{f:03d}.png", seed=10 * int(v[1]) + f)  # all different
    return root


def test_frames_without_groups_are_a_warning(frames: Path, tmp_path: Path, caplog):
    assert sequence_base("v1_frame_003") == "v1" and sequence_base("benign (12)") == "benign"
    assert sequence_base("scan") is None
    with caplog.at_level(logging.WARNING):
        rows = _prepare(frames, tmp_path / "out")
    assert "12 images that look like frames of one video or patient" in caplog.text
    assert len({s.group for s in rows.values()}) == 12


def test_groups_csv_and_pattern(frames: Path, tmp_path: Path, caplog):
    lines = ["image,video"] + [f"{p.name},{p.name[:2]}" for p in sorted(frames.rglob("*.png")) if "v4" not in p.name]
    (frames / "groups.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        rows = _prepare(frames, tmp_path / "out")  # SRC/groups.csv is found by itself
    assert rows["lung/v1_frame_000"].group == rows["lung/v1_frame_002"].group == "lung:v1"
    assert "3 images not listed in groups.csv (each is its own group)" in caplog.text  # v4's frames
    rows = _prepare(frames, tmp_path / "out2", group_pattern=r"^(v\d+)_")
    assert len({s.group for s in rows.values()}) == 4 and rows["lung/v4_frame_001"].group == "lung:v4"
    with pytest.raises(UsadError, match="not a valid regular expression"):
        _prepare(frames, tmp_path / "out3", group_pattern="(")
    (frames / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UsadError, match="needs a header with an image column"):
        _prepare(frames, tmp_path / "out4", groups=frames / "bad.csv")


# ----------------------------------------------------------------------------- 7. stray mask files
def test_tumor_seg_and_other_files_are_never_images(tmp_path: Path, caplog):
    root = tmp_path / "breast"
    _image(root / "normal" / "n1.png")
    _image(root / "malignant" / "case1.png", seed=1)
    _array_mask(root / "malignant" / "case1_tumor.png", _box(255))
    _array_mask(root / "malignant" / "case1_other.png", _box(255, box=(10, 10, 12, 12)))
    _image(root / "malignant" / "case2.png", seed=2)
    _array_mask(root / "malignant" / "case2_seg.png", _box(255))
    with caplog.at_level(logging.WARNING):
        rows = _prepare(root, tmp_path / "out")
    assert sorted(rows) == ["breast/case1", "breast/case2", "breast/n1"]
    assert _lesion(rows["breast/case1"]).sum() == 16 and _lesion(rows["breast/case2"]).sum() == 16
    assert "(case1_other.png)" in _warning(caplog, "1 annotation files that are not lesion masks")
    rows = _prepare(root, tmp_path / "out2", mask_suffixes=("_tumor", "_other"))
    assert _lesion(rows["breast/case1"]).sum() == 20 and not rows["breast/case2"].has_mask


def test_predict_never_scores_a_mask_file(tmp_path: Path):
    for path in ("a.png", "a_mask.png", "b.png", "b_Tumor.PNG", "masks/c.png", "c.png", "sub/d.png", "sub/d_seg.png"):
        _image(tmp_path / "new" / path)
    _image(tmp_path / "new" / "lonely_mask.png")  # no image "lonely": not another image's mask
    ids = [s.id for s in _unlabelled_samples(tmp_path / "new")]
    assert ids == ["a.png", "b.png", "c.png", "lonely_mask.png", "sub/d.png"]
    assert masks_among([tmp_path / "x.png"], tmp_path) == []


# ----------------------------------------------------------------------------- 8. duplicates
def _copies(tmp_path: Path) -> tuple[Manifest, Manifest]:
    """Two manifests of the same 18 images under different names (and patients)."""
    samples, copies = [], []
    for i in range(18):
        cls = ("normal", "benign", "malignant")[i % 3]
        a = _image(tmp_path / "a" / f"{cls}{i}.png", seed=i)
        b = tmp_path / "b" / f"copy_{i}.png"
        b.parent.mkdir(exist_ok=True)
        b.write_bytes(a.read_bytes())
        samples.append(Sample(f"a/{cls}{i}", a, (), cls, cls != "normal", f"a:{i}", "a", "a"))
        copies.append(Sample(f"b/copy_{i}", b, (), cls, cls != "normal", f"b:{i}", "b", "b"))
    return Manifest(samples, tmp_path / "a.csv"), Manifest(copies, tmp_path / "b.csv")


def test_test_rows_are_excluded_by_image_content(tmp_path: Path):
    train, test = _copies(tmp_path)
    split = sample_support(train, shots=4, seed=0)
    assert len(split.support_sha256) == 12
    kept, counts = exclude_support(test, split, {})
    assert counts == {"excluded_support_rows": 12, "excluded_by_patient": 0, "excluded_by_content": 12}
    assert len(kept) == 6
    kept, counts = exclude_support(train, split, {})  # the training domain itself: the patient rule
    assert counts["excluded_by_patient"] == 12 and counts["excluded_by_content"] == 0


def test_old_split_without_digests_reads_the_train_manifest(tmp_path: Path):
    from usad_bench.data.manifest import write_manifest

    train, test = _copies(tmp_path)
    split = sample_support(train, shots=4, seed=0)
    split.support_sha256 = {}
    manifest = write_manifest(train.samples, tmp_path / "train.csv")
    _, counts = exclude_support(test, split, {"train_manifest": str(manifest)})
    assert counts["excluded_by_content"] == 12


def test_duplicates_within_one_folder_share_a_group(tmp_path: Path, caplog):
    root = tmp_path / "d"
    a = _image(root / "normal" / "a.png")
    _image(root / "benign" / "b.png", seed=1)
    (root / "normal" / "a_copy.png").write_bytes(a.read_bytes())
    with caplog.at_level(logging.WARNING):
        rows = _prepare(root, tmp_path / "out")
    assert rows["d/a_copy"].group == rows["d/a"].group
    assert "1 images identical to another image" in caplog.text


# ----------------------------------------------------------------------------- 9. notes
def _collected(n_normal: int, n_lesion: int, maps: bool = True, logits: bool = True, empty: int = 0) -> Collected:
    rng = np.random.default_rng(0)
    c = Collected(ids=[f"x{i}" for i in range(n_normal + n_lesion + empty)], predicts_maps=maps)
    c.labels = ["normal"] * n_normal + ["benign"] * (n_lesion + empty)
    c.is_anomaly = [False] * n_normal + [True] * (n_lesion + empty)
    c.scores = [rng.random(len(c.ids)).astype(np.float32)]
    if logits:
        c.logits = [rng.normal(size=(len(c.ids), 2)).astype(np.float32)]
    if maps:
        for i in range(n_normal + n_lesion):
            c.maps.append(rng.random((8, 8)).astype(np.float32))
            c.masks.append(np.zeros((8, 8), dtype=bool) if i < n_normal else _box(True, (2, 2, 5, 5), (8, 8), 0, bool))
        c.empty_lesion_masks = [f"e{i}" for i in range(empty)]
    return c


def _unexplained(out: dict) -> list[str]:
    """Null metrics that no note names, by key or by group ("image metrics undefined: ...")."""
    notes = " ".join(out["notes"])
    groups = {"image_": "image metrics", "cls_": "class metrics"}
    return [
        k
        for k, v in out.items()
        if (v is None or (isinstance(v, float) and np.isnan(v)))
        and k not in notes
        and not any(k.startswith(prefix) and group in notes for prefix, group in groups.items())
    ]


@pytest.mark.parametrize(
    ("collected", "threshold", "expected"),
    [
        (
            lambda: _collected(4, 0),
            0.5,
            "pixel_auroc, pixel_ap, pixel_f1_max, aupro, dice_at_0.5, iou_at_0.5 undefined",
        ),
        (lambda: _collected(4, 4), None, "dice absent: the support set has no lesion mask"),
        (lambda: _collected(4, 4, maps=False), None, "pixel metrics and dice absent: the method predicts no"),
        (lambda: _collected(4, 4, logits=False), 0.5, "class metrics absent: the method predicts no class logits"),
        (lambda: _collected(4, 4, empty=2), 0.5, "2 abnormal images have an empty mask"),
    ],
    ids=["no-lesion-masks", "no-support-masks", "no-maps", "no-logits", "empty-masks"],
)
def test_every_null_or_missing_metric_has_a_note(collected, threshold, expected):
    out = score_test(collected(), ["normal", "benign"], threshold)
    assert any(expected in note for note in out["notes"]), out["notes"]
    assert _unexplained(out) == []


# ----------------------------------------------------------------------------- 10. prompts
def test_generic_ultrasound_describes_any_class_and_breast_names_the_fix():
    generic = load_prompts("generic_ultrasound")
    assert generic.describe("simple_cyst", "thyroid") == [
        "This is an ultrasound image showing simple cyst.",
        "This is an abnormal ultrasound image with findings of simple cyst.",
    ]
    assert generic.missing_descriptions(["normal", "benign", "malignant", "b_lines"]) == []
    with pytest.raises(UsadError, match=r"--set prompts=generic_ultrasound .* --set prompts=PATH"):
        load_prompts("breast_ultrasound").describe("b_lines", "lung")


def test_prepare_prints_missing_prompt_classes(frames: Path, tmp_path: Path, capsys):
    assert main(["data", "prepare", "folder", str(frames), str(tmp_path / "out"), "--group-pattern", "^(v\\d)"]) == 0
    out = capsys.readouterr().out
    assert "prompts: breast_ultrasound has no description for class(es) b_lines (UltraAD needs one)" in out
    assert "--set prompts=generic_ultrasound" in out
    args = ["data", "prepare", "folder", str(frames), str(tmp_path / "o2"), "--prompts", "generic_ultrasound"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "prompts: generic_ultrasound has no class words for b_lines (classifiers use the label" in out
    assert "no description" not in out


# ----------------------------------------------------------------------------- 11. size mismatches
def test_all_size_mismatches_in_one_error(tmp_path: Path, capsys, caplog):
    root = tmp_path / "d"
    _image(root / "normal" / "n.png")
    for i in range(4):
        _image(root / "benign" / f"b{i}.png", seed=i)
        _array_mask(root / "benign" / f"b{i}_mask.png", _box(255, size=(30, 20)))
    args = ["data", "prepare", "folder", str(root), str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: d: 4 mask(s) differ in size from their images" in err[0]
    assert "b0_mask.png is 30x20 but its image b0.png is 24x16" in err[0] and ", ...)" in err[0]
    assert "resize each mask to its image (nearest neighbour)" in err[0]
    assert "mask is empty" not in caplog.text  # a mask of the wrong size is not also reported as empty


def test_cli_folder_options(tmp_path: Path, capsys):
    root = tmp_path / "d"
    _image(root / "Healthy" / "h.png")
    _image(root / "Lesion" / "l.png", seed=1)
    _array_mask(root / "Lesion" / "l_tumor.png", _box((0, 64, 0), channels=3))
    args = ["data", "prepare", "folder", str(root), str(tmp_path / "out"), "--normal", "healthy"]
    args += ["--mask-suffix", "_tumor", "--mask-keep", "0:64:0"]
    assert main(args) == 0
    rows = read_manifest(tmp_path / "out" / "manifest.csv").by_id()
    assert rows["d/h"].label == "normal" and _lesion(rows["d/l"]).sum() == 16
    assert main(["data", "prepare", "busi", str(root), str(tmp_path / "o"), "--normal", "x"]) == 2
    assert "apply to `folder` only" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end
def test_eval_and_predict_on_renamed_copies(tmp_path: Path, capsys):
    """Fit on a folder, evaluate on the same images renamed: every support image is excluded by content."""
    train, test = tmp_path / "train", tmp_path / "renamed"
    for i in range(12):
        cls = ("normal", "benign", "malignant")[i % 3]
        image = _image(train / cls / f"{cls}{i}.png", seed=i, size=(32, 32))
        _image(test / cls / f"copy{i}.png", seed=i, size=(32, 32))
        assert (test / cls / f"copy{i}.png").read_bytes() == image.read_bytes()
    for src in (train, test):
        assert main(["data", "prepare", "folder", str(src), str(tmp_path / "data" / src.name)]) == 0
    run, cache = tmp_path / "run", str(tmp_path / "cache")
    tiny = ["--backbone", "usad-tiny", "--pretrained", "none", "--cache-dir", cache]
    fit = ["fit", "--method", "tip_adapter", "--train", str(tmp_path / "data/train/manifest.csv"), "--shots", "2"]
    assert main([*fit, "--out", str(run), *tiny]) == 0
    manifest = str(tmp_path / "data/renamed/manifest.csv")
    assert main(["eval", "--run", str(run), "--test", f"renamed={manifest}", "--cache-dir", cache]) == 0
    metrics = json.loads((run / "metrics.json").read_text())["tests"]["renamed"]
    assert (metrics["excluded_by_patient"], metrics["excluded_by_content"], metrics["n_images"]) == (0, 6, 6)
    assert "pixel metrics and dice absent: the method predicts no anomaly maps" in metrics["notes"]
    _array_mask(test / "benign" / "copy1_mask.png", _box(255, size=(32, 32)))
    pred = ["predict", "--run", str(run), "--images", str(test / "benign"), "--out", str(tmp_path / "p")]
    assert main([*pred, "--no-overlays", "--cache-dir", cache]) == 0
    scored = (tmp_path / "p" / "scores.csv").read_text()
    assert "copy1.png" in scored and "copy1_mask.png" not in scored
