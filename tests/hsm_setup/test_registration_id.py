import pytest

from device_sim.common.errors import UserError
from device_sim.common.registration_id import (normalize_registration_id, registration_id_problem,
                                       validate_registration_id)


@pytest.mark.parametrize("value", ["a", "Device-01", "dev.1_2:3", "x-", "A" * 64, "9", "._:a"])
def test_valid(value):
    assert validate_registration_id(value) == value


@pytest.mark.parametrize("value, word", [
    ("", "empty"),
    ("a" * 65, "limit is 64"),
    ("dev 1", "' '"),
    ("dev/1", "'/'"),
    ("dév", "'é'"),
    ("dev.", "must end"),
    ("dev_", "must end"),
    ("dev:", "must end"),
])
def test_invalid(value, word):
    with pytest.raises(UserError, match=word):
        validate_registration_id(value)


def test_non_cn_limit_is_128():
    assert registration_id_problem("a" * 128, max_length=128) is None
    assert registration_id_problem("a" * 129, max_length=128)


def test_comparison_key_is_case_insensitive():
    assert normalize_registration_id("Dev-A") == normalize_registration_id("dev-a")
