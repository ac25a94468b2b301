"""The domain-shift check: graded verdicts with reasons, from the card's training fingerprint."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from model_fixtures import tiny_card

from deepseg_core import domain_shift, phantoms
from deepseg_core.demo import DEFAULT_MODEL
from deepseg_core.inference import Segmenter
from deepseg_core.io import Volume
from deepseg_core.model_card import ModelCard


@pytest.fixture(scope="module")
def bundled_card() -> ModelCard:
    return ModelCard.read(DEFAULT_MODEL / "model.json")


def case(profile="ct-A", spacing=(1.5, 1.5, 2.5), seed=1200, shape=(24, 64, 64), **kw):
    return phantoms.generate_phantom(seed=seed, profile=profile, shape_zyx=shape, spacing_xyz_mm=spacing, **kw)


def test_training_profile_is_ok(bundled_card):
    report = domain_shift.check_input(bundled_card, [case().image])
    assert report.verdict == "ok", report.summary()
    assert report.intensity_distance < domain_shift.INTENSITY_CAUTION
    assert report.reasons == []


def test_verdict_rises_with_intensity_shift(bundled_card):
    a, c = phantoms.PROFILES["ct-A"], phantoms.PROFILES["ct-C"]
    distances, verdicts = [], []
    for t in (0.0, 0.5, 1.0):
        report = domain_shift.check_input(bundled_card, [case(profile=phantoms.interpolate_profiles(a, c, t)).image])
        distances.append(report.intensity_distance)
        verdicts.append(domain_shift.VERDICTS.index(report.verdict))
    assert distances == sorted(distances) and distances[-1] > domain_shift.INTENSITY_OOD
    assert verdicts == sorted(verdicts) and verdicts[-1] == 2
    report = domain_shift.check_input(bundled_card, [case(profile="ct-C").image])
    assert any("intensities differ from the training data" in r for r in report.reasons)


def test_spacing_far_outside_the_trained_range(bundled_card):
    coarse = domain_shift.check_input(bundled_card, [case(spacing=(1.5, 1.5, 10.0), shape=(8, 64, 64)).image])
    assert coarse.verdict == "out_of_distribution"
    assert any("coarser along z" in r for r in coarse.reasons)
    mild = domain_shift.check_input(bundled_card, [case(spacing=(1.5, 1.5, 5.0), shape=(12, 64, 64)).image])
    assert mild.verdict == "caution" and any("2.0x coarser along z" in r for r in mild.reasons)


def test_wrong_modality_and_missing_channel_are_out_of_distribution(bundled_card):
    mr = domain_shift.check_input(bundled_card, [case(profile="mr-A").image])
    assert mr.verdict == "out_of_distribution"
    assert any("does not look like a CT" in r for r in mr.reasons)
    none = domain_shift.check_input(bundled_card, [])
    assert none.verdict == "out_of_distribution" and "needs 1 image(s) (CT); 0 given" in none.reasons[0]


def test_other_acquisition_plane_is_a_caution(bundled_card):
    image = case().image
    sagittal = dataclasses.replace(image, direction_lps=np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    report = domain_shift.check_input(bundled_card, [sagittal])
    assert report.verdict in ("caution", "out_of_distribution")
    assert any("different acquisition plane" in r for r in report.reasons)
    flipped = dataclasses.replace(image, direction_lps=np.diag([-1.0, -1.0, 1.0]))
    assert not any(
        f.check == "orientation" and f.level != "ok" for f in domain_shift.check_input(bundled_card, [flipped]).findings
    )


def test_a_card_without_fingerprint_gets_a_caution_not_a_block():
    card, _ = tiny_card()
    report = domain_shift.check_input(card, [case().image])
    assert report.verdict == "caution" and "no training-data fingerprint" in report.reasons[0]


def test_fine_tuned_fingerprint_keeps_the_original_domain(bundled_card):
    site_b = [case(profile="ct-B", seed=s) for s in (600, 601)]
    own = domain_shift.training_fingerprint(
        [[c.image] for c in site_b],
        [c.labels.array_zyx for c in site_b],
        "CT",
        ("CT",),
        bundled_card.preprocessing.normalization,
        profiles=["ct-B"],
    )
    before = domain_shift.check_input(bundled_card, [case(profile="ct-B").image])
    assert before.verdict == "out_of_distribution"
    merged = domain_shift.merge_with_parent(own, bundled_card.fingerprint)
    tuned = dataclasses.replace(bundled_card, fingerprint=merged)
    assert domain_shift.check_input(tuned, [case(profile="ct-B").image]).verdict == "ok"
    assert domain_shift.check_input(tuned, [case(profile="ct-A").image]).verdict == "ok"
    assert merged["previous_domains"][0]["profiles"] == ["ct-A"]


def test_report_json_and_segmenter_entry_point(bundled_card):
    segmenter = Segmenter.load(DEFAULT_MODEL, device="cpu")
    report = segmenter.check_inputs([case(profile="ct-C").image])
    data = report.to_json()
    assert data["verdict"] == "out_of_distribution" and data["reasons"] and data["findings"][0]["check"] == "modality"
    assert "OUT OF DISTRIBUTION" in report.summary()
    assert domain_shift.axis_codes(np.eye(3)) == "LPS" and domain_shift.axis_codes(np.diag([-1.0, -1.0, 1.0])) == "RAS"


OOD = "out_of_distribution"


@pytest.mark.parametrize("size, level", [(16, "ok"), (15, "caution"), (8, "caution"), (7, OOD), (1, OOD)])
def test_field_of_view_levels_are_the_images_share_of_a_tile(size, level):
    findings = domain_shift.check_field_of_view((size, 64, 64), (2.5, 1.5, 1.5), (32, 64, 64))
    assert [(f.check, f.level) for f in findings] == [("field_of_view", level)]
    if level != "ok":
        assert findings[0].value == size / 32
        assert f"Along z the image spans {2.5 * size:.1f} mm, {size} of the 32 voxels" in findings[0].message
        assert "at least 40 mm along z" in findings[0].message  # what would make it ok


def test_a_few_slices_cut_from_a_volume_are_flagged_on_the_model_grid():
    segmenter = Segmenter.load(DEFAULT_MODEL, device="cpu")  # tile 32 x 64 x 64 at 2.5 x 1.5 x 1.5 mm
    whole = case(shape=(40, 64, 64)).image
    assert segmenter.check_inputs([whole]).verdict == "ok"

    def field_of_view(volume):
        report = segmenter.check_inputs([volume])
        findings = [f for f in report.findings if f.check == "field_of_view"]
        return report.verdict, [(f.level, f.message.split(",")[0]) for f in findings]

    def cut(*box):
        return Volume(whole.array_zyx[box].copy(), whole.spacing_xyz_mm, whole.origin_lps, whole.direction_lps)

    four = cut(slice(18, 22))
    assert field_of_view(four) == ("out_of_distribution", [("out_of_distribution", "Along z the image spans 10.0 mm")])
    twelve = cut(slice(14, 26))
    assert field_of_view(twelve) == ("caution", [("caution", "Along z the image spans 30.0 mm")])
    # counted on the model's grid, not in input voxels: 24 slices of 1.25 mm are 12 of 2.5 mm
    fine = phantoms.generate_phantom(seed=1200, profile="ct-A", shape_zyx=(24, 64, 64), spacing_xyz_mm=(1.5, 1.5, 1.25)).image
    assert field_of_view(fine)[1] == [("caution", "Along z the image spans 30.0 mm")]
    # a small box around a lesion: short in-plane too
    box = cut(slice(None), slice(20, 35), slice(24, 54))  # 15 and 30 of 64
    assert [level for level, _ in field_of_view(box)[1]] == ["out_of_distribution", "caution"]


def test_a_25d_model_given_fewer_slices_than_it_stacks_is_flagged(tmp_path):
    from model_fixtures import tiny_model_folder

    # 3 slices stacked as channels: of one slice the network sees only copies (a third of what it reads)
    segmenter = Segmenter.load(tiny_model_folder(tmp_path / "m", arch="2.5d"), device="cpu")
    whole = case(shape=(12, 48, 48)).image

    def field_of_view(slices):
        volume = Volume(whole.array_zyx[:slices].copy(), whole.spacing_xyz_mm, whole.origin_lps, whole.direction_lps)
        return [(f.level, f.value) for f in segmenter.check_inputs([volume]).findings if f.check == "field_of_view"]

    assert field_of_view(1) == [("caution", 1 / 3)]
    assert field_of_view(2) == [("ok", None)]
    assert field_of_view(12) == [("ok", None)]


def test_field_of_view_names_the_images_axis_where_the_network_transposes_it():
    # an nnU-Net plan may put the image's x axis first; the user crops the image, so its axis is named
    findings = domain_shift.check_field_of_view((6, 64, 64), (3.0, 1.5, 1.5), (32, 64, 64), axis_names=("x", "z", "y"))
    assert [f.message.split(",")[0] for f in findings] == ["Along x the image spans 18.0 mm"]
