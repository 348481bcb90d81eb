"""Label schemes and their conversion (DESIGN.md "Label schemes")."""
from __future__ import annotations

import numpy as np
import pytest

from tumorseg.errors import ConfigError, InputError
from tumorseg.labels import SCHEMES, convert, conversion_table, get_scheme

# Transcribed from DESIGN.md "Label schemes".
DESIGN = {
    "msd": ({1: "edema", 2: "non_enhancing", 3: "enhancing"},
            {"WT": {1, 2, 3}, "TC": {2, 3}, "ET": {3}}),
    "brats2021": ({1: "core", 2: "edema", 4: "enhancing"},
                  {"WT": {1, 2, 4}, "TC": {1, 4}, "ET": {4}}),
    "brats2023": ({1: "core", 2: "edema", 3: "enhancing"},
                  {"WT": {1, 2, 3}, "TC": {1, 3}, "ET": {3}}),
    "brats2015": ({1: "necrosis", 2: "edema", 3: "non_enhancing", 4: "enhancing"},
                  {"WT": {1, 2, 3, 4}, "TC": {1, 3, 4}, "ET": {4}}),
}


def test_all_four_schemes_exist():
    assert set(SCHEMES) == set(DESIGN)


@pytest.mark.parametrize("name", sorted(DESIGN))
def test_regions_match_design(name):
    scheme = get_scheme(name)
    labels, regions = DESIGN[name]
    assert {l.value for l in scheme.labels} == set(labels)
    assert {k: set(v) for k, v in scheme.regions.items()} == regions
    assert scheme.max_label == max(labels)


@pytest.mark.parametrize("name", sorted(DESIGN))
def test_label_names_fit_design(name):
    scheme = get_scheme(name)
    for value, word in DESIGN[name][0].items():
        label_name = scheme.label(value).name
        if word == "core":
            assert "core" in label_name or "necro" in label_name
        elif word == "necrosis":
            assert label_name == "necrosis"
        elif word == "non_enhancing":
            assert label_name.startswith("non_enhancing")
        else:
            assert label_name.startswith(word)
        assert scheme.label(label_name).value == value


def test_region_mask():
    scheme = get_scheme("brats2021")
    labels = np.array([0, 1, 2, 4])
    assert scheme.region_mask(labels, "TC").tolist() == [False, True, False, True]
    assert scheme.region_mask(labels, "ET").tolist() == [False, False, False, True]
    assert scheme.region_mask(labels, "WT").tolist() == [False, True, True, True]


def test_unknown_label_lookup():
    with pytest.raises(ConfigError, match="brats2023"):
        get_scheme("brats2023").label("necrosis")
    with pytest.raises(ConfigError, match="known schemes"):
        get_scheme("brats2099")


def _convert(values, source, target):
    return convert(np.array(values, dtype=np.uint8), get_scheme(source), get_scheme(target)).tolist()


def test_msd_to_brats2023_and_back():
    msd = [0, 1, 2, 3]
    brats = _convert(msd, "msd", "brats2023")
    assert brats == [0, 2, 1, 3]  # edema 1->2, core 2->1, enhancing 3->3
    assert _convert(brats, "brats2023", "msd") == msd


def test_brats2023_to_brats2021():
    assert _convert([0, 1, 2, 3], "brats2023", "brats2021") == [0, 1, 2, 4]
    assert _convert([0, 1, 2, 4], "brats2021", "brats2023") == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "target, expected",
    [
        # 2015: 1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing
        ("brats2021", [0, 1, 2, 1, 4]),
        ("brats2023", [0, 1, 2, 1, 3]),
        ("msd", [0, 2, 1, 2, 3]),
    ],
)
def test_brats2015_to_newer(target, expected):
    assert _convert([0, 1, 2, 3, 4], "brats2015", target) == expected


@pytest.mark.parametrize("source", ["brats2021", "brats2023", "msd"])
def test_combined_core_to_brats2015_is_refused(source):
    with pytest.raises(ConfigError) as info:
        conversion_table(get_scheme(source), get_scheme("brats2015"))
    assert "brats2015" in str(info.value)
    with pytest.raises(ConfigError):
        _convert([0, 2], source, "brats2015")


def test_regions_survive_conversion():
    rng = np.random.default_rng(0)
    msd = get_scheme("msd")
    labels = rng.choice([0, 1, 2, 3], size=(6, 7, 8)).astype(np.uint8)
    for target_name in ("brats2021", "brats2023"):
        target = get_scheme(target_name)
        converted = convert(labels, msd, target)
        for region in ("WT", "TC", "ET"):
            np.testing.assert_array_equal(
                msd.region_mask(labels, region), target.region_mask(converted, region)
            )


@pytest.mark.parametrize("values", [[0, 1, 5], [0, 4], [0, 255]])
def test_unknown_label_values_refused(values):
    with pytest.raises(InputError, match="another scheme") as info:
        _convert(values, "msd", "brats2023")
    bad = [v for v in values if v not in (0, 1, 2, 3)]
    assert str(bad) in str(info.value)


def test_convert_refuses_values_of_other_scheme():
    # 4 is enhancing in BraTS 2021 but undefined in BraTS 2023.
    with pytest.raises(InputError):
        _convert([0, 4], "brats2023", "brats2021")


def test_convert_does_not_mutate_and_returns_new_array():
    labels = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    before = labels.copy()
    out = convert(labels, get_scheme("msd"), get_scheme("brats2023"))
    np.testing.assert_array_equal(labels, before)
    assert out is not labels
    assert not np.shares_memory(out, labels)
    assert out.shape == labels.shape
    out[...] = 9
    np.testing.assert_array_equal(labels, before)
