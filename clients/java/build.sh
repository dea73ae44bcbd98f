#!/usr/bin/env bash
# Build the Java client with the JDK's own tools against Debian's jars: nothing is downloaded.
#
#   clients/java/build.sh [OUT]          OUT (default clients/java/build) gets lars-client.jar,
#                                        lars-tools.jar, the test classes, and two launchers:
#                                        OUT/bench and OUT/conformance_runner
#   clients/java/build.sh [OUT] --test   the same, then runs the JUnit 5 tests
#   clients/java/build.sh [OUT] --tools  only the jars and launchers (no test classes)
#
# Needs (Debian): default-jdk-headless (17+), libmsgpack-java, libjackson2-databind-java (the
# tools and tests read JSON), junit5.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/build}
mode=${2:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)

J=/usr/share/java
MSGPACK=$J/msgpack-core.jar
JACKSON=$J/jackson-databind.jar:$J/jackson-core.jar:$J/jackson-annotations.jar
JUNIT_API=$J/junit-jupiter-api.jar:$J/apiguardian-api.jar:$J/opentest4j.jar:$J/junit-platform-commons.jar
JUNIT_CONSOLE=$J/junit-platform-console-standalone.jar
needed="$MSGPACK:$JACKSON"
[ "$mode" = --tools ] || needed="$needed:$JUNIT_API:$JUNIT_CONSOLE"
for jar in $(echo "$needed" | tr : ' '); do
    if [ ! -e "$jar" ]; then
        echo "java client: $jar is missing; install Debian's libmsgpack-java," \
            "libjackson2-databind-java and junit5" >&2
        exit 1
    fi
done
command -v javac >/dev/null || { echo "java client: no javac; install default-jdk-headless" >&2; exit 1; }

JAVAC=(javac --release 17 -encoding UTF-8 -Xlint:all,-processing,-classfile -Werror)
rm -rf "$out/classes"
mkdir -p "$out/classes/main" "$out/classes/tools" "$out/classes/test"

"${JAVAC[@]}" -d "$out/classes/main" -cp "$MSGPACK" $(find "$here/src/main/java" -name '*.java')
jar --create --file "$out/lars-client.jar" -C "$out/classes/main" .

"${JAVAC[@]}" -d "$out/classes/tools" -cp "$out/lars-client.jar:$MSGPACK:$JACKSON" \
    $(find "$here/bench" "$here/conformance" -name '*.java')
jar --create --file "$out/lars-tools.jar" -C "$out/classes/tools" .

if [ "$mode" != --tools ]; then
    "${JAVAC[@]}" -d "$out/classes/test" -cp "$out/lars-client.jar:$MSGPACK:$JACKSON:$JUNIT_API" \
        $(find "$here/src/test/java" -name '*.java')
fi

# Launchers that find the jars beside themselves: the build directory may be moved.
for tool in bench:Bench conformance_runner:ConformanceRunner; do
    cat > "$out/${tool%%:*}" <<EOF
#!/bin/sh
dir=\$(cd "\$(dirname "\$0")" && pwd)
exec java -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \\
    -cp "\$dir/lars-tools.jar:\$dir/lars-client.jar:$MSGPACK:$JACKSON" lars.tools.${tool##*:} "\$@"
EOF
    chmod +x "$out/${tool%%:*}"
done
# The bench wants the optimising compiler, not the quick start-up of the runner.
sed -i 's/ -XX:TieredStopAtLevel=1//' "$out/bench"

if [ "$mode" = --test ]; then
    java -Dlars.fixtures="$here/../conformance/wire_fixtures.json" -jar "$JUNIT_CONSOLE" \
        --class-path "$out/classes/test:$out/lars-client.jar:$MSGPACK:$JACKSON" \
        --scan-class-path "$out/classes/test" --disable-banner --disable-ansi-colors --details=tree \
        --fail-if-no-tests
fi
