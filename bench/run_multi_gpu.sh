#!/usr/bin/env bash
# Issue 6's figures on one multi-GPU host in one device call: `bench/run_multi_gpu.sh RESULTS_DIR KAFKA_RUNTIME_TAR_XZ`.
# Same host, same base-size random model, every GPU of the host (N):
#   1. engine scaling, one process per GPU: ner and mix with 1 process on 1 GPU, then N on N
#   2. the write-up's strategy: the engine's forward under torch.nn.DataParallel over the N GPUs
#      (and the same engine on GPU 0 alone, same process)
#   3. the stream worker through a real local broker, one worker per GPU in one group (8 partitions
#      per GPU), with 1 GPU and with N (workers only: the engine's figures are step 1's)
set -uo pipefail
res=$1
runtime=$2
py=${PYTHON:-python3}
base=${REX_BENCH_BASE:-/tmp/rex-random-base}
n=$(nvidia-smi -L | wc -l)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
bash bench/device_prologue.sh "$res"
mp="$py -m rex_stream.bench.multiproc --model $base --batch-tokens 131072 --attention triton --chunk 100000 --gpus $n"
timeout 150 $mp --workload ner --messages ${REX_MG_NER:-40000} --procs 1,$n --out "$res/ner-scaling.json" | grep -E "procs|msgs_s"
timeout 150 $mp --workload mix --messages ${REX_MG_MIX:-3000} --procs 1,$n --out "$res/mix-scaling.json" | grep -E "procs|msgs_s"
dp="$py -m rex_stream.bench.dataparallel --model $base --gpus $n"
timeout 120 $dp --workload ner --messages 20000 --out "$res/ner-dataparallel.json" | grep -E "msgs_s|vs_one|active"
timeout 120 $dp --workload mix --messages 2000 --out "$res/mix-dataparallel.json" | grep -E "msgs_s|vs_one|active"
mkdir -p /tmp/kafka-rt && tar -xJf "$runtime" -C /tmp/kafka-rt
export REX_KAFKA_CACHE=/tmp/kafka-rt/kafka-cache REX_KAFKA_JAVA=/tmp/kafka-rt/jre-min/bin/java
bp="$py -m rex_stream.bench.broker_path --model $base --workload ner --warmup 4000 --workers 1 --no-engine --messages ${REX_MG_BROKER:-100000}"
timeout 200 $bp --gpus 1 --partitions 8 --out "$res/ner-broker-1gpu.json" | grep -E "msgs_s|vs_engine"
timeout 200 $bp --gpus all --partitions $((8 * n)) --log "$res/worker-log-$n.jsonl" --out "$res/ner-broker-${n}gpu.json" | grep -E "msgs_s|vs_engine"
