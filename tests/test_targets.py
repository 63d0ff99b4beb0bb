"""Target patch masks for SynthVQA: checked against rasterisations written here (integer box
arithmetic for squares, an analytic disk for circles, supersampling for fractional grids), the
scene's own pixels, and every question target of freshly built benchmarks."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from recomp_eval.synth import builders, scenes, targets
from recomp_eval.synth.scenes import COLOURS, IMAGE_SIZE, SHAPES, make_scene
from recomp_eval.synth.schemas import BENCHMARKS
from recomp_eval.synth.targets import (
    decode_mask,
    encode_mask,
    masks_for,
    parse_scene_id,
    scene_objects,
    target_coverage,
    target_mask,
    target_object,
)
from recomp_eval.synth.writers import _write_tags, read_tags, scenes_for

S = IMAGE_SIZE
SEED = 11
SCENES = [f"s{SEED}-{i:06d}" for i in range(30)]
GRIDS = (24, 16, 7, 4)
# PIL's ellipse is not the ideal disk at its rim (it misses up to ~28 of a disk's edge pixels in
# these scenes, measured with Pillow 13). A patch's in/out verdict may therefore differ from the
# analytic one only where the analytic disk covers at most this many pixels of the patch.
DISK_EDGE_PX = 2.0


def _objects():
    return [(sid, o) for sid in SCENES for o in scene_objects(sid)]


def _pixels(sid, obj) -> np.ndarray:
    """[S,S] bool drawn pixels, via 1 px patches (grid = S): coverage is then 0 or 1."""
    cov = target_coverage(sid, obj.describe(), (S, S))
    assert set(np.unique(cov)) <= {0.0, 1.0}
    return cov.reshape(S, S) > 0


def _supersampled(pixels: np.ndarray, h: int, w: int) -> np.ndarray:
    """[H*W] covered area (px) per patch, integrating a pixel mask by repetition: after repeating
    each pixel h times down and w times across, every patch is exactly S x S sub-pixels."""
    fine = np.repeat(np.repeat(pixels, h, axis=0), w, axis=1)  # [S*h, S*w]
    return fine.reshape(h, S, w, S).sum((1, 3)).reshape(-1) / (h * w)


def _box_coverage(box, n: int) -> list[Fraction]:
    """Exact coverage of a pixel box on an n x n grid, in rationals (raster order)."""
    x0, y0, x1, y1 = box
    edges = [Fraction(S * k, n) for k in range(n + 1)]

    def overlap(a, b, k):
        return max(Fraction(0), min(Fraction(b), edges[k + 1]) - max(Fraction(a), edges[k]))

    area = Fraction(S, n) ** 2
    return [overlap(y0, y1, r) * overlap(x0, x1, c) / area for r in range(n) for c in range(n)]


# --- geometry -----------------------------------------------------------------------------------


def test_squares_match_integer_box_arithmetic() -> None:
    squares = [(sid, o) for sid, o in _objects() if o.shape == "square"]
    assert len(squares) >= 20
    for sid, obj in squares:
        mask24 = target_mask(sid, obj.describe(), (24, 24))
        expected = np.zeros(24 * 24, bool)
        expected[obj.patches()] = True
        assert np.array_equal(mask24, expected), (sid, obj)
        for n in GRIDS:
            cov = target_coverage(sid, obj.describe(), (n, n))
            exact = np.array([float(f) for f in _box_coverage(obj.box, n)])
            np.testing.assert_allclose(cov, exact, rtol=0, atol=1e-12, err_msg=f"{sid} {n}")


def test_circles_match_analytic_disk() -> None:
    circles = [(sid, o) for sid, o in _objects() if o.shape == "circle"]
    assert len(circles) >= 20
    centres = np.arange(S) + 0.5
    for sid, obj in circles:
        x0, y0, x1, y1 = obj.box
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        disk = (centres[None, :] - cx) ** 2 + (centres[:, None] - cy) ** 2 <= r * r  # [S,S]
        for n in (24, 16, 7):
            analytic = _supersampled(disk, n, n)  # px per patch
            got = target_mask(sid, obj.describe(), (n, n))
            differ = got != (analytic > 0)
            assert np.all(analytic[differ] <= DISK_EDGE_PX), (sid, obj, n, analytic[differ])
        drawn = _pixels(sid, obj).sum()
        assert abs(drawn - disk.sum()) <= 0.05 * disk.sum(), (sid, obj)


def test_mask_is_the_drawn_shape_in_the_scene_image() -> None:
    """Inside its box, an object without a character has its fill colour exactly where the mask
    is set; every mask stays inside its box; a character adds to the shape, never erases it."""
    n_char = 0
    for sid, obj in _objects():
        pixels = _pixels(sid, obj)
        x0, y0, x1, y1 = obj.box
        inside = np.zeros((S, S), bool)
        inside[y0:y1, x0:x1] = True
        assert not (pixels & ~inside).any(), (sid, obj)
        image = np.asarray(make_scene(*parse_scene_id(sid)).image)  # [S,S,3]
        fill = (image == np.array(COLOURS[obj.colour])).all(-1)
        if obj.char is None:
            assert np.array_equal(pixels[inside], fill[inside]), (sid, obj)
        else:
            n_char += 1
            assert (pixels | ~fill)[inside].all(), (sid, obj)  # fill pixels all in the mask
    assert n_char >= 5


# s0-000181's large yellow cross carries an "M" whose anti-aliased rim leaves the cross's arm by
# a pixel: the glyph must count even where it is outside the shape.
CHAR_SPILL = "s0-000181"


def test_character_pixels_are_part_of_the_object(monkeypatch) -> None:
    """The glyph, found as the pixels that change when the scene is drawn without characters
    (``_draw_char`` uses no randomness, so the rest of the scene is identical), lies in the
    mask of its object, including where it spills past the shape."""
    sids = [*SCENES, CHAR_SPILL]
    with_char = {sid: np.asarray(make_scene(*parse_scene_id(sid)).image) for sid in sids}
    monkeypatch.setattr(scenes, "_draw_char", lambda draw, obj: None)
    without = {sid: np.asarray(make_scene(*parse_scene_id(sid)).image) for sid in sids}
    monkeypatch.undo()
    spilled = 0
    for sid in sids:
        changed = (with_char[sid] != without[sid]).any(-1)  # [S,S]
        lettered = [o for o in scene_objects(sid) if o.char is not None]
        assert changed.any() == bool(lettered)
        for obj in lettered:
            x0, y0, x1, y1 = obj.box
            glyph = np.zeros((S, S), bool)
            glyph[y0:y1, x0:x1] = changed[y0:y1, x0:x1]
            assert glyph.sum() >= 20, (sid, obj)
            pixels = _pixels(sid, obj)
            assert not (glyph & ~pixels).any(), (sid, obj)
            fill = (without[sid] == np.array(COLOURS[obj.colour])).all(-1)
            spilled += int((glyph & ~fill).sum())
    assert spilled >= 1  # the spill case is really exercised


@pytest.mark.parametrize("n", [*GRIDS, 32])
def test_coverage_integrates_to_drawn_pixels(n) -> None:
    area = (S / n) ** 2
    for sid, obj in _objects():
        pixels = _pixels(sid, obj)
        cov = target_coverage(sid, obj.describe(), (n, n))
        assert cov.shape == (n * n,) and cov.min() >= 0 and cov.max() <= 1 + 1e-12
        assert cov.sum() * area == pytest.approx(pixels.sum(), rel=0, abs=1e-8), (sid, obj)
        if n == 7:  # fractional patches: equal to the supersampled integral patch by patch
            np.testing.assert_allclose(cov * area, _supersampled(pixels, n, n), atol=1e-9)


def test_rectangular_grid_and_threshold() -> None:
    sid, obj = next((s, o) for s, o in _objects() if o.shape == "square")
    cov = target_coverage(sid, obj.describe(), (4, 7))
    assert cov.shape == (28,)
    x0, y0, x1, y1 = obj.box
    rows = [max(0.0, min(y1, (r + 1) * S / 4) - max(y0, r * S / 4)) for r in range(4)]
    cols = [max(0.0, min(x1, (c + 1) * S / 7) - max(x0, c * S / 7)) for c in range(7)]
    expected = np.outer(rows, cols).reshape(-1) / ((S / 4) * (S / 7))
    np.testing.assert_allclose(cov, expected, atol=1e-12)
    half = target_mask(sid, obj.describe(), (4, 7), threshold=0.5)
    assert np.array_equal(half, expected > 0.5)
    assert np.array_equal(
        target_mask(sid, obj.describe(), 7), target_mask(sid, obj.describe(), (7, 7))
    )


# --- question targets ---------------------------------------------------------------------------


def _tags(name: str, n_images: int = 6) -> list[dict]:
    items = list(scenes_for(name, SEED, n_images, builders.ACCEPT.get(name)))
    _rows, tags, _images = builders.BUILDERS[name](
        items, lambda image: {"bytes": b"", "path": None}
    )
    return tags


def test_every_question_target_resolves_to_one_object(tmp_path) -> None:
    n_targets = 0
    for name in BENCHMARKS:
        tags = _tags(name)
        assert tags
        for row in tags:
            obj = target_object(row["scene_id"], row["target"])
            if row["target"] is None:
                assert obj is None and row["size"] == "none"
                continue
            n_targets += 1
            assert obj.size == row["size"], row
            words = set(f"{row['question']} {row['answer']}".lower().rstrip("?").split())
            assert words & {obj.colour, obj.shape, (obj.char or "-").lower()}, row
            assert target_mask(row["scene_id"], row["target"], 24).any()
    assert n_targets >= 40
    # The same through the tags side table the writer ships.
    _write_tags(_tags("pope"), tmp_path / "tags.parquet")
    table = read_tags(tmp_path)
    masks = masks_for(table, None, (24, 24))
    assert set(masks) == {k for k, v in table.items() if v["target"]}
    some = sorted(masks)[:3]
    assert set(masks_for(table, some, 24)) == set(some)
    assert all(m.dtype == bool and m.shape == (576,) for m in masks.values())


# --- errors and encoding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["", "s1", "x1-000001", "s1-1", "s01-000001", "s1-000001 ", "s-1-000001", None]
)
def test_malformed_scene_ids(bad) -> None:
    with pytest.raises(ValueError, match="malformed SynthVQA scene id") as err:
        parse_scene_id(bad)
    assert "\n" not in str(err.value)


def test_parse_round_trips() -> None:
    assert parse_scene_id("s1000003-000042") == (1_000_003, 42)
    assert parse_scene_id("s0-1234567") == (0, 1_234_567)
    assert scene_objects(SCENES[0]) == tuple(make_scene(SEED, 0).objects)


def test_missing_ambiguous_and_none_targets(monkeypatch) -> None:
    sid = SCENES[0]
    assert target_object(sid, None) is None and target_object(sid, "") is None
    assert target_coverage(sid, None, 24) is None and target_mask(sid, "", 24) is None
    present = {o.describe() for o in scene_objects(sid)}
    every = [f"{s} {c} {h}" for s in ("small", "large") for c in COLOURS for h in SHAPES]
    absent = next(d for d in every if d not in present)
    with pytest.raises(ValueError, match=f"scene {sid} has no object described") as err:
        target_mask(sid, absent, 24)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="image"):
        target_coverage(sid, sorted(present)[0], 24, image_size=336)
    with pytest.raises(ValueError, match="threshold"):
        target_mask(sid, sorted(present)[0], 24, threshold=1.0)
    with pytest.raises(KeyError, match="not in the tags table"):
        masks_for({}, ["x"], 24)
    obj = scene_objects(sid)[0]
    monkeypatch.setattr(targets, "scene_objects", lambda _sid: (obj, obj))
    with pytest.raises(ValueError, match="has 2 objects described") as err:
        target_object(sid, obj.describe())
    assert "\n" not in str(err.value)


def test_encode_decode_round_trip() -> None:
    rng = np.random.default_rng(0)
    for n in (0, 1, 16, 576):
        mask = rng.random(n) < 0.3
        text = encode_mask(mask)
        assert len(text) == n and set(text) <= {"0", "1"}
        assert np.array_equal(decode_mask(text), mask) and decode_mask(text).dtype == bool
    sid, obj = _objects()[0]
    mask = target_mask(sid, obj.describe(), 24)
    assert np.array_equal(decode_mask(encode_mask(mask)), mask)
    with pytest.raises(ValueError, match="only '0' and '1'"):
        decode_mask("0120")
    with pytest.raises(ValueError, match="only '0' and '1'"):
        decode_mask("01 ")
    with pytest.raises(ValueError, match="1-D"):
        encode_mask(np.zeros((2, 2), bool))
