"""DPS MQTT names: username, request and response topics."""

import pytest

from device_sim.mqtt import topics
from device_sim.mqtt.topics import RegisterRequest, ResponseTopic, StatusRequest, TopicError, Username


@pytest.mark.parametrize(
    "username, expected",
    [
        ("0ne00111111/registrations/dev-1/api-version=2021-06-01",
         Username("0ne00111111", "dev-1", "2021-06-01")),
        ("0ne001/registrations/dev-1/api-version=2019-03-31&ClientVersion=1.15.0",
         Username("0ne001", "dev-1", "2019-03-31", "1.15.0")),
        # Python SDK URL-encodes its user agent
        ("s/registrations/d/api-version=2019-03-31&ClientVersion=azure-iot-device-provisioning-py%2F2.14.0%28x%29",
         Username("s", "d", "2019-03-31", "azure-iot-device-provisioning-py/2.14.0(x)")),
        ("s/registrations/d/?api-version=2021-10-01&unknown=1", Username("s", "d", "2021-10-01")),
        ("s/registrations/d", Username("s", "d", None)),
        ("s/registrations/d/", Username("s", "d", None)),
    ],
)
def test_parse_username(username, expected):
    assert topics.parse_username(username) == expected


@pytest.mark.parametrize("bad", ["", "dev-1", "/registrations/d/api-version=1", "s/registrations//api-version=1",
                                 "s/registrations/d/api-version=1&api-version=2"])
def test_parse_username_refuses(bad):
    with pytest.raises(TopicError):
        topics.parse_username(bad)


def test_format_username_round_trip():
    text = topics.format_username("0ne1", "dev-1", "2021-06-01", "device-sim/0.1 (linux)")
    assert topics.parse_username(text) == Username("0ne1", "dev-1", "2021-06-01", "device-sim/0.1 (linux)")
    assert topics.format_username("0ne1", "d", "v") == "0ne1/registrations/d/api-version=v"


@pytest.mark.parametrize(
    "topic, expected",
    [
        ("$dps/registrations/PUT/iotdps-register/?$rid=1", RegisterRequest("1")),
        ("$dps/registrations/PUT/iotdps-register/?$rid=a%2Db", RegisterRequest("a%2Db")),  # echoed verbatim
        ("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=9&operationId=5.abc.def-1",
         StatusRequest("9", "5.abc.def-1")),
        ("$dps/registrations/GET/iotdps-get-operationstatus/?operationId=x&$rid=9", StatusRequest("9", "x")),
    ],
)
def test_parse_request(topic, expected):
    assert topics.parse_request(topic) == expected


@pytest.mark.parametrize("bad", [
    "$dps/registrations/PUT/iotdps-register/",
    "$dps/registrations/PUT/iotdps-register/?rid=1",
    "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1",
    "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId=",
    "$dps/registrations/PUT/iotdps-register/?$rid=1&$rid=2",
    "$dps/registrations/POST/iotdps-get-registration/?$rid=1",
    "devices/x/messages/events/",
])
def test_parse_request_refuses(bad):
    with pytest.raises(TopicError):
        topics.parse_request(bad)


def test_request_formatters_round_trip():
    assert topics.parse_request(topics.format_register("7")) == RegisterRequest("7")
    assert topics.parse_request(topics.format_status("7", "op&1")) == StatusRequest("7", "op&1")


def test_response_topic_puts_rid_first():
    assert topics.format_response(202, "42", 3) == "$dps/registrations/res/202/?$rid=42&retry-after=3"
    assert topics.format_response(200, "x") == "$dps/registrations/res/200/?$rid=x"


@pytest.mark.parametrize("status, rid, retry", [(200, "1", None), (202, "abc", 3), (429, "u-u-i-d", 10), (401, "1", None)])
def test_response_round_trip(status, rid, retry):
    assert topics.parse_response(topics.format_response(status, rid, retry)) == ResponseTopic(status, rid, retry)


@pytest.mark.parametrize("bad", ["$dps/registrations/res/abc/?$rid=1", "$dps/registrations/res/200", "$dps/registrations/res/200/?x=1", "other/200/?$rid=1"])
def test_parse_response_refuses(bad):
    with pytest.raises(TopicError):
        topics.parse_response(bad)


def test_retry_after():
    assert topics.parse_retry_after("3") == 3
    assert topics.parse_retry_after(" 10 ") == 10
    assert topics.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert topics.parse_retry_after(None) is None
    assert topics.parse_retry_after("²") is None
