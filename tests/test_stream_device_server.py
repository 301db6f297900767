"""`rex-stream run --device-server` on a real broker: workers share one device process, survive its loss."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import orjson

from streamkit import cheap_cases, produce, read_all, values, write_config


def _children(pid: int) -> dict[int, str]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(line.split(None, 1)[0]): line.split(None, 1)[1] for line in out.strip().splitlines()}


def test_workers_share_a_device_process_and_survive_its_loss(kafka_broker, kafka_topics, tiny_model, golden_cases,
                                                             tmp_path: Path):
    topics = kafka_topics(input=4, output=4, dlq=1)
    cases = cheap_cases(golden_cases, 40)
    items = [(c["id"].encode(), orjson.dumps({"id": c["id"], "text": c["text"], "schema": c["schema"]}))
             for c in cases]
    produce(kafka_broker.bootstrap, topics["input"], items[:20])
    cfg = write_config(tmp_path / "cfg.yaml", kafka_broker.bootstrap, topics, tiny_model,
                       consumer={"session_timeout_ms": 6000})
    log = tmp_path / "sup.log"
    sup = subprocess.Popen([sys.executable, "-m", "rex_stream.cli", "run", "--config", str(cfg), "--workers", "2",
                            "--device-server"], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        assert len(read_all(kafka_broker.bootstrap, topics["output"], 20, timeout=180)) >= 20, log.read_text()[-3000:]
        children = _children(sup.pid)
        devices = [pid for pid, args in children.items() if " device-server " in f" {args} "]
        assert len(children) == 3 and len(devices) == 1, children  # two workers, one device process
        subprocess.run(["kill", "-9", str(devices[0])], check=True)
        # Work sent after the loss: the workers notice, stop without committing, and come back with
        # the restarted device process; every message still gets its (golden) result.
        produce(kafka_broker.bootstrap, topics["input"], items[20:])
        # At least once: inputs a stopped worker had not committed come again, so wait for every id.
        results = read_all(kafka_broker.bootstrap, topics["output"], 10**9, timeout=240,
                           until=lambda got: {v["id"] for v in values(got)} >= {c["id"] for c in cases})
    finally:
        sup.send_signal(signal.SIGTERM)
        code = sup.wait(120)
    text = log.read_text()
    assert code == 0, text[-3000:]
    by_id = {v["id"]: v for v in values(results)}
    assert set(by_id) == {c["id"] for c in cases}, text[-3000:]
    for c in cases:
        assert by_id[c["id"]]["output"] == c["output"], c["id"]
    assert "Traceback" not in text  # the loss is reported as log events, not as a raw traceback
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert sum(e["event"] == "device_server_started" for e in events) >= 2  # the first and the restarted one
    assert any(e["event"] == "worker_stopped" and e.get("reason") == "device_lost" for e in events), text[-3000:]
    assert sum(e["event"] == "device_server_stopped" for e in events) == 1  # the last one stopped cleanly
    configs = [e["settings"]["model"] for e in events if e["event"] == "config"]
    assert configs and all(m["device_authkey"] == "**********" for m in configs)  # a secret: never logged
