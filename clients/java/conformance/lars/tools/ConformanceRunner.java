package lars.tools;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.JsonNodeFactory;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.File;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.function.Supplier;
import lars.client.AgentUnavailableException;
import lars.client.Host;
import lars.client.InvalidValueException;
import lars.client.LarsClient;
import lars.client.NoRouteException;
import lars.client.OverloadedException;
import lars.client.RequestRejectedException;

/**
 * The Java runner of the client conformance scenario: clients/conformance/README.md. It does
 * exactly what tests/conformance_runner.py does, with LarsClient.
 *
 * <pre>
 *   java -cp ... lars.tools.ConformanceRunner --scenario clients/conformance/scenario.json
 *        --base-port N --dead-base-port M [--host 127.0.0.1] [--module-offset K]
 * </pre>
 *
 * One JSON line per step, then {"passed": N, "failed": M}; exit 1 if a step failed.
 */
public final class ConformanceRunner {
    private static final JsonNodeFactory F = JsonNodeFactory.instance;
    private static final ObjectMapper JSON = new ObjectMapper();

    private ConformanceRunner() {}

    /** The outcome of one call: its value, or the Python name of the error it threw. */
    private static JsonNode outcomeOf(Supplier<JsonNode> call) {
        try {
            return call.get();
        } catch (NoRouteException e) {
            return F.textNode("NoRoute");
        } catch (OverloadedException e) {
            return F.textNode("Overloaded");
        } catch (AgentUnavailableException e) {
            return F.textNode("AgentUnavailable");
        } catch (RequestRejectedException e) {
            return F.textNode("RequestRejected");
        } catch (InvalidValueException e) {
            return F.textNode("InvalidValue");
        }
    }

    private static JsonNode sortedHosts(List<Host> hosts) {
        ArrayNode out = F.arrayNode();
        hosts.stream().map(Host::toString).sorted().forEach(out::add);
        return out;
    }

    /** Outcomes are compared as JSON text: Jackson's int and long nodes never compare equal. */
    private static boolean same(JsonNode a, JsonNode b) {
        return a.toString().equals(b.toString());
    }

    /** What is wrong with a step's outcomes (empty: it passed). */
    static List<String> check(JsonNode expect, List<JsonNode> outcomes, double elapsed) {
        List<String> problems = new ArrayList<>();
        if (expect.has("counts")) {
            Map<String, Long> got = new TreeMap<>(), want = new TreeMap<>();
            for (JsonNode o : outcomes) {
                got.merge(o.isTextual() ? o.asText() : o.toString(), 1L, Long::sum);
            }
            expect.get("counts").fields().forEachRemaining(e -> want.put(e.getKey(), e.getValue().asLong()));
            if (!got.equals(want)) {
                problems.add("counts " + got + " != " + want);
            }
        }
        if (expect.has("one_of")) {
            for (JsonNode o : outcomes) {
                boolean found = false;
                for (JsonNode allowed : expect.get("one_of")) {
                    found |= same(o, allowed);
                }
                if (!found) {
                    problems.add("outcome " + o + " is not one of " + expect.get("one_of"));
                }
            }
        }
        if (expect.has("period")) {
            int p = expect.get("period").asInt();
            for (int i = 0; i + p < outcomes.size(); i++) {
                if (!same(outcomes.get(i), outcomes.get(i + p))) {
                    problems.add("not periodic with period " + p + ": outcome " + i + " != " + (i + p));
                    break;
                }
            }
        }
        if (expect.has("spacing")) {
            Iterator<Map.Entry<String, JsonNode>> it = expect.get("spacing").fields();
            while (it.hasNext()) {
                Map.Entry<String, JsonNode> e = it.next();
                List<Integer> where = new ArrayList<>();
                for (int i = 0; i < outcomes.size(); i++) {
                    if (same(outcomes.get(i), F.textNode(e.getKey()))) {
                        where.add(i);
                    }
                }
                boolean ok = where.size() >= 2;
                for (int i = 1; ok && i < where.size(); i++) {
                    ok = where.get(i) - where.get(i - 1) == e.getValue().asInt();
                }
                if (!ok) {
                    problems.add(e.getKey() + " at " + where + ": not every " + e.getValue());
                }
            }
        }
        if (expect.has("hosts")) {
            List<Host> want = new ArrayList<>();
            expect.get("hosts").forEach(h -> want.add(Host.parse(h.asText())));
            JsonNode sorted = sortedHosts(want);
            for (JsonNode o : outcomes) {
                if (!same(o, sorted)) {
                    problems.add("hosts " + o + " != " + sorted);
                }
            }
        }
        if (expect.has("error")) {
            for (JsonNode o : outcomes) {
                if (!same(o, expect.get("error"))) {
                    problems.add(o + " instead of " + expect.get("error"));
                }
            }
        }
        if (expect.has("port_index")) {
            for (JsonNode o : outcomes) {
                if (!same(o, expect.get("port_index"))) {
                    problems.add("port index " + o + " != " + expect.get("port_index"));
                }
            }
        }
        if (expect.has("elapsed")) {
            JsonNode bounds = expect.get("elapsed");
            double low = bounds.has("min") ? bounds.get("min").asDouble() : 0;
            double high = bounds.has("max") ? bounds.get("max").asDouble() : Double.POSITIVE_INFINITY;
            if (elapsed < low || elapsed > high) {
                problems.add(String.format("took %.3fs, not within [%s, %s]", elapsed, low, high));
            }
        }
        return problems;
    }

    static ObjectNode runStep(JsonNode step, Map<String, LarsClient> clients, long offset) {
        String op = step.get("op").asText();
        LarsClient client = clients.get(step.has("agent") ? step.get("agent").asText() : "live");
        long modid = 0, cmdid = 0;
        if (step.has("module")) {
            modid = step.get("module").get(0).asLong();
            cmdid = step.get("module").get(1).asLong();
        }
        if (!op.equals("port")) {
            modid += offset;
        }
        final long m = modid, c = cmdid;
        List<JsonNode> outcomes = new ArrayList<>();
        long began = System.nanoTime();
        int repeat = step.has("repeat") ? step.get("repeat").asInt() : 1;
        for (int i = 0; i < repeat; i++) {
            switch (op) {
                case "get_host" -> outcomes.add(outcomeOf(() -> F.textNode(client.getHost(m, c).toString())));
                case "get_route" -> outcomes.add(outcomeOf(() -> sortedHosts(client.getRoute(m, c))));
                case "reg_init" -> outcomes.add(outcomeOf(() -> sortedHosts(client.regInit(m, c))));
                case "report" -> outcomes.add(outcomeOf(() -> {
                    client.report(m, c, Host.parse(step.get("host").asText()), step.get("retcode").asLong());
                    return F.textNode("ok");
                }));
                case "port" -> outcomes.add(F.numberNode(client.port(m, c) - client.options().basePort()));
                default -> {
                    System.err.println("unknown op " + op + " in step " + step.get("name"));
                    System.exit(2);
                }
            }
        }
        double elapsed = (System.nanoTime() - began) / 1e9;
        List<String> problems = check(step.has("expect") ? step.get("expect") : F.objectNode(), outcomes, elapsed);
        ObjectNode result = F.objectNode();
        result.set("name", step.get("name"));
        result.put("ok", problems.isEmpty());
        result.put("elapsed", Math.round(elapsed * 10000) / 10000.0);
        result.set("outcomes", F.arrayNode().addAll(outcomes));
        ArrayNode problemNodes = result.putArray("problems");
        problems.forEach(problemNodes::add);
        return result;
    }

    private static void usage(String problem) {
        System.err.println("ConformanceRunner: " + problem);
        System.err.println("usage: ConformanceRunner --scenario FILE --base-port N --dead-base-port M [--host H] [--module-offset K]");
        System.exit(2);
    }

    public static void main(String[] args) throws Exception {
        String scenarioPath = null, host = "127.0.0.1";
        int basePort = -1, deadBasePort = -1;
        long offset = 0;
        for (int i = 0; i < args.length; i++) {
            if (i + 1 >= args.length) {
                usage("missing value for " + args[i]);
            }
            String value = args[++i];
            switch (args[i - 1]) {
                case "--scenario" -> scenarioPath = value;
                case "--host" -> host = value;
                case "--base-port" -> basePort = Integer.parseInt(value);
                case "--dead-base-port" -> deadBasePort = Integer.parseInt(value);
                case "--module-offset" -> offset = Long.parseLong(value);
                default -> usage("unknown argument " + args[i - 1]);
            }
        }
        if (scenarioPath == null || basePort < 0 || deadBasePort < 0) {
            usage("--scenario, --base-port and --dead-base-port are required");
        }
        JsonNode scenario = JSON.readTree(new File(scenarioPath));
        JsonNode settings = scenario.get("client");
        Map<String, LarsClient> clients = new TreeMap<>();
        for (Map.Entry<String, Integer> e : Map.of("live", basePort, "dead", deadBasePort).entrySet()) {
            clients.put(e.getKey(), new LarsClient(new LarsClient.Options(
                    host,
                    e.getValue(),
                    settings.get("ports").asInt(),
                    Duration.ofNanos(Math.round(settings.get("timeout").asDouble() * 1e9)),
                    settings.get("retries").asInt())));
        }
        int number = 0, failed = 0;
        for (JsonNode step : scenario.get("steps")) {
            ObjectNode result = runStep(step, clients, offset);
            failed += result.get("ok").asBoolean() ? 0 : 1;
            ObjectNode line = F.objectNode().put("step", ++number);
            line.setAll(result);
            System.out.println(line);
        }
        clients.values().forEach(LarsClient::close);
        System.out.println(F.objectNode().put("passed", number - failed).put("failed", failed));
        System.exit(failed == 0 ? 0 : 1);
    }
}
