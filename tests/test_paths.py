"""Path normalisation: the defaults of the event model, custom rules and every toggle."""

from __future__ import annotations

import pytest

from pipeline.config import Config, PathRule, Paths
from pipeline.paths import PathNormalizer

UUID = "3f2b8c1e-9d4a-4e6b-8f0a-1c2d3e4f5a6b"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/health", "/health"),
        # query string and fragment
        ("/search?q=shoes&page=2", "/search"),
        ("/docs#section-2", "/docs"),
        ("/docs?x=1#frag", "/docs"),
        ("/docs#frag?x=1", "/docs"),
        ("/?utm=1", "/"),
        # repeated slashes
        ("//api///v1//users", "/api/v1/users"),
        ("////", "/"),
        # trailing slash
        ("/users/", "/users"),
        ("/users///", "/users"),
        ("/users/?page=2", "/users"),
        # ids
        ("/users/42", "/users/:id"),
        ("/users/42/orders/", "/users/:id/orders"),
        ("/users/0", "/users/:id"),
        (f"/orders/{UUID}", "/orders/:id"),
        (f"/orders/{UUID.upper()}", "/orders/:id"),
        ("/blobs/0123456789abcdef", "/blobs/:id"),  # 16 hex
        ("/blobs/0123456789ABCDEF0123", "/blobs/:id"),  # 20 hex, upper case
        ("/commits/da39a3ee5e6b4b0d3255bfef95601890afd80709", "/commits/:id"),  # sha1
        ("/a/1/b/2/c/3", "/a/:id/b/:id/c/:id"),
        # kept
        ("/blobs/0123456789abcde", "/blobs/0123456789abcde"),  # 15 hex: short hex kept
        ("/colors/deadbeef", "/colors/deadbeef"),
        ("/v1/users", "/v1/users"),
        ("/users/42abc", "/users/42abc"),
        ("/users/-42", "/users/-42"),
        ("/files/12.5", "/files/12.5"),
        (f"/orders/{UUID}x", f"/orders/{UUID}x"),
        ("/Users/Profile", "/Users/Profile"),  # case kept
        ("/API/V2/Items", "/API/V2/Items"),
    ],
)
def test_default_normalisation(raw: str, expected: str) -> None:
    assert PathNormalizer().normalize(raw) == expected


def test_normalisation_is_idempotent() -> None:
    norm = PathNormalizer()
    for raw in ("/users/42/orders/", "//a//b/?q", f"/x/{UUID}/y/", "/"):
        once = norm.normalize(raw)
        assert norm.normalize(once) == once


def test_custom_rules_run_after_defaults_in_order() -> None:
    cfg = Paths(
        rules=[
            PathRule(pattern=r"^/v\d+/", replacement="/"),
            PathRule(pattern=r"/users/:id", replacement="/u/:id"),
            PathRule(pattern=r"/([a-z]+)-[a-z]{2}$", replacement=r"/\1"),
        ]
    )
    norm = PathNormalizer(cfg)
    assert norm.normalize("/v2/users/42/") == "/u/:id"  # ids replaced before the rule sees them
    assert norm.normalize("/v1/about-de") == "/about"
    assert norm.normalize("/about-de") == "/about"
    assert norm.normalize("/v1/Users/7") == "/Users/:id"  # rules are case-sensitive


def test_rules_from_toml_config() -> None:
    cfg = Config().replace(paths={"rules": [{"pattern": "^/static/.*$", "replacement": "/static/*"}]})
    norm = PathNormalizer(cfg.paths)
    assert norm.normalize("/static/css/app.9f8e7d6c.css") == "/static/*"
    assert norm.normalize("/other/x") == "/other/x"


def test_strip_query_off() -> None:
    norm = PathNormalizer(Paths(strip_query=False))
    assert norm.normalize("/search?q=1") == "/search?q=1"
    assert norm.normalize("/a#b") == "/a#b"


def test_collapse_slashes_off() -> None:
    norm = PathNormalizer(Paths(collapse_slashes=False))
    assert norm.normalize("//a//b") == "//a//b"


def test_strip_trailing_slash_off() -> None:
    norm = PathNormalizer(Paths(strip_trailing_slash=False))
    assert norm.normalize("/users/") == "/users/"
    assert norm.normalize("/users/42/") == "/users/:id/"
    assert norm.normalize("/") == "/"


def test_replace_ids_off() -> None:
    norm = PathNormalizer(Paths(replace_ids=False))
    assert norm.normalize("/users/42") == "/users/42"
    assert norm.normalize(f"/orders/{UUID}/") == f"/orders/{UUID}"


def test_custom_placeholder() -> None:
    norm = PathNormalizer(Paths(id_placeholder="{id}"))
    assert norm.normalize("/users/42/orders/7") == "/users/{id}/orders/{id}"


def test_everything_off_keeps_the_raw_path() -> None:
    cfg = Paths(strip_query=False, collapse_slashes=False, strip_trailing_slash=False, replace_ids=False)
    raw = "//Users/42//?q=1#x"
    assert PathNormalizer(cfg).normalize(raw) == raw
