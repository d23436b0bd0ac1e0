"""The unit id is built and parsed in one module (workers/unit_id.py)."""

from salmap.workers.unit_id import UnitId, data_prefix, format_unit_id, parse_unit_id, unit_parts


def test_round_trip_and_data_prefix():
    uid = format_unit_id("resnet18", "gradcam_pp")
    assert uid == "resnet18__gradcam_pp"
    assert parse_unit_id(uid) == UnitId("resnet18", "gradcam_pp")
    assert str(UnitId.parse(uid)) == uid
    model, method = UnitId.parse(uid)
    assert (model, method) == ("resnet18", "gradcam_pp")
    assert data_prefix(uid) == "data/resnet18/gradcam_pp"


def test_method_names_may_hold_the_separator_model_names_do_not():
    # the id splits at its first separator: everything after it is the method
    assert UnitId.parse("m__a__b") == UnitId("m", "a__b")
    assert unit_parts("m__a__b") == ["m", "a__b"]
    assert UnitId.parse("lonely") == UnitId("lonely", "")
    assert unit_parts("lonely") == ["lonely"]
