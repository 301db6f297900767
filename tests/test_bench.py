"""`rex-stream bench` on CPU with the tiny model: all three paths, ratios, agreement, JSON and PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rex_stream.bench.baselines import forward_flops, relative_rows
from rex_stream.bench.workloads import TASKS, load_task, load_workload
from rex_stream.engine.random_model import BASE_CONFIG
from rex_stream.engine.weights import ModelConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_forward_flops_base_config() -> None:
    cfg = ModelConfig.from_dict(BASE_CONFIG)
    flops = forward_flops(cfg, 128)
    # perf.md section 4: ~25.5 GFLOP per 128-token forward (24.33 with only the reachable relative rows).
    assert abs(flops - 25e9) / 25e9 < 0.15
    assert abs(flops - 24.33e9) / 24.33e9 < 0.01
    assert relative_rows(256, 128) == 255 and relative_rows(256, 512) == 512
    # Quadratic terms grow faster than the dense ones.
    assert forward_flops(cfg, 256) > 2 * flops


def test_workloads_follow_the_dev_sets(shared_dir: Path) -> None:
    ner = load_task("ner", shared_dir)
    assert load_workload("ner", shared_dir, 250) == (ner * 3)[:250]
    mix = load_workload("mix", shared_dir, 21)
    for i, (text, schema) in enumerate(mix[:14]):
        assert (text, schema) == load_task(TASKS[i % 7], shared_dir)[i // 7]
    assert all(t.startswith("[CLASSIFY]") for t, _ in load_task("tc_single_label", shared_dir))
    assert all(t.startswith("[MULTICLASSIFY]") for t, _ in load_task("tc_multi_label", shared_dir))
    # The golden reference's "dev" cases are these records, text and schema unchanged.
    records = {(t, json.dumps(s, sort_keys=True, ensure_ascii=False))
               for task in TASKS for t, s in load_task(task, shared_dir)}
    with open(shared_dir / "rex" / "golden" / "public.jsonl", encoding="utf-8") as fh:
        dev = [case for case in map(json.loads, fh) if case["family"] == "dev"]
    assert dev and all((c["text"], json.dumps(c["schema"], sort_keys=True, ensure_ascii=False)) in records for c in dev)


def test_bench_cpu_tiny(shared_dir: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from rex_stream.cli import main

    threads = torch.get_num_threads()
    monkeypatch.setenv("REX_SHARED", str(shared_dir))
    out = tmp_path / "results"
    # One torch thread: on a shared 2-core box two OpenMP threads thrash; one keeps this ~50 s.
    rc = main(["bench", "--workload", "mix", "--model", str(tiny_model), "--device", "cpu", "--messages", "60",
               "--baseline-a-messages", "10", "--budgets", "2048,8192", "--out", str(out),
               "--warmup-messages", "2", "--agreement-messages", "30", "--threads", "1", "--host-processes", "0,2"])
    assert rc == 0
    assert torch.get_num_threads() == threads  # --threads is undone on return
    (json_path,) = out.glob("mix-*.json")
    (png_path,) = out.glob("mix-*.png")
    assert png_path.stem == json_path.stem
    assert png_path.read_bytes()[:8] == PNG_MAGIC
    result = json.loads(json_path.read_text(encoding="utf-8"))
    assert result["complete"] and result["workload"] == "mix" and result["messages"] == 60
    assert result["device"]["type"] == "cpu" and result["device"]["torch"]
    paths = result["paths"]
    a, b, engines = paths["reference_style"], paths["competent_user"], paths["engine"]
    assert a["subset"] and a["messages"] == 10 and a["batch"] == 1 and a["dtype"] == "fp32"
    assert b["batch"] == 32 and b["messages"] == 60
    assert [(e["budget"], e.get("host_processes")) for e in engines] == [(2048, None), (8192, None), (2048, 2), (8192, 2)]
    for row in [a, b, *engines]:
        for key in ("messages_per_s", "forwards_per_s", "real_tokens_per_s", "mfu", "forwards_per_message"):
            assert row[key] > 0, (row["path"], key)
        assert 0 <= row["padding_share"] < 1
        assert row["batch_latency_ms"]["p50"] > 0 and row["batch_latency_ms"]["p99"] >= row["batch_latency_ms"]["p50"]
    assert a["padding_share"] == 0
    # Same forwards whatever the batching and wherever the host work runs (fp32 everywhere on CPU).
    assert all(e["forwards"] == b["forwards"] and e["messages"] == 60 for e in engines)
    ratios = result["ratios"]
    for key in ("engine_vs_reference_style", "engine_vs_competent_user"):
        assert ratios[key] > 0
    keys = {"2048", "8192", "2048+2hosts", "8192+2hosts"}
    assert set(ratios["engine_vs_competent_user_by_budget"]) == keys
    agree = result["agreement"]
    shares = [agree["reference_style"]["share"], agree["competent_user"]["share"],
              *(agree["engine"][k]["share"] for k in keys)]
    assert all(0 <= s <= 1 for s in shares)
    # Served or not, the fp32 engine answers exactly as the fp32 reference engine.
    assert all(agree["engine"][k] == {"messages": 30, "identical": 30, "share": 1.0} for k in keys)
    assert agree["competent_user"]["messages"] == 30 and agree["reference_style"]["messages"] == 10
    assert result["peak"]["flops_per_s"] > 0


def test_broker_path_times_served_workers_through_a_real_broker(kafka_jars: Path, shared_dir: Path,
                                                                 tiny_model: Path, tmp_path: Path) -> None:
    import argparse

    from rex_stream.bench.broker_path import run_worker_path

    args = argparse.Namespace(model=str(tiny_model), gpus=None, device="cpu", workers=2, device_server=True,
                              dtype="fp32", batch_tokens=8192, partitions=4, timeout=180, log=None)
    items = load_workload("ner", shared_dir, 80)
    # Raises unless every message (ids 0-79) has a result and the workers stop cleanly.
    result = run_worker_path(args, items[:20], items[20:], tmp_path)
    assert result["exit_code"] == 0 and result["seconds"] > 0 and result["msgs_s"] > 0
    assert result["steady_msgs_s"] is None or result["steady_msgs_s"] > 0
    assert "--device-server" in result["command"] and "--workers 2" in result["command"]


def test_steady_rate_leaves_out_fill_and_drain() -> None:
    from rex_stream.bench.broker_path import steady_rate

    steady = [5_000.0 + k for k in range(1_000)]  # one result per ms
    # a slow start (the pipeline filling) and a slow tail do not change it; the whole-run rate would
    assert steady_rate([0.0] * 50 + steady + [9_000.0 + 10 * k for k in range(50)]) == pytest.approx(1_000, rel=0.01)
    assert steady_rate([1.0] * 20) is None  # all at once: no span to divide by
    assert steady_rate([]) is None


def test_precision_compares_reduced_precision_with_fp32(golden_cases: list[dict], tiny_model: Path) -> None:
    """`rex_stream.bench.precision` on CPU: bf16 against fp32 on golden cases, with a chosen fusion set."""
    from rex_stream.bench.precision import compare

    cases = golden_cases[:8]
    result = compare(str(tiny_model), cases, "cpu", "bf16", fusions=frozenset({"head"}))
    assert result["cases"] == 8 and result["forwards"] >= 8
    assert result["fusions"] == ["head"]
    assert 0 < result["logit_max_abs_error"] < result["logit_rms_fp32"]  # bf16 differs, but far below the logits
    assert result["identical_outputs"] == round(result["identical_share"] * 8)
    assert result["flips_within_error"] == (result["flip_max_abs_fp32_logit"] <= result["logit_max_abs_error"])


def test_multiproc_runs_every_message_once_per_layout(shared_dir: Path, tiny_model: Path) -> None:
    from rex_stream.bench.multiproc import measure

    args = {"model": str(tiny_model), "workload": "ner", "messages": 40, "device": "cpu", "dtype": "fp32",
            "batch_tokens": 8192, "chunk": 16, "gpus": 1, "attention": "sdpa", "device_server": False,
            "warmup": 4, "shared": str(shared_dir)}
    row = measure(2, args)
    # The two processes split the 40 messages (every other one each); ner is one forward per message.
    assert row["procs"] == 2 and row["messages"] == 40 and row["forwards"] >= 40
    assert row["seconds"] > 0 and row["msgs_s"] == pytest.approx(40 / row["seconds"])


def test_multiproc_serves_each_gpu_from_its_own_device_process(shared_dir: Path, tiny_model: Path) -> None:
    """`--device-server --gpus 2`: two device processes (here both on the CPU), three host processes
    spread over them (ranks 0 and 2 on the first, 1 on the second); every message is answered once."""
    from rex_stream.bench.multiproc import measure

    args = {"model": str(tiny_model), "workload": "ner", "messages": 30, "device": "cpu", "dtype": "fp32",
            "batch_tokens": 8192, "chunk": 8, "gpus": 2, "attention": "sdpa", "device_server": True,
            "warmup": 2, "shared": str(shared_dir)}
    row = measure(3, args)
    assert row["procs"] == 3 and row["messages"] == 30 and row["forwards"] >= 30


def test_served_pass_stops_when_a_host_process_fails(shared_dir: Path, tiny_model: Path) -> None:
    """A host process that dies (here on an engine argument it cannot take) fails the served pass at
    once, and the device thread ends, instead of the bench waiting for answers that never come."""
    import threading
    import time

    from rex_stream.bench.served import served_path
    from rex_stream.engine.engine import Engine

    engine = Engine(tiny_model, device="cpu")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="child processes failed"):
        served_path(engine, {"no_such_argument": 1}, "ner", shared_dir, messages=8, hosts=1, budget=4096, keep=4,
                    warm=2, chunk=4)
    assert time.monotonic() - start < 120
    assert not [t for t in threading.enumerate() if t.name == "bench-device"]


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")
def test_dataparallel_baseline_keeps_the_engine_outputs(golden_cases: list[dict], tiny_model: Path) -> None:
    """The DataParallel wrapper answers the runner's model questions and changes no output (on CPU
    DataParallel runs the module directly, so this pins the wrapping, not the splitting)."""
    import torch

    from rex_stream.bench.dataparallel import DataParallelModel, _Autocast
    from rex_stream.engine.engine import Engine
    from rex_stream.engine.requests import Limits

    engine = Engine(tiny_model, device="cpu", dtype="fp32", limits=Limits(allow_empty_text=True))
    cases = [(c["text"], c["schema"]) for c in golden_cases[:40]]
    want = [o.output for o in engine.infer(cases)]
    model = engine.runner.model
    engine.runner.model = DataParallelModel(_Autocast(model, torch.bfloat16))
    assert engine.runner.model.attention == model.attention  # a RexModel attribute, through the wrapper
    assert [o.output for o in engine.infer(cases)] == want
