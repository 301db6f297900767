"""Pure stream logic without a broker: offsets, batching policy, message decoding, config."""

from __future__ import annotations

import argparse
import importlib

import orjson
import pytest

from rex_stream import cli
from rex_stream.cli import build_parser
from rex_stream.config import LimitSettings, Settings, load_settings, redacted
from rex_stream.engine.requests import Limits, RequestError
from rex_stream.stream.batcher import Accumulator, BatchPolicy
from rex_stream.stream.messages import Source, dead_letter_record, decode
from rex_stream.stream.offsets import OffsetTracker
from rex_stream.stream.supervisor import default_workers_per_gpu, parse_gpus

TP = ("in", 0)


def test_commit_position_only_covers_contiguous_done_offsets():
    t = OffsetTracker()
    for o in (5, 6, 7, 9):
        t.received(TP, o)
    t.done(TP, 6)
    assert t.committable() == {}  # 5 is still pending
    t.done(TP, 5)
    assert t.committable() == {TP: 7}  # next offset to consume
    t.mark_committed({TP: 7})
    assert t.committable() == {}
    t.done(TP, 9)
    assert t.committable() == {}  # 7 pending (8 was never received: a gap in the log is fine)
    t.done(TP, 7)
    assert t.committable() == {TP: 10}
    assert t.in_flight() == 0


def test_offsets_must_increase_and_forget_drops_partitions():
    t = OffsetTracker()
    t.received(TP, 3)
    with pytest.raises(ValueError):
        t.received(TP, 3)
    t.forget([TP])
    assert t.partitions() == [] and t.committable() == {}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_batch_closes_on_size_tokens_or_age():
    clock = Clock()
    acc: Accumulator[int] = Accumulator(BatchPolicy(max_messages=3, max_tokens=100, max_wait_ms=50), clock)
    acc.add(1, 10)
    assert not acc.ready() and acc.wait_s() == pytest.approx(0.05)
    clock.now = 0.049
    assert not acc.ready()
    clock.now = 0.051
    assert acc.ready()  # thin traffic: the oldest message waited max_wait_ms
    acc.add(2, 10)
    acc.add(3, 10)
    acc.add(4, 10)
    assert acc.take() == [1, 2, 3]  # max_messages
    assert acc.take() == [4]
    acc.add(5, 60)
    acc.add(6, 60)
    assert acc.ready()  # token bound reached
    assert acc.take() == [5]  # 5 + 6 would exceed 100 tokens
    assert len(acc) == 1 and acc.tokens == 60


def test_drop_removes_items_of_revoked_partitions():
    acc: Accumulator[str] = Accumulator(BatchPolicy(10, 1000, 10), Clock())
    for item in ("a0", "b1", "a2"):
        acc.add(item, 5)
    assert acc.drop(lambda x: x.startswith("a")) == ["b1"]
    assert acc.items == ["a0", "a2"] and acc.tokens == 10


def _src(value: bytes | None) -> Source:
    return Source("in", 2, 41, b"k", value, (("h", b"v"),), 1000)


@pytest.mark.parametrize("value, code", [
    (None, "empty_message"),
    (b"\xff\xfe", "bad_encoding"),
    (b"{oops", "bad_json"),
    (orjson.dumps({"schema": {"a": None}}), "missing_text"),
    (orjson.dumps({"text": "x"}), "missing_schema"),
    (orjson.dumps({"text": ["x"], "schema": {"a": None}}), "bad_text"),
    (orjson.dumps({"text": "x", "schema": "not json"}), "bad_schema"),
    (orjson.dumps({"text": "x", "schema": {}}), "bad_schema"),
    (orjson.dumps({"text": "x" * 101, "schema": {"a": None}}), "text_too_long"),
    (b"x" * 500, "message_too_large"),
    (orjson.dumps({"text": "x", "schema": {f"t{i}": None for i in range(30)}}), "schema_too_large"),
    (orjson.dumps({"text": "a[PREFIX]b", "schema": {"a": None}}), "bad_text"),
    (orjson.dumps({"text": "[CLASSIFY][MULTICLASSIFY]", "schema": {"a": None}}), "bad_text"),
    (orjson.dumps({"text": "   ", "schema": {"a": None}}), "empty_text"),
])
def test_decode_rejects_with_a_stable_code(value, code):
    limits = LimitSettings(max_message_bytes=400, max_text_chars=100, max_schema_types=20)
    with pytest.raises(RequestError) as err:
        decode(_src(value), limits, limits.engine_limits(), None)
    assert err.value.code == code


def test_decode_accepts_json_and_plain_text():
    limits = LimitSettings()
    job = decode(_src(orjson.dumps({"text": "abc", "schema": '{"a": null}', "meta": {"m": 1}})), limits, Limits(), None)
    assert (job.id, job.request.text, job.request.schema, job.meta) == ("in-2-41", "abc", {"a": None}, {"m": 1})
    plain = decode(_src("纯文本".encode()), limits, Limits(), {"人物": None})
    assert plain.request.text == "纯文本" and plain.request.schema == {"人物": None}


def test_dead_letter_keeps_original_bytes_and_says_why():
    rec = dead_letter_record(_src(b"\xff"), RequestError("bad_encoding", "value is not UTF-8"), "dlq")
    headers = dict(rec.headers)
    assert rec.value == b"\xff" and rec.key == b"k" and headers["h"] == b"v"
    assert headers["rex.error.code"] == b"bad_encoding" and headers["rex.source.offset"] == b"41"


def test_config_layers_and_secret_redaction(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch: {max_wait_ms: 10, max_messages: 7}\nkafka: {sasl_password: s3cret-file}\n")
    monkeypatch.setenv("REX_BATCH__MAX_WAIT_MS", "20")
    s = load_settings(cfg, {"batch": {"max_messages": 9}})
    assert (s.batch.max_wait_ms, s.batch.max_messages) == (20, 9)  # file < env < flags
    assert s.kafka.client_config()["sasl.password"] == "s3cret-file"
    assert "s3cret-file" not in str(redacted(s)) and "s3cret-file" not in repr(s)
    with pytest.raises(ValueError):
        Settings.model_validate({"bogus": 1})
    assert s.model.fusions == ["gelu", "head", "rotary"]
    monkeypatch.setenv("REX_MODEL__FUSIONS", '["gelu", "head"]')
    assert load_settings(cfg, {}).model.fusions == ["gelu", "head"]
    with pytest.raises(ValueError):
        Settings.model_validate({"model": {"fusions": ["softmax"]}})


def test_security_settings_reach_librdkafka():
    s = Settings.model_validate({"kafka": {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                                           "sasl_username": "u", "sasl_password": "p", "ssl_ca_location": "/ca.pem"}})
    conf = s.kafka.client_config()
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["ssl.ca.location"] == "/ca.pem" and conf["ssl.endpoint.identification.algorithm"] == "https"


def test_gpu_selection():
    assert parse_gpus("all", 4) == [0, 1, 2, 3]
    assert parse_gpus("2", 4) == [0, 1]
    assert parse_gpus("0,2", 4) == [0, 2]
    with pytest.raises(ValueError):
        parse_gpus("3,5", 4)
    with pytest.raises(ValueError):
        parse_gpus("all", 0)


def test_workers_per_gpu_default_to_half_the_cores_per_gpu_with_a_device_process():
    assert default_workers_per_gpu(16, 1, device_server=True) == 8  # the measured best (BENCHMARKS run 19)
    assert default_workers_per_gpu(32, 2, device_server=True) == 8
    assert default_workers_per_gpu(128, 1, device_server=True) == 8  # capped
    assert default_workers_per_gpu(8, 2, device_server=True) == 2
    assert default_workers_per_gpu(2, 4, device_server=True) == 1
    assert default_workers_per_gpu(64, 1, device_server=False) == 1  # each worker would hold a model copy


def test_workers_per_gpu_must_be_positive():
    parser = build_parser()
    assert parser.parse_args(["run", "--workers-per-gpu", "3"]).workers_per_gpu == 3
    assert parser.parse_args(["run"]).workers_per_gpu is None
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--workers-per-gpu", "0"])


def test_every_subcommand_dispatches_to_a_function():
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subcommands) == set(cli._COMMANDS) | {"infer", "model"}  # those two are handled inline
    for module, function in cli._COMMANDS.values():
        assert callable(getattr(importlib.import_module(module, "rex_stream"), function))
