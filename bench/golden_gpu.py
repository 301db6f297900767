"""Golden cases through the engine on the GPU in fp32: `python bench/golden_gpu.py [ATTENTION]`.

Exact equality with `shared/rex/golden/public.jsonl` (REX_SHARED) is the definition of correct; this
checks it on the card the benchmarks ran on, with the engine's own device-side link join.
"""
import json
import os
import sys
from pathlib import Path

from rex_stream.engine.engine import Engine
from rex_stream.engine.requests import Limits

shared = Path(os.environ.get("REX_SHARED", "../shared")) / "rex"
attention = sys.argv[1] if len(sys.argv) > 1 else "sdpa"
cases = [json.loads(line) for line in (shared / "golden" / "public.jsonl").read_text(encoding="utf-8").splitlines()]
# Reference mode: the golden set has three empty texts, which the reference answers with [].
engine = Engine(shared / "tiny-random", device="cuda", dtype="fp32", attention=attention,
                limits=Limits(allow_empty_text=True))
outcomes = engine.infer([(c["text"], c["schema"]) for c in cases])
same = sum(o.output == c["output"] for o, c in zip(outcomes, cases))
print(json.dumps({"attention": attention, "identical": same, "cases": len(cases),
                  "status": engine.runner.model.fast_path_status()["attention_active"]}))
