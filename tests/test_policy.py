from pathlib import Path

import pytest

from erasekit import Policy, PolicyError
from erasekit.guardrails.policy import PolicyEntry, parse_toggles


@pytest.fixture
def policy() -> Policy:
    return Policy({"nudity": {"mandatory": True}, "van_gogh": {}, "harry_potter": {}}, max_requested=2)


def test_mandatory_always_active(policy: Policy) -> None:
    assert policy.resolve(None) == {"nudity"}
    assert policy.resolve([]) == {"nudity"}
    assert policy.resolve(["van_gogh"]) == {"nudity", "van_gogh"}


@pytest.mark.parametrize("request_value", [
    ["van_gogh", "harry_potter"], "van_gogh,harry_potter", '["van_gogh", "harry_potter"]',
    {"van_gogh": True, "harry_potter": True}, '{"van_gogh": true, "harry_potter": true}', ("van_gogh", "harry_potter"),
])
def test_request_shapes(policy: Policy, request_value: object) -> None:
    assert policy.resolve(request_value) == {"nudity", "van_gogh", "harry_potter"}


@pytest.mark.parametrize("request_value", [["-nudity"], ["!nudity"], {"nudity": False}, '{"nudity": false}', "-nudity"])
def test_mandatory_cannot_be_disabled(policy: Policy, request_value: object) -> None:
    with pytest.raises(PolicyError, match="mandatory"):
        policy.resolve(request_value)


def test_disabling_optional_is_a_noop(policy: Policy) -> None:
    assert policy.resolve(["-van_gogh"]) == {"nudity"}


@pytest.mark.parametrize("request_value, message", [
    (["mickey_mouse"], "unknown concept"),
    (["van_gogh", "van_gogh"], "more than once"),
    (["van_gogh", "harry_potter", "nudity", "x"], "unknown concept"),
    ("Van Gogh", "invalid concept name"),
    (["UPPER"], "invalid concept name"),
    ([""], "invalid concept name"),
    ("", "empty string"),
    (5, "expected a list"),
    ([1, 2], "must be strings"),
    ({"van_gogh": "yes"}, "true or false"),
    ("[not json", "not valid JSON"),
    ('"van_gogh"', "invalid concept name"),
    (["van_gogh", "-van_gogh"], "both enabled and disabled"),
    (["a" * 65], "invalid concept name"),
    ("x" * 5000, "characters long"),
])
def test_bad_requests(policy: Policy, request_value: object, message: str) -> None:
    with pytest.raises(PolicyError, match=message) as info:
        policy.resolve(request_value, where="vllm_xargs.erase")
    assert "vllm_xargs.erase" in str(info.value) and "Fix:" in str(info.value)


def test_too_many_optional() -> None:
    p = Policy({n: {} for n in "abcd"}, max_requested=2)
    assert p.resolve(["a", "b"]) == {"a", "b"}
    with pytest.raises(PolicyError, match="at most 2"):
        p.resolve(["a", "b", "c"])


def test_mandatory_does_not_count_against_maximum() -> None:
    p = Policy({"m": {"mandatory": True}, "a": {}}, max_requested=1)
    assert p.resolve(["m", "a"]) == {"m", "a"}


def test_resolution_is_pure(policy: Policy) -> None:
    first = policy.resolve(["van_gogh"])
    policy.resolve(["harry_potter"])
    assert policy.resolve(["van_gogh"]) == first == {"nudity", "van_gogh"}


def test_from_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\nmax_requested: 3\non_error: pass\n"
        "concepts:\n  nudity: {pack: packs/nudity, mandatory: true}\n  van_gogh: {pack: /abs/vg}\n"
    )
    p = Policy.from_file(path)
    assert p.mandatory == {"nudity"} and p.optional == {"van_gogh"}
    assert p.on_error == "pass" and p.max_requested == 3
    assert p.entries["nudity"].pack == str(tmp_path / "packs/nudity")
    assert p.entries["van_gogh"].pack == "/abs/vg"
    json_path = tmp_path / "policy.json"
    json_path.write_text('{"concepts": {"a": {"mandatory": false}}}')
    assert Policy.from_file(json_path).optional == {"a"}


@pytest.mark.parametrize("text, field", [
    ("concepts: {}", "concepts"),
    ("concepts: {Bad Name: {}}", "invalid concept name"),
    ("concepts: {a: {mandatory: yes please}}", "mandatory"),
    ("concepts: {a: {pack: 3}}", "pack"),
    ("concepts: {a: {colour: red}}", "colour"),
    ("concepts: {a: {}}\non_error: explode", "on_error"),
    ("concepts: {a: {}}\nmax_requested: -1", "max_requested"),
    ("concepts: {a: {}}\nextra: 1", "extra"),
    ("concepts: {a: {}}\nversion: 7", "version"),
    ("- just\n- a list", "mapping"),
    ("concepts: [unclosed", "YAML"),
])
def test_bad_policy_files(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=field):
        Policy.from_file(path)


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        Policy.from_file(tmp_path / "nope.yaml")


def test_duplicate_entries_refused() -> None:
    with pytest.raises(PolicyError, match="twice"):
        Policy([PolicyEntry("a"), PolicyEntry("a")])


def test_parse_toggles_disable_prefix() -> None:
    t = parse_toggles(["a", "-b", "!c"])
    assert t.enable == ("a",) and t.disable == ("b", "c")
