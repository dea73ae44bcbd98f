package lars.client;

import java.io.IOException;
import java.net.DatagramPacket;
import java.net.DatagramSocket;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.PortUnreachableException;
import java.net.SocketTimeoutException;
import java.net.UnknownHostException;
import java.time.Duration;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.List;
import java.util.Optional;
import java.util.concurrent.atomic.AtomicInteger;

/**
 * Ask the local Lars agent for hosts and report call results.
 *
 * <pre>{@code
 * try (LarsClient client = new LarsClient()) {          // agent on 127.0.0.1, ports 8888-8890
 *     Host host = client.getHost(1, 1);                  // NoRouteException, OverloadedException...
 *     client.report(1, 1, host, true);                   // or a retcode: 0 success, else failure
 *     List<Host> all = client.getRoute(1, 1);
 *     client.regInit(1, 1);                              // preload a module at start-up
 *     client.tryGetHost(1, 1).ifPresent(h -> ...);       // empty: no route or overloaded
 *     client.call(1, 1, h -> ...);                       // reports ok, or failed if it throws
 * }
 * }</pre>
 *
 * <p>The behaviour is the Python client's ({@code lars/client.py}, DESIGN.md §8): the module is
 * served on {@code basePort + (modid + cmdid) % ports}; each request carries a fresh sequence
 * number and every attempt waits {@code timeout} for the reply to that number (replies to earlier
 * requests are discarded); {@code retries} more attempts resend the same request with the same
 * number; no reply at all is {@link AgentUnavailableException} after timeout x (retries + 1). A
 * report is one datagram, best effort: no agent, no report, no error.
 *
 * <p>Thread safety: a client may be shared by any number of threads. Each call borrows a UDP
 * socket for its port from a pool and has it to itself until it returns, so concurrent calls
 * never read each other's replies; the pool grows to the number of calls in flight at once. One
 * thread alone uses one socket per port. {@link #close()} is final: later calls throw
 * IllegalStateException.
 *
 * <p>Ids are unsigned 32-bit integers carried in {@code long}s; a value outside 0..2^32-1 is an
 * {@link InvalidValueException}.
 */
public final class LarsClient implements AutoCloseable {
    /** reg_init: attempts while the agent answers NoRoute, and the pause between them. */
    public static final int REG_INIT_ATTEMPTS = 10;
    public static final Duration REG_INIT_PAUSE = Duration.ofMillis(200);

    /** Where the agent is and how long to wait for it (lars.toml's [agent] and [client] defaults). */
    public record Options(String host, int basePort, int ports, Duration timeout, int retries) {
        /** 127.0.0.1, ports 8888-8890, 250 ms per attempt, 2 retries. */
        public static Options defaults() {
            return new Options("127.0.0.1", 8888, 3, Duration.ofMillis(250), 2);
        }

        public Options withHost(String value) {
            return new Options(value, basePort, ports, timeout, retries);
        }

        public Options withBasePort(int value) {
            return new Options(host, value, ports, timeout, retries);
        }

        public Options withPorts(int value) {
            return new Options(host, basePort, value, timeout, retries);
        }

        public Options withTimeout(Duration value) {
            return new Options(host, basePort, ports, value, retries);
        }

        public Options withRetries(int value) {
            return new Options(host, basePort, ports, timeout, value);
        }
    }

    /** A call made with a host, for {@link #call}. */
    @FunctionalInterface
    public interface HostCall<T> {
        T apply(Host host) throws Exception;
    }

    private final Options options;
    private final InetAddress address;
    private final long timeoutNanos;
    private final AtomicInteger seq;
    private final List<ArrayDeque<Channel>> idle; // by port index; guarded by itself
    private final List<Channel> all = new ArrayList<>(); // guarded by itself
    private volatile boolean closed;

    /** A client of the agent on 127.0.0.1, ports 8888-8890, with the default timeout and retries. */
    public LarsClient() {
        this(Options.defaults());
    }

    /** A client of the agent described by options; throws InvalidValueException for bad ones. */
    public LarsClient(Options options) {
        if (options.ports() < 1 || options.basePort() < 1 || options.basePort() + options.ports() - 1L > 65535) {
            throw new InvalidValueException(
                    "bad agent ports: base_port=" + options.basePort() + " ports=" + options.ports());
        }
        if (options.timeout().isNegative() || options.timeout().isZero() || options.retries() < 0) {
            throw new InvalidValueException("timeout must be > 0 and retries >= 0");
        }
        try {
            this.address = InetAddress.getByName(options.host());
        } catch (UnknownHostException e) {
            throw new InvalidValueException("cannot resolve the agent host " + options.host());
        }
        this.options = options;
        this.timeoutNanos = options.timeout().toNanos();
        this.seq = new AtomicInteger((int) (ProcessHandle.current().pid() & 0xFFFF));
        this.idle = new ArrayList<>();
        for (int i = 0; i < options.ports(); i++) {
            idle.add(new ArrayDeque<>());
        }
    }

    public Options options() {
        return options;
    }

    /** The agent port that serves the module. */
    public int port(long modid, long cmdid) {
        return Wire.portFor(options.basePort(), options.ports(), modid, cmdid);
    }

    // --- the API -------------------------------------------------------------------------------

    /** One healthy host of the module. */
    public Host getHost(long modid, long cmdid) {
        checkModule(modid, cmdid);
        long s = nextSeq();
        Wire.Reply reply = exchange(modid, cmdid, s, Wire.encodeGetHostRequest(s, modid, cmdid));
        return hostResult(reply, modid, cmdid);
    }

    /** getHost, empty instead of NoRoute or Overloaded ("no host this time"); other errors are thrown. */
    public Optional<Host> tryGetHost(long modid, long cmdid) {
        try {
            return Optional.of(getHost(modid, cmdid));
        } catch (NoRouteException | OverloadedException e) {
            return Optional.empty();
        }
    }

    /** Every host of the module (NoRouteException if it has none). */
    public List<Host> getRoute(long modid, long cmdid) {
        checkModule(modid, cmdid);
        long s = nextSeq();
        Wire.Reply reply = exchange(modid, cmdid, s, Wire.encodeGetRouteRequest(s, modid, cmdid));
        return routeResult(reply, modid, cmdid);
    }

    /**
     * Preload a module at start-up: getRoute, retried while the agent answers NoRoute (its DNS may
     * not have answered yet), {@link #REG_INIT_ATTEMPTS} times {@link #REG_INIT_PAUSE} apart. No
     * answer at all is AgentUnavailableException at once.
     */
    public List<Host> regInit(long modid, long cmdid) {
        for (int attempt = 1; ; attempt++) {
            try {
                return getRoute(modid, cmdid);
            } catch (NoRouteException e) {
                if (attempt == REG_INIT_ATTEMPTS) {
                    throw e;
                }
            }
            sleepNanos(REG_INIT_PAUSE.toNanos());
        }
    }

    /** Report how a call to host ended: ok, or failed. */
    public void report(long modid, long cmdid, Host host, boolean ok) {
        report(modid, cmdid, host, ok ? 0L : 1L);
    }

    /**
     * Report how a call to host ended: retcode 0 is a success, anything else a failure. Best
     * effort: never waits, never fails for want of an agent. InvalidValueException if host.ip is
     * not dotted IPv4 text, the port is not 1-65535 or an id or the retcode is not 0..2^32-1.
     */
    public void report(long modid, long cmdid, Host host, long retcode) {
        checkModule(modid, cmdid);
        Wire.checkId(retcode, "retcode");
        long ip = Wire.parseIp(host.ip());
        if (ip < 0) {
            throw new InvalidValueException("not an IPv4 address: '" + host.ip() + "'");
        }
        if (host.port() < 1 || host.port() > 65535) {
            throw new InvalidValueException("port must be from 1 to 65535, got " + host.port());
        }
        byte[] request = Wire.encodeReportRequest(modid, cmdid, ip, host.port(), retcode);
        int agentPort = port(modid, cmdid);
        Channel channel;
        try {
            channel = take(agentPort);
        } catch (AgentUnavailableException e) {
            return; // no socket to send it from: no report
        }
        try {
            channel.socket.send(new DatagramPacket(request, request.length));
        } catch (IOException e) {
            // Best effort, like the original's: an error (no agent) loses this report only.
        } finally {
            giveBack(agentPort, channel);
        }
    }

    /**
     * Get a host, run fn with it, report ok when it returns and failed when it throws (then
     * rethrow). Returns what fn returns.
     */
    public <T> T call(long modid, long cmdid, HostCall<T> fn) throws Exception {
        Host host = getHost(modid, cmdid);
        T result;
        try {
            result = fn.apply(host);
        } catch (Exception | Error e) {
            report(modid, cmdid, host, false);
            throw e;
        }
        report(modid, cmdid, host, true);
        return result;
    }

    /** Close every socket. Final: later calls throw IllegalStateException. */
    @Override
    public void close() {
        List<Channel> sockets;
        synchronized (all) {
            closed = true;
            sockets = new ArrayList<>(all);
            all.clear();
        }
        for (Channel c : sockets) {
            c.socket.close();
        }
    }

    // --- the protocol logic without I/O (as ClientCore) --------------------------------------------

    /** The host of a reply to getHost, or the error it stands for. */
    static Host hostResult(Wire.Reply reply, long modid, long cmdid) {
        if (reply instanceof Wire.GetHostResponse r) {
            if (r.retcode() == RetCode.SUCC && r.host() != null) {
                return new Host(Wire.formatIp(r.host().ip()), r.host().port());
            }
            throw errorFor(r.retcode(), modid, cmdid);
        }
        throw unexpected(reply);
    }

    /** The hosts of a reply to getRoute, or the error it stands for. */
    static List<Host> routeResult(Wire.Reply reply, long modid, long cmdid) {
        if (reply instanceof Wire.GetRouteResponse r) {
            if (r.retcode() == RetCode.SUCC) {
                List<Host> hosts = new ArrayList<>(r.hosts().size());
                for (Wire.HostKey key : r.hosts()) {
                    hosts.add(new Host(Wire.formatIp(key.ip()), key.port()));
                }
                return hosts;
            }
            throw errorFor(r.retcode(), modid, cmdid);
        }
        throw unexpected(reply);
    }

    private static LarsException errorFor(int retcode, long modid, long cmdid) {
        if (retcode == RetCode.NOEXIST) {
            return new NoRouteException("no route for module " + modid + "/" + cmdid);
        }
        if (retcode == RetCode.OVERLOAD) {
            return new OverloadedException("every host of module " + modid + "/" + cmdid + " is overloaded");
        }
        return new RequestRejectedException(
                "agent answered " + RetCode.name(retcode),
                retcode == RetCode.SUCC ? RetCode.SYSTEM_ERROR : retcode);
    }

    private static LarsException unexpected(Wire.Reply reply) {
        if (reply instanceof Wire.ErrorReply e) {
            return new RequestRejectedException(
                    "agent rejected the request: " + e.reason(),
                    e.code() == RetCode.SUCC ? RetCode.SYSTEM_ERROR : e.code());
        }
        String type = reply instanceof Wire.OtherReply o ? "message type " + o.type() : reply.getClass().getSimpleName();
        return new RequestRejectedException("unexpected reply from the agent: " + type, RetCode.SYSTEM_ERROR);
    }

    private static void checkModule(long modid, long cmdid) {
        Wire.checkId(modid, "modid");
        Wire.checkId(cmdid, "cmdid");
    }

    private long nextSeq() {
        return seq.getAndIncrement() & Wire.U32_MAX;
    }

    // --- sockets ---------------------------------------------------------------------------------

    /** One connected UDP socket to one agent port, used by one call at a time. */
    private static final class Channel {
        final DatagramSocket socket;
        final byte[] buffer = new byte[Wire.RECEIVE_SIZE];
        final DatagramPacket packet = new DatagramPacket(buffer, buffer.length);
        int soTimeoutMillis;

        Channel(DatagramSocket socket) {
            this.socket = socket;
        }

        void setTimeout(int millis) throws IOException {
            if (millis != soTimeoutMillis) {
                socket.setSoTimeout(millis);
                soTimeoutMillis = millis;
            }
        }
    }

    private Channel take(int port) {
        if (closed) {
            throw new IllegalStateException("the LarsClient was closed");
        }
        ArrayDeque<Channel> pool = idle.get(port - options.basePort());
        synchronized (pool) {
            Channel channel = pool.pollLast();
            if (channel != null) {
                return channel;
            }
        }
        try {
            DatagramSocket socket = new DatagramSocket();
            socket.connect(new InetSocketAddress(address, port));
            Channel channel = new Channel(socket);
            synchronized (all) {
                if (closed) {
                    socket.close();
                    throw new IllegalStateException("the LarsClient was closed");
                }
                all.add(channel);
            }
            return channel;
        } catch (IOException e) {
            throw new AgentUnavailableException(
                    "cannot reach the agent at " + options.host() + ":" + port + ": " + e.getMessage());
        }
    }

    private void giveBack(int port, Channel channel) {
        if (closed) {
            channel.socket.close();
            return;
        }
        ArrayDeque<Channel> pool = idle.get(port - options.basePort());
        synchronized (pool) {
            pool.addLast(channel);
        }
    }

    private Wire.Reply exchange(long modid, long cmdid, long s, byte[] request) {
        int agentPort = port(modid, cmdid);
        Channel channel = take(agentPort);
        try {
            DatagramPacket out = new DatagramPacket(request, request.length);
            for (int attempt = 0; attempt <= options.retries(); attempt++) {
                long deadline = System.nanoTime() + timeoutNanos;
                boolean refused = false;
                try {
                    channel.socket.send(out);
                } catch (IOException e) {
                    // PortUnreachable: an earlier datagram met a closed port. Anything else:
                    // the attempt is lost, as a lost datagram would be.
                    refused = true;
                }
                while (!refused) {
                    long remaining = deadline - System.nanoTime();
                    if (remaining <= 0) {
                        break;
                    }
                    try {
                        channel.setTimeout((int) Math.max(1, (remaining + 999_999) / 1_000_000));
                        channel.packet.setData(channel.buffer);
                        channel.socket.receive(channel.packet);
                    } catch (SocketTimeoutException e) {
                        break;
                    } catch (PortUnreachableException e) {
                        refused = true; // nothing listens on the port (yet)
                        break;
                    } catch (IOException e) {
                        if (closed) {
                            throw new IllegalStateException("the LarsClient was closed");
                        }
                        refused = true;
                        break;
                    }
                    Wire.Reply reply = Wire.decodeReply(channel.buffer, 0, channel.packet.getLength());
                    if (reply != null && reply.seq() == s) {
                        return reply;
                    }
                    // garbage, or a late reply to an earlier request: keep waiting
                }
                if (refused) {
                    sleepNanos(deadline - System.nanoTime()); // wait the attempt out, then resend
                }
            }
        } finally {
            giveBack(agentPort, channel);
        }
        throw new AgentUnavailableException(
                "no answer from the agent at " + options.host() + ":" + agentPort + " after "
                        + (options.retries() + 1) + " attempts of " + seconds(options.timeout()) + "s");
    }

    private static String seconds(Duration d) {
        return java.math.BigDecimal.valueOf(d.toNanos(), 9).stripTrailingZeros().toPlainString();
    }

    private static void sleepNanos(long nanos) {
        if (nanos <= 0) {
            return;
        }
        try {
            Thread.sleep(nanos / 1_000_000, (int) (nanos % 1_000_000));
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new AgentUnavailableException("interrupted while waiting for the agent");
        }
    }
}
