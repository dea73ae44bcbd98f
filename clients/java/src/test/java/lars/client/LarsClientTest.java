package lars.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.net.DatagramPacket;
import java.net.DatagramSocket;
import java.net.InetAddress;
import java.net.SocketException;
import java.net.SocketTimeoutException;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.atomic.AtomicInteger;
import org.junit.jupiter.api.Test;
import org.msgpack.core.MessageBufferPacker;
import org.msgpack.core.MessagePack;
import org.msgpack.core.MessageUnpacker;
import org.msgpack.value.Value;

/**
 * LarsClient against a fake agent on loopback: sequence numbers, retries with the same seq,
 * stale replies, timeouts, error mapping, reports, regInit, threads.
 */
class LarsClientTest {
    static final Duration TIMEOUT = Duration.ofMillis(100);
    static final int RETRIES = 2;
    static final long IP1 = 167772161L; // 10.0.0.1

    /** A request as the fake agent saw it: its unsigned integers, flattened, and its bytes. */
    record Request(long[] fields, byte[] bytes) {
        long get(int i) {
            return fields[i];
        }
    }

    interface Handler {
        List<byte[]> handle(Request request, int index) throws IOException;
    }

    /** A UDP server on a kernel-chosen loopback port; the handler's datagrams go back to the sender. */
    static final class FakeAgent implements AutoCloseable {
        final DatagramSocket socket;
        final List<Request> requests = Collections.synchronizedList(new ArrayList<>());
        final Thread thread;
        volatile boolean stop;

        FakeAgent(Handler handler) throws SocketException {
            socket = new DatagramSocket(0, InetAddress.getLoopbackAddress());
            socket.setSoTimeout(20);
            thread = new Thread(() -> {
                byte[] buffer = new byte[65536];
                int index = 0;
                while (!stop) {
                    DatagramPacket packet = new DatagramPacket(buffer, buffer.length);
                    try {
                        socket.receive(packet);
                        byte[] bytes = Arrays.copyOf(buffer, packet.getLength());
                        List<Long> fields = new ArrayList<>();
                        try (MessageUnpacker u = MessagePack.newDefaultUnpacker(bytes)) {
                            flatten(u.unpackValue(), fields);
                        }
                        Request request = new Request(fields.stream().mapToLong(Long::longValue).toArray(), bytes);
                        requests.add(request);
                        for (byte[] reply : handler.handle(request, index++)) {
                            socket.send(new DatagramPacket(reply, reply.length, packet.getSocketAddress()));
                        }
                    } catch (SocketTimeoutException e) {
                        // check stop
                    } catch (IOException e) {
                        if (!stop) {
                            throw new RuntimeException(e);
                        }
                    }
                }
            });
            thread.start();
        }

        int port() {
            return socket.getLocalPort();
        }

        LarsClient.Options options(Duration timeout) {
            return LarsClient.Options.defaults().withBasePort(port()).withPorts(1).withTimeout(timeout).withRetries(RETRIES);
        }

        LarsClient.Options options() {
            return options(TIMEOUT);
        }

        boolean waitFor(int count) throws InterruptedException {
            for (int i = 0; i < 200 && requests.size() < count; i++) {
                Thread.sleep(5);
            }
            return requests.size() >= count;
        }

        @Override
        public void close() {
            stop = true;
            try {
                thread.join();
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
            socket.close();
        }
    }

    static void flatten(Value v, List<Long> out) {
        if (v.isArrayValue()) {
            v.asArrayValue().forEach(x -> flatten(x, out));
        } else if (v.isIntegerValue()) {
            out.add(v.asIntegerValue().toLong());
        }
    }

    static byte[] getHostResponse(long seq, long modid, long cmdid, int retcode, long ip, int port) throws IOException {
        try (MessageBufferPacker p = MessagePack.newDefaultBufferPacker()) {
            p.packArrayHeader(6).packInt(5).packLong(seq).packLong(modid).packLong(cmdid).packInt(retcode);
            if (port > 0) {
                p.packArrayHeader(2).packLong(ip).packInt(port);
            } else {
                p.packNil();
            }
            return p.toByteArray();
        }
    }

    static byte[] routeResponse(long seq, int retcode, long[][] hosts) throws IOException {
        try (MessageBufferPacker p = MessagePack.newDefaultBufferPacker()) {
            p.packArrayHeader(6).packInt(8).packLong(seq).packLong(1).packLong(1).packInt(retcode);
            p.packArrayHeader(hosts.length);
            for (long[] h : hosts) {
                p.packArrayHeader(2).packLong(h[0]).packLong(h[1]);
            }
            return p.toByteArray();
        }
    }

    static byte[] errorReply(long seq, int code, String reason) throws IOException {
        try (MessageBufferPacker p = MessagePack.newDefaultBufferPacker()) {
            p.packArrayHeader(4).packInt(9).packLong(seq).packInt(code).packString(reason);
            return p.toByteArray();
        }
    }

    static Handler answerWith(int retcode) {
        return (r, i) -> {
            if (r.get(0) == 4) {
                return List.of(getHostResponse(r.get(1), r.get(2), r.get(3), retcode, IP1, retcode == 0 ? 7001 : 0));
            }
            if (r.get(0) == 7) {
                long[][] hosts = retcode == 0 ? new long[][] {{IP1, 7001}, {IP1 + 1, 7002}} : new long[0][];
                return List.of(routeResponse(r.get(1), retcode, hosts));
            }
            return List.of();
        };
    }

    static Handler silent() {
        return (r, i) -> List.of();
    }

    /** A loopback UDP port that nothing listens on (bound, then closed). */
    static int deadPort() throws SocketException {
        try (DatagramSocket s = new DatagramSocket(0, InetAddress.getLoopbackAddress())) {
            return s.getLocalPort();
        }
    }

    static double secondsSince(long start) {
        return (System.nanoTime() - start) / 1e9;
    }

    @Test
    void getHostReturnsTheAgentsHost() throws Exception {
        try (FakeAgent agent = new FakeAgent(answerWith(0)); LarsClient client = new LarsClient(agent.options())) {
            assertEquals(new Host("10.0.0.1", 7001), client.getHost(1, 2));
            Request r = agent.requests.get(0);
            assertArrayEquals(new long[] {4, r.get(1), 1, 2}, r.fields());
        }
    }

    @Test
    void sequenceNumbersStartFromThePidAndGrow() throws Exception {
        try (FakeAgent agent = new FakeAgent(answerWith(0)); LarsClient client = new LarsClient(agent.options())) {
            client.getHost(1, 1);
            client.getRoute(1, 1);
            client.getHost(1, 1);
            long first = agent.requests.get(0).get(1);
            assertEquals(ProcessHandle.current().pid() & 0xFFFF, first);
            assertEquals(first + 1, agent.requests.get(1).get(1));
            assertEquals(first + 2, agent.requests.get(2).get(1));
        }
    }

    @Test
    void staleRepliesAndGarbageAreDiscarded() throws Exception {
        Handler handler = (r, i) -> List.of(
                getHostResponse(r.get(1) - 1, 1, 1, 0, IP1 + 9, 9),
                new byte[] {(byte) 0xc1},
                new byte[] {(byte) 0x93, 0x05},
                errorReply(r.get(1) + 1, 4, "not yours"),
                getHostResponse(r.get(1), 1, 1, 0, IP1, 7001));
        try (FakeAgent agent = new FakeAgent(handler); LarsClient client = new LarsClient(agent.options())) {
            assertEquals(new Host("10.0.0.1", 7001), client.getHost(1, 1));
            assertEquals(1, agent.requests.size());
        }
    }

    @Test
    void aLostRequestIsResentWithTheSameSeq() throws Exception {
        Handler handler = (r, i) -> i < 2 ? List.of() : List.of(getHostResponse(r.get(1), 1, 1, 0, IP1, 7001));
        try (FakeAgent agent = new FakeAgent(handler); LarsClient client = new LarsClient(agent.options())) {
            long start = System.nanoTime();
            assertEquals(new Host("10.0.0.1", 7001), client.getHost(1, 1));
            double took = secondsSince(start);
            assertTrue(took >= 0.19 && took < 0.4, "took " + took);
            assertEquals(3, agent.requests.size());
            assertArrayEquals(agent.requests.get(0).bytes(), agent.requests.get(2).bytes());
        }
    }

    @Test
    void noAnswerIsAgentUnavailableAfterTimeoutTimesAttempts() throws Exception {
        try (FakeAgent agent = new FakeAgent(silent()); LarsClient client = new LarsClient(agent.options())) {
            long start = System.nanoTime();
            assertThrows(AgentUnavailableException.class, () -> client.getHost(1, 1));
            double took = secondsSince(start);
            assertTrue(took >= 0.29 && took < 0.5, "took " + took);
            assertEquals(3, agent.requests.size());
        }
    }

    @Test
    void aClosedPortIsAgentUnavailableAfterTheSameTime() throws Exception {
        LarsClient.Options options = LarsClient.Options.defaults().withBasePort(deadPort()).withPorts(1)
                .withTimeout(TIMEOUT).withRetries(RETRIES);
        try (LarsClient client = new LarsClient(options)) {
            long start = System.nanoTime();
            AgentUnavailableException e = assertThrows(AgentUnavailableException.class, () -> client.getHost(1, 1));
            double took = secondsSince(start);
            assertTrue(took >= 0.29 && took < 0.5, "took " + took);
            assertTrue(e.getMessage().contains("after 3 attempts of 0.1s"), e.getMessage());
        }
    }

    @Test
    void retcodesBecomeTypedExceptions() throws Exception {
        try (FakeAgent agent = new FakeAgent(answerWith(RetCode.NOEXIST)); LarsClient client = new LarsClient(agent.options())) {
            assertThrows(NoRouteException.class, () -> client.getHost(1, 1));
            assertThrows(NoRouteException.class, () -> client.getRoute(1, 1));
            assertFalse(client.tryGetHost(1, 1).isPresent());
        }
        try (FakeAgent agent = new FakeAgent(answerWith(RetCode.OVERLOAD)); LarsClient client = new LarsClient(agent.options())) {
            assertThrows(OverloadedException.class, () -> client.getHost(1, 1));
            assertFalse(client.tryGetHost(1, 1).isPresent());
        }
        try (FakeAgent agent = new FakeAgent(answerWith(RetCode.SYSTEM_ERROR)); LarsClient client = new LarsClient(agent.options())) {
            assertThrows(RequestRejectedException.class, () -> client.getHost(1, 1));
            assertThrows(RequestRejectedException.class, () -> client.tryGetHost(1, 1));
        }
        Handler rejecting = (r, i) -> List.of(errorReply(r.get(1), 4, "modid out of range"));
        try (FakeAgent agent = new FakeAgent(rejecting); LarsClient client = new LarsClient(agent.options())) {
            RequestRejectedException e = assertThrows(RequestRejectedException.class, () -> client.getHost(1, 1));
            assertEquals(4, e.code());
            assertTrue(e.getMessage().contains("modid out of range"));
            assertThrows(LarsException.class, () -> client.getRoute(1, 1)); // the root catches all
        }
    }

    @Test
    void getRouteReturnsEveryHost() throws Exception {
        try (FakeAgent agent = new FakeAgent(answerWith(0)); LarsClient client = new LarsClient(agent.options())) {
            assertEquals(List.of(new Host("10.0.0.1", 7001), new Host("10.0.0.2", 7002)), client.getRoute(3, 4));
            assertEquals(7, agent.requests.get(0).get(0));
        }
    }

    @Test
    void reportSendsOneDatagramWithTheRetcode() throws Exception {
        try (FakeAgent agent = new FakeAgent(silent()); LarsClient client = new LarsClient(agent.options())) {
            client.report(1, 2, new Host("10.0.0.1", 7001), true);
            client.report(1, 2, new Host("10.0.0.1", 7001), false);
            client.report(4294967295L, 2, new Host("255.255.255.255", 65535), 4294967295L);
            assertTrue(agent.waitFor(3));
            assertArrayEquals(new long[] {6, 1, 2, IP1, 7001, 0}, agent.requests.get(0).fields());
            assertArrayEquals(new long[] {6, 1, 2, IP1, 7001, 1}, agent.requests.get(1).fields());
            assertArrayEquals(new long[] {6, 4294967295L, 2, 4294967295L, 65535, 4294967295L}, agent.requests.get(2).fields());
            assertThrows(InvalidValueException.class, () -> client.report(1, 1, new Host("10.0.0", 1), 0));
            assertThrows(InvalidValueException.class, () -> client.report(1, 1, new Host("10.0.0.1", 0), 0));
            assertThrows(InvalidValueException.class, () -> client.report(-1, 1, new Host("10.0.0.1", 1), 0));
            assertThrows(InvalidValueException.class, () -> client.getHost(1L << 32, 1));
        }
    }

    @Test
    void reportWithoutAnAgentIsSilentAndQuick() throws Exception {
        try (LarsClient client = new LarsClient(LarsClient.Options.defaults().withBasePort(deadPort()).withPorts(1))) {
            client.report(1, 1, new Host("10.0.0.1", 7001), true); // warm up the JIT
            long start = System.nanoTime();
            for (int i = 0; i < 5; i++) {
                client.report(1, 1, new Host("10.0.0.1", 7001), 1);
            }
            assertTrue(secondsSince(start) < 0.05);
        }
    }

    @Test
    void regInitRetriesWhileNoRoute() throws Exception {
        Handler handler = (r, i) -> List.of(routeResponse(
                r.get(1), i < 2 ? RetCode.NOEXIST : 0, i < 2 ? new long[0][] : new long[][] {{IP1, 7001}}));
        try (FakeAgent agent = new FakeAgent(handler); LarsClient client = new LarsClient(agent.options())) {
            long start = System.nanoTime();
            assertEquals(1, client.regInit(1, 1).size());
            assertTrue(secondsSince(start) >= 0.39);
            assertEquals(3, agent.requests.size());
        }
    }

    @Test
    void regInitGivesUpOnNoRouteAfterItsAttempts() throws Exception {
        try (FakeAgent agent = new FakeAgent(answerWith(RetCode.NOEXIST)); LarsClient client = new LarsClient(agent.options())) {
            assertThrows(NoRouteException.class, () -> client.regInit(1, 1));
            assertEquals(LarsClient.REG_INIT_ATTEMPTS, agent.requests.size());
        }
    }

    @Test
    void regInitDoesNotRetryAMissingAgent() throws Exception {
        try (FakeAgent agent = new FakeAgent(silent()); LarsClient client = new LarsClient(agent.options())) {
            assertThrows(AgentUnavailableException.class, () -> client.regInit(1, 1));
            assertEquals(RETRIES + 1, agent.requests.size());
        }
    }

    @Test
    void callReportsSuccessOrFailure() throws Exception {
        try (FakeAgent agent = new FakeAgent(answerWith(0)); LarsClient client = new LarsClient(agent.options())) {
            assertEquals(7001, client.call(1, 1, Host::port));
            assertThrows(IllegalStateException.class, () -> client.call(1, 1, h -> {
                throw new IllegalStateException("x");
            }));
            assertTrue(agent.waitFor(4));
            assertEquals(6, agent.requests.get(1).get(0));
            assertEquals(0, agent.requests.get(1).get(5));
            assertEquals(1, agent.requests.get(3).get(5));
        }
    }

    @Test
    void threadsShareAClientWithoutCrossingReplies() throws Exception {
        // The agent answers module m with host ip m: each thread must only ever see its own.
        Handler handler = (r, i) -> r.get(0) == 4 ? List.of(getHostResponse(r.get(1), r.get(2), 1, 0, r.get(2), 80)) : List.of();
        try (FakeAgent agent = new FakeAgent(handler);
                LarsClient client = new LarsClient(agent.options(Duration.ofSeconds(1)))) {
            AtomicInteger wrong = new AtomicInteger(), done = new AtomicInteger();
            List<Thread> threads = new ArrayList<>();
            for (int t = 1; t <= 8; t++) {
                final long modid = t;
                Thread thread = new Thread(() -> {
                    for (int i = 0; i < 200; i++) {
                        Host host = client.getHost(modid, 1);
                        if (!host.ip().equals(Wire.formatIp(modid))) {
                            wrong.incrementAndGet();
                        }
                        client.report(modid, 1, host, true);
                        done.incrementAndGet();
                    }
                });
                threads.add(thread);
                thread.start();
            }
            for (Thread thread : threads) {
                thread.join();
            }
            assertEquals(0, wrong.get());
            assertEquals(1600, done.get());
        }
    }

    @Test
    void badOptionsAreRefused() {
        LarsClient.Options d = LarsClient.Options.defaults();
        assertThrows(InvalidValueException.class, () -> new LarsClient(d.withPorts(0)));
        assertThrows(InvalidValueException.class, () -> new LarsClient(d.withBasePort(65534)));
        assertThrows(InvalidValueException.class, () -> new LarsClient(d.withTimeout(Duration.ZERO)));
        assertThrows(InvalidValueException.class, () -> new LarsClient(d.withRetries(-1)));
    }

    @Test
    void aClosedClientRefusesCalls() throws Exception {
        try (FakeAgent agent = new FakeAgent(answerWith(0))) {
            LarsClient client = new LarsClient(agent.options());
            client.getHost(1, 1);
            client.close();
            assertThrows(IllegalStateException.class, () -> client.getHost(1, 1));
        }
    }
}
