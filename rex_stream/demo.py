"""`rex-stream demo`: the whole product on one machine, through a real local Kafka broker.

Starts a single-node Kafka broker, creates topics, produces example texts (and two malformed
messages, to show the dead-letter path), runs one worker process, prints the results and stops
everything. The real model is used when it can be fetched from ModelScope; offline, a
random-weights model of the same architecture stands in and the demo says so: its outputs are
then meaningless, only the plumbing is real.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from .devbroker import LocalBroker, create_topics

EXAMPLES: list[tuple[str, dict[str, Any]]] = [
    ("阿里巴巴集团的创始人马云出生于浙江杭州。", {"人物": None, "地理位置": None, "组织机构": None}),
    ("华为技术有限公司成立于1987年，总部位于深圳，创始人是任正非。",
     {"组织机构": {"创始人(人物)": None, "总部地点(地理位置)": None, "成立日期(时间)": None}}),
    ("昨晚的决赛中，中国女排以三比一战胜巴西队，夺得冠军。", {"胜负(事件触发词)": {"胜者": None, "败者": None, "时间": None}}),
    ("这家餐厅的菜味道很好，但是服务太慢了。", {"属性词": {"情感词": None}}),
    ("[CLASSIFY]这款手机续航很差，拍照也一般。", {"正向情感": None, "负向情感": None}),
    ("[MULTICLASSIFY]一部讲述古代侠客行走江湖的武侠小说。", {"小说": None, "历史": None, "科幻": None, "武侠": None}),
    ("长江是中国最长的河流，全长约六千三百公里。", {"中国最长的河流是哪条？": None}),
]
MALFORMED = [b"{this is not json", orjson.dumps({"text": 42, "schema": {"a": None}})]


def _model_dir(name: str, work: Path) -> tuple[str, bool]:
    """The real model if it can be had, else a random base-size stand-in (and say so)."""
    from .engine.random_model import write_random_model
    from .engine.weights import ModelNotFound, resolve_model_dir

    print(f"demo: fetching model {name} (ModelScope) ...", flush=True)
    try:
        return str(resolve_model_dir(name)), True
    except ModelNotFound as exc:
        print(f"demo: the model is not available here ({str(exc)[:160]}...)", flush=True)
    vocab = Path(os.environ.get("REX_SHARED", "../shared")) / "rex" / "tiny-random" / "vocab.txt"
    if not vocab.is_file():
        raise SystemExit(f"demo: no model and no vocab.txt for a stand-in (looked for {vocab}; set REX_SHARED)")
    out = work / "random-base"
    write_random_model(out, "base", seed=0, vocab_path=vocab)
    print("demo: OFFLINE — using a RANDOM-WEIGHTS model of the same architecture (base size). "
          "Its outputs are meaningless; the Kafka and batching path is the real one.", flush=True)
    return str(out), False


def main(args: Any) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="rex-demo-") as tmp:
        work = Path(tmp)
        model, real = _model_dir(args.model, work)
        print("demo: starting a local Kafka broker ...", flush=True)
        with LocalBroker(data_dir=work / "kafka") as broker:
            create_topics(broker.bootstrap, {"demo-in": 3, "demo-out": 3, "demo-dead-letter": 1})
            config = {
                "kafka": {"bootstrap_servers": broker.bootstrap},
                "topics": {"input": ["demo-in"], "output": "demo-out", "dead_letter": "demo-dead-letter"},
                "consumer": {"group_id": "rex-demo"},
                "model": {"name": model, "device": device, "dtype": "bf16" if device.startswith("cuda") else "fp32"},
                "batch": {"max_messages": 64, "max_wait_ms": 50},
                "monitor": {"stats_interval_s": 5.0},
            }
            cfg = work / "rex-stream.yaml"
            cfg.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
            texts = _produce(broker.bootstrap, args.messages)
            log = work / "worker.log"
            with open(log, "wb") as out:
                worker = subprocess.Popen([sys.executable, "-m", "rex_stream.cli", "run", "--config", str(cfg)],
                                          stdout=out, stderr=subprocess.STDOUT)
                try:
                    results, dead = _collect(broker.bootstrap, len(texts), len(MALFORMED), timeout=600)
                finally:
                    worker.send_signal(signal.SIGTERM)
                    code = worker.wait(120)
            _report(results, dead, texts, real)
            print(f"demo: worker exited with {code}; its JSON log had {len(log.read_text().splitlines())} lines")
            ok = code == 0 and len(results) == len(texts) and len(dead) == len(MALFORMED)
            return 0 if ok else 1


def _produce(bootstrap: str, count: int) -> dict[str, str]:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    texts = {}
    for i in range(count):
        text, schema = EXAMPLES[i % len(EXAMPLES)]
        ident = f"demo-{i}"
        texts[ident] = text
        producer.produce("demo-in", orjson.dumps({"id": ident, "text": text, "schema": schema}), ident.encode())
    for raw in MALFORMED:
        producer.produce("demo-in", raw)
    producer.flush(30)
    print(f"demo: produced {count} messages and {len(MALFORMED)} malformed ones to demo-in", flush=True)
    return texts


def _collect(bootstrap: str, results: int, dead: int, timeout: float) -> tuple[list[dict], list[Any]]:
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "rex-demo-reader", "auto.offset.reset": "earliest"})
    consumer.subscribe(["demo-out", "demo-dead-letter"])
    out, dlq = [], []
    deadline = time.monotonic() + timeout
    try:
        while (len(out) < results or len(dlq) < dead) and time.monotonic() < deadline:
            for msg in consumer.consume(100, 0.5):
                if msg.error():
                    continue
                (out.append(orjson.loads(msg.value())) if msg.topic() == "demo-out" else dlq.append(msg))
    finally:
        consumer.close()
    return out, dlq


def _report(results: list[dict], dead: list[Any], texts: dict[str, str], real: bool) -> None:
    print(f"\ndemo: {len(results)} results" + ("" if real else " (RANDOM WEIGHTS: outputs are meaningless)"))
    for r in sorted(results, key=lambda r: int(str(r["id"]).split("-")[-1]))[: 2 * len(EXAMPLES)]:
        print(f"  {r['id']:>8}  {texts.get(r['id'], '')[:32]:<34} {orjson.dumps(r['output']).decode()[:150]}")
    latencies = sorted(r["latency_ms"] for r in results if r.get("latency_ms") is not None)
    if latencies:
        print(f"demo: end-to-end latency p50 {latencies[len(latencies) // 2]} ms, max {latencies[-1]} ms")
    for msg in dead:
        headers = dict(msg.headers() or [])
        print(f"demo: dead letter: {headers.get('rex.error.code', b'').decode()}: "
              f"{headers.get('rex.error.reason', b'').decode()[:100]}")
