#!/usr/bin/env bash
# The stream worker through a real Kafka broker on the GPU machine, against the bare engine there:
# `bench/run_broker_path.sh RESULTS_DIR KAFKA_RUNTIME_TAR_XZ`. That machine has no Java and no network,
# so the call carries a runtime: a jlink'd Java 17 (`jre-min/`) and the broker jars in devbroker's
# cache layout (`kafka-cache/4.4.0/libs/` with its `.rex-complete`), one tar.xz (BENCHMARKS.md run 10).
set -uo pipefail
res=$1
runtime=$2
source bench/device_prologue.sh "$res"
mkdir -p /tmp/kafka-rt && tar -xJf "$runtime" -C /tmp/kafka-rt
export REX_KAFKA_CACHE=/tmp/kafka-rt/kafka-cache REX_KAFKA_JAVA=/tmp/kafka-rt/jre-min/bin/java
bp="$py -m rex_stream.bench.broker_path --model $base --workload ner --gpus all --warmup 4000 --partitions 8"
timeout 300 $bp --messages ${REX_BP_MESSAGES:-40000} --workers ${REX_BP_WORKERS:-4} --device-server \
    --log "$res/worker-log-served.jsonl" --out "$res/ner-broker-served.json" | grep -E "msgs_s|vs_engine"
timeout 220 $bp --messages ${REX_BP_MESSAGES:-40000} --workers 1 --out "$res/ner-broker-one.json" | grep -E "msgs_s|vs_engine"
