"""The removal unit type: parsing, the normal form and the hash identity (pruning.units)."""

import pytest

from pruning.units import Unit, UnitError, all_units, check_config, identity, label, normalize, parse_units


def test_parse_and_label_round_trip():
    config = normalize(parse_units("b20, a4,m13"))
    assert config == (Unit(4, "a"), Unit(13, "m"), Unit(20, "b"))
    assert label(config) == "a4,m13,b20"
    assert normalize(parse_units(label(config))) == config


def test_bare_indices_and_ranges_are_blocks():
    assert parse_units("3,5-6") == (Unit(3), Unit(5), Unit(6))
    assert parse_units("a0-2") == (Unit(0, "a"), Unit(1, "a"), Unit(2, "a"))
    assert parse_units("") == ()


@pytest.mark.parametrize("text", ["x4", "a", "b-1", "a5-3", "4.0", "m4m"])
def test_bad_unit_names_fail_with_one_line(text):
    with pytest.raises(UnitError, match="cannot parse") as err:
        parse_units(text)
    assert "\n" not in str(err.value)


def test_both_sublayers_are_the_block():
    assert normalize(["a4", "m4"]) == (Unit(4),)
    assert normalize(["b4", "a4"]) == (Unit(4),)
    assert identity(["a4", "m4"]) == identity([4]) == [4]


def test_identity_of_whole_blocks_is_todays_list_of_indices():
    assert identity([Unit(7), Unit(2)]) == [2, 7]
    assert identity([]) == []
    assert identity(["a3", "b7"]) == ["a3", "b7"]


def test_check_config_range_and_whole_model():
    assert check_config(["a1"], 4) == (Unit(1, "a"),)
    with pytest.raises(UnitError, match="out of range; allowed blocks 0..3"):
        check_config(["m4"], 4)
    with pytest.raises(UnitError, match="cannot remove every block"):
        check_config(parse_units("a0-3") + parse_units("m0-3"), 4)


def test_all_units():
    assert [str(u) for u in all_units(2, "sublayer")] == ["a0", "m0", "a1", "m1"]
    assert len(all_units(3, "both")) == 9
    with pytest.raises(UnitError, match="allowed: block, sublayer, both"):
        all_units(3, "head")
