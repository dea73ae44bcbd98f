package lars.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.JsonNodeFactory;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.File;
import java.io.IOException;
import java.util.HexFormat;
import java.util.function.Supplier;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/**
 * The codec against clients/conformance/wire_fixtures.json: bytes and readings produced by the
 * Python codec and client (python -m tests.wire_fixtures). The file is named by the system
 * property lars.fixtures.
 */
class WireFixturesTest {
    private static JsonNode fixtures;
    private static final JsonNodeFactory F = JsonNodeFactory.instance;
    private static final HexFormat HEX = HexFormat.of();

    @BeforeAll
    static void load() throws IOException {
        String path = System.getProperty("lars.fixtures", "../conformance/wire_fixtures.json");
        fixtures = new ObjectMapper().readTree(new File(path));
    }

    @Test
    void encodesGetHostRequestsAsPythonDoes() {
        for (JsonNode c : fixtures.at("/encode/get_host_request")) {
            byte[] got = Wire.encodeGetHostRequest(c.get("seq").asLong(), c.get("modid").asLong(), c.get("cmdid").asLong());
            assertEquals(c.get("hex").asText(), HEX.formatHex(got), c.toString());
        }
    }

    @Test
    void encodesGetRouteRequestsAsPythonDoes() {
        for (JsonNode c : fixtures.at("/encode/get_route_request")) {
            byte[] got = Wire.encodeGetRouteRequest(c.get("seq").asLong(), c.get("modid").asLong(), c.get("cmdid").asLong());
            assertEquals(c.get("hex").asText(), HEX.formatHex(got), c.toString());
        }
    }

    @Test
    void encodesReportsAsPythonDoes() {
        for (JsonNode c : fixtures.at("/encode/report_request")) {
            long ip = Wire.parseIp(c.get("ip").asText());
            byte[] got = Wire.encodeReportRequest(
                    c.get("modid").asLong(), c.get("cmdid").asLong(), ip, c.get("port").asInt(), c.get("retcode").asLong());
            assertEquals(c.get("hex").asText(), HEX.formatHex(got), c.toString());
        }
    }

    private static ArrayNode hostKey(Wire.HostKey h) {
        return F.arrayNode().add(h.ip()).add(h.port());
    }

    private static JsonNode replyJson(Wire.Reply reply) {
        ObjectNode o = F.objectNode();
        if (reply instanceof Wire.GetHostResponse r) {
            o.put("type", 5).put("seq", r.seq()).put("modid", r.modid()).put("cmdid", r.cmdid()).put("retcode", r.retcode());
            o.set("host", r.host() == null ? F.nullNode() : hostKey(r.host()));
        } else if (reply instanceof Wire.GetRouteResponse r) {
            o.put("type", 8).put("seq", r.seq()).put("modid", r.modid()).put("cmdid", r.cmdid()).put("retcode", r.retcode());
            ArrayNode hosts = o.putArray("hosts");
            r.hosts().forEach(h -> hosts.add(hostKey(h)));
        } else if (reply instanceof Wire.ErrorReply r) {
            o.put("type", 9).put("seq", Long.toUnsignedString(r.seq())).put("code", r.code()).put("reason", r.reason());
        } else if (reply instanceof Wire.OtherReply r) {
            o.put("type", r.type()).put("seq", Long.toUnsignedString(r.seq()));
        }
        return o;
    }

    /**
     * The fixture's reply with an ErrorReply's seq as text (64 bits do not fit a signed long).
     * Replies are compared as JSON text: Jackson's int and long nodes never compare equal.
     */
    private static JsonNode normalised(JsonNode reply) {
        if (reply.isNull()) {
            return reply;
        }
        ObjectNode copy = reply.deepCopy();
        if (reply.get("type").asInt() != 5 && reply.get("type").asInt() != 8) {
            copy.put("seq", reply.get("seq").bigIntegerValue().toString());
        }
        return copy;
    }

    private static JsonNode outcome(Supplier<JsonNode> call) {
        try {
            return call.get();
        } catch (LarsException e) {
            return F.objectNode().put("error", e.getClass().getSimpleName().replaceAll("Exception$", ""));
        }
    }

    @Test
    void readsRepliesAsPythonDoes() {
        int cases = 0;
        for (JsonNode c : fixtures.get("decode")) {
            cases++;
            String name = c.get("name").asText();
            Wire.Reply reply = Wire.decodeReply(HEX.parseHex(c.get("hex").asText()));
            JsonNode got = reply == null ? F.nullNode() : replyJson(reply);
            assertEquals(normalised(c.get("reply")).toString(), got.toString(), name);
            if (reply == null) {
                continue;
            }
            JsonNode host = outcome(() -> F.objectNode().put("host", LarsClient.hostResult(reply, 1, 1).toString()));
            assertEquals(c.get("get_host").toString(), host.toString(), name);
            JsonNode route = outcome(() -> {
                ArrayNode hosts = F.arrayNode();
                LarsClient.routeResult(reply, 1, 1).forEach(h -> hosts.add(h.toString()));
                ObjectNode o = F.objectNode();
                o.set("hosts", hosts);
                return o;
            });
            assertEquals(c.get("get_route").toString(), route.toString(), name);
        }
        assertTrue(cases > 40);
    }

    @Test
    void parsesIpTextAsPythonDoes() {
        for (JsonNode c : fixtures.get("ip")) {
            long want = c.get("int").isNull() ? -1 : c.get("int").asLong();
            assertEquals(want, Wire.parseIp(c.get("text").asText()), c.toString());
        }
        assertEquals("10.0.0.1", Wire.formatIp(167772161L));
        assertEquals("255.255.255.255", Wire.formatIp(4294967295L));
    }

    @Test
    void computesPortsAsPythonDoes() {
        for (JsonNode c : fixtures.get("port")) {
            int base = c.get("base_port").asInt(), ports = c.get("ports").asInt();
            long modid = c.get("modid").asLong(), cmdid = c.get("cmdid").asLong();
            assertEquals(c.get("port").asInt(), Wire.portFor(base, ports, modid, cmdid), c.toString());
            try (LarsClient client = new LarsClient(LarsClient.Options.defaults().withBasePort(base).withPorts(ports))) {
                assertEquals(c.get("port").asInt(), client.port(modid, cmdid), c.toString());
            }
        }
    }

    @Test
    void parsesHostText() {
        assertEquals(new Host("10.0.0.1", 7001), Host.parse("10.0.0.1:7001"));
        assertEquals("1.2.3.4:65535", Host.parse("1.2.3.4:65535").toString());
        for (String bad : new String[] {"10.0.0.1", "10.0.0.1:0", "10.0.0.1:65536", "10.0.0:80", "10.0.0.1:8x"}) {
            assertThrows(InvalidValueException.class, () -> Host.parse(bad), bad);
        }
    }
}
