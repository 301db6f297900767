#!/usr/bin/env bash
# Build the Kafka runtime that bench/run_broker_path.sh carries to a GPU machine without Java:
# `bench/make_kafka_runtime.sh OUT.tar.xz` (~50 MB). A jlink'd Java 17 with the modules the broker
# and its logging need (`jre-min/`), and the broker jars devbroker fetches (`kafka-cache/`, same
# layout and marker), with the natives of other platforms taken out of zstd-jni and snappy-java.
set -euo pipefail
out=$(realpath -m "$1")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
libs=$(python -c "from rex_stream.devbroker import ensure_kafka_jars; print(ensure_kafka_jars())")
version=$(basename "$(dirname "$libs")")
jlink --add-modules java.base,java.management,java.naming,java.logging,java.xml,java.desktop,java.security.jgss,java.security.sasl,jdk.management,jdk.unsupported,java.sql,jdk.crypto.ec,jdk.zipfs,java.instrument \
    --compress=0 --strip-debug --no-header-files --no-man-pages --output "$work/jre-min"
rm -f "$work"/jre-min/lib/server/classes*.jsa
mkdir -p "$work/kafka-cache/$version"
cp -a "$libs" "$work/kafka-cache/$version/"
cd "$work/kafka-cache/$version/libs"
for jar in zstd-jni-*.jar snappy-java-*.jar; do
    keep=$(unzip -Z1 "$jar" | grep -E '^(linux/amd64/|org/xerial/snappy/native/Linux/x86_64/)' || true)
    drop=$(unzip -Z1 "$jar" | grep -E '\.(so|dll|dylib|jnilib|a)$' | grep -vxF "$keep" || true)
    [[ -z $drop ]] || echo "$drop" | zip -q -d "$jar" -@
done
tar -C "$work" -cf - kafka-cache jre-min | xz -9 -T0 > "$out"
ls -l "$out"
