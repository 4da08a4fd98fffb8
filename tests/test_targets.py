"""The three places a client names a URL the service connects to (callback_url, a source by
reference, a live stream) refuse the same tricks with the same words: one owner,
service.jobs.targets."""

from __future__ import annotations

import pytest

from service.jobs.sources import SourcePolicy, check_source
from service.jobs.stream_sources import check_stream_url
from service.jobs.targets import check_target, split_url
from service.jobs.webhooks import check_callback_url

HOSTS = ["hooks.example.com", "93.184.216.34:8080"]


def _checks(url: str) -> dict[str, str | None]:
    return {
        "callback_url": check_callback_url(url, HOSTS),
        "source": check_source(url, SourcePolicy(hosts=HOSTS)),
        "url": check_stream_url(url, HOSTS, [], lambda host, port: ["93.184.216.35"]),
    }


@pytest.mark.parametrize(("url", "why"), [
    ("http://hooks.example.com/a b", "must not contain whitespace"),
    ("http://hooks.example.com/%0D%0A\r\nX: y", "must not contain whitespace"),
    ("http://hooks.example.com/\u00e9", "non-ASCII"),
    ("http://hooks.example.com:99999/", "is not a valid URL"),
    ("http://hooks.example.com:port/", "is not a valid URL"),
    ("http://[::1/", "is not a valid URL"),
    ("http://" + "a" * 2050, "longer than 2048 characters"),
    ("http://hooks.example.com:6379/", "hooks.example.com:6379 are not allowed"),  # listed alone: port 80 only
    ("http://93.184.216.34/", "93.184.216.34:80 are not allowed"),  # listed with its port: that port only
    ("http://HOOKS.example.com.:8080/", "hooks.example.com:8080 are not allowed"),
    ("http:///path", "with a host"),
])
def test_every_checker_refuses_the_same_url_with_the_same_words(url: str, why: str) -> None:
    for field, refusal in _checks(url).items():
        assert refusal is not None and why in refusal, (field, url, refusal)
        assert refusal.startswith(field), (field, refusal)  # names the field the client sent


def test_what_each_checker_allows_beyond_the_shared_rules() -> None:
    assert all(why is None for why in _checks("http://hooks.example.com/x").values())
    assert all(why is None for why in _checks("http://93.184.216.34:8080/x").values())
    # Credentials: a camera's RTSP URL carries them; a callback or a download must not.
    with_user = _checks("http://u:p@hooks.example.com/x")
    assert "credentials" in with_user["callback_url"] and "credentials" in with_user["source"]
    assert with_user["url"] is None
    # Schemes: each checker names its own.
    assert "starting http:// or https://" in check_callback_url("ftp://hooks.example.com/", HOSTS)
    assert "rtsp://" in check_stream_url("ftp://hooks.example.com/", HOSTS, [])
    # A scheme without a default port must give one.
    parts = split_url("udp://hooks.example.com/", "url")
    assert not isinstance(parts, str)
    assert check_target(parts, "url", {"udp": None}, HOSTS, "X") == "a udp:// url must give its port"
