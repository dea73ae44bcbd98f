#!/usr/bin/env bash
# Build the C++ and the Java client, their tests, benches and conformance runners.
#
#   clients/build.sh [OUT] [--test | --runners]
#
# OUT (default clients/build, ignored by git) gets cpp/ (CMake build: liblars_client.a,
# test_wire, test_client, examples, bench, conformance_runner) and java/ (lars-client.jar,
# lars-tools.jar, launchers bench and conformance_runner). --test then runs ctest and the JUnit
# tests; --runners builds only the benches and conformance runners (what
# tests/e2e/test_conformance.py needs). Everything comes from Debian packages: g++ make cmake
# libmsgpack-cxx-dev nlohmann-json3-dev default-jdk-headless libmsgpack-java
# libjackson2-databind-java junit5.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/build}
mode=${2:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)

cpp_targets=()
java_mode=$mode
if [ "$mode" = --runners ]; then
    cpp_targets=(--target conformance_runner bench)
    java_mode=--tools
fi

echo "-- C++ client -> $out/cpp"
cmake -S "$here/cpp" -B "$out/cpp" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$out/cpp" -j "$(nproc)" "${cpp_targets[@]}"

echo "-- Java client -> $out/java"
"$here/java/build.sh" "$out/java" $java_mode

if [ "$mode" = --test ]; then
    echo "-- C++ tests"
    ctest --test-dir "$out/cpp" --output-on-failure
fi
