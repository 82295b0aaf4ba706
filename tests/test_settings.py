import pytest

from runtime.errors import UsageError
from runtime.launch.settings import Settings, parse_bool, resolve


def test_precedence_defaults_manifest_environment_flags():
    s = resolve({"temp": 0.3, "top_k": 7, "ctx": 1024}, {"ctx": 512, "top_p": None},
                environ={"BUNDLE_TOP_K": "9", "BUNDLE_CTX": "2048"})
    assert (s.temp, s.top_k, s.ctx, s.top_p) == (0.3, 9, 512, Settings.top_p)


def test_environment_is_read_when_called(monkeypatch):
    monkeypatch.setenv("BUNDLE_SEED", "5")
    assert resolve({}, {}).seed == 5
    monkeypatch.setenv("BUNDLE_SEED", "6")
    assert resolve({}, {}).seed == 6


@pytest.mark.parametrize("values, needle", [
    ({"temp": -1}, "temp=-1"), ({"top_p": 0}, "top_p=0"), ({"ctx": 4}, "ctx=4"),
    ({"max_tokens": 0}, "max_tokens=0"), ({"threads": -2}, "threads=-2"), ({"top_k": "x"}, "not a number"),
])
def test_bad_values_are_named(values, needle):
    with pytest.raises(UsageError, match=needle):
        Settings().merged(values, "command line")


def test_parse_bool():
    assert parse_bool("Yes") and parse_bool("1") and not parse_bool("off") and not parse_bool("")
    with pytest.raises(UsageError):
        parse_bool("maybe", "BUNDLE_X")
