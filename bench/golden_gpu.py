"""Golden cases through the engine on the GPU in fp32: `python bench/golden_gpu.py [ATTENTION] [served]`.

Exact equality with `shared/rex/golden/public.jsonl` (REX_SHARED) is the definition of correct; this
checks it on the card the benchmarks ran on, with the engine's own device-side link join. With
`served`, the engine is a host-only client of a device process (`engine.device_server`).
"""
import json
import os
import sys
from pathlib import Path

from rex_stream.engine.device_server import start_device_server
from rex_stream.engine.engine import Engine
from rex_stream.engine.requests import Limits


def main() -> None:
    shared = Path(os.environ.get("REX_SHARED", "../shared")) / "rex"
    attention = sys.argv[1] if len(sys.argv) > 1 else "sdpa"
    cases = [json.loads(line) for line in (shared / "golden" / "public.jsonl").read_text(encoding="utf-8").splitlines()]
    # Reference mode: the golden set has three empty texts, which the reference answers with [].
    settings = {"model": shared / "tiny-random", "device": "cuda", "dtype": "fp32", "attention": attention}
    if "served" in sys.argv[2:]:
        _, (link,), status = start_device_server(1, **settings)
        engine = Engine(settings["model"], limits=Limits(allow_empty_text=True), device_link=link)
    else:
        engine = Engine(**settings, limits=Limits(allow_empty_text=True))
        status = engine.runner.model.fast_path_status()
    outcomes = engine.infer([(c["text"], c["schema"]) for c in cases])
    same = sum(o.output == c["output"] for o, c in zip(outcomes, cases))
    print(json.dumps({"attention": attention, "served": "served" in sys.argv[2:], "identical": same,
                      "cases": len(cases), "status": status["attention_active"]}))


if __name__ == "__main__":  # the device process (spawned) imports this file too
    main()
