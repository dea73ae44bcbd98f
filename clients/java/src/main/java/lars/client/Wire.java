package lars.client;

import java.io.IOException;
import java.math.BigInteger;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import org.msgpack.core.MessageBufferPacker;
import org.msgpack.core.MessageFormat;
import org.msgpack.core.MessagePack;
import org.msgpack.core.MessageUnpacker;
import org.msgpack.value.ValueType;

/**
 * The Lars client protocol without I/O: bytes out for requests, replies in from bytes.
 *
 * <p>The reference is the Python codec, {@code lars/wire.py} (DESIGN.md §4): every message is one
 * msgpack array whose first element is the message type id, then the fields in order; a UDP
 * datagram carries exactly one. Hosts travel as {@code [ip, port]}, ip the IPv4 address as an
 * unsigned 32-bit integer in host order.
 *
 * <pre>
 *   [4, seq, modid, cmdid]                            GetHostRequest
 *   [5, seq, modid, cmdid, retcode, host-or-nil]      GetHostResponse
 *   [6, modid, cmdid, [ip, port], retcode]            ReportRequest
 *   [7, seq, modid, cmdid]                            ApiGetRouteRequest
 *   [8, seq, modid, cmdid, retcode, [[ip, port]...]]  ApiGetRouteResponse
 *   [9, seq, code, reason]                            ErrorReply
 * </pre>
 *
 * <p>{@link #decodeReply} accepts exactly what the Python client accepts and discards the rest
 * ({@code clients/conformance/wire_fixtures.json}, generated from the Python code, is the test).
 * Unsigned 32-bit values travel in {@code long}s; an ErrorReply's 64-bit seq in a {@code long}
 * read as unsigned.
 */
public final class Wire {
    public static final int GET_HOST_REQUEST = 4;
    public static final int GET_HOST_RESPONSE = 5;
    public static final int REPORT_REQUEST = 6;
    public static final int API_GET_ROUTE_REQUEST = 7;
    public static final int API_GET_ROUTE_RESPONSE = 8;
    public static final int ERROR_REPLY = 9;
    /** The largest datagram a client receives (the most UDP carries). */
    public static final int RECEIVE_SIZE = 65536;
    public static final long U32_MAX = 0xFFFF_FFFFL;

    private static final BigInteger U64_MAX = BigInteger.ONE.shiftLeft(64).subtract(BigInteger.ONE);

    private Wire() {}

    /** A host as it travels: the IPv4 address as an integer in host order, and the port. */
    public record HostKey(long ip, int port) {}

    /** A reply from the agent. {@link #seq()} is the request it answers (u64 bits). */
    public sealed interface Reply permits GetHostResponse, GetRouteResponse, ErrorReply, OtherReply {
        long seq();
    }

    /** [5, seq, modid, cmdid, retcode, host]; host is null when the agent gave none. */
    public record GetHostResponse(long seq, long modid, long cmdid, int retcode, HostKey host)
            implements Reply {}

    /** [8, seq, modid, cmdid, retcode, hosts]. */
    public record GetRouteResponse(long seq, long modid, long cmdid, int retcode, List<HostKey> hosts)
            implements Reply {}

    /** [9, seq, code, reason]: the request seq could not be served. */
    public record ErrorReply(long seq, int code, String reason) implements Reply {}

    /**
     * Another message that names a sequence number: it answers no client request (the client
     * turns it into RequestRejected when its seq is the one awaited, as the Python client does).
     * Only its type and seq are checked.
     */
    public record OtherReply(int type, long seq) implements Reply {}

    // --- encoding ----------------------------------------------------------------------------

    /** [4, seq, modid, cmdid]. */
    public static byte[] encodeGetHostRequest(long seq, long modid, long cmdid) {
        return request(GET_HOST_REQUEST, seq, modid, cmdid);
    }

    /** [7, seq, modid, cmdid]. */
    public static byte[] encodeGetRouteRequest(long seq, long modid, long cmdid) {
        return request(API_GET_ROUTE_REQUEST, seq, modid, cmdid);
    }

    /** [6, modid, cmdid, [ip, port], retcode]. */
    public static byte[] encodeReportRequest(long modid, long cmdid, long ip, int port, long retcode) {
        try (MessageBufferPacker packer = MessagePack.newDefaultBufferPacker()) {
            packer.packArrayHeader(5)
                    .packInt(REPORT_REQUEST)
                    .packLong(modid)
                    .packLong(cmdid)
                    .packArrayHeader(2)
                    .packLong(ip)
                    .packInt(port)
                    .packLong(retcode);
            return packer.toByteArray();
        } catch (IOException e) {
            throw new IllegalStateException("packing into memory failed", e);
        }
    }

    private static byte[] request(int type, long seq, long modid, long cmdid) {
        try (MessageBufferPacker packer = MessagePack.newDefaultBufferPacker()) {
            packer.packArrayHeader(4).packInt(type).packLong(seq).packLong(modid).packLong(cmdid);
            return packer.toByteArray();
        } catch (IOException e) {
            throw new IllegalStateException("packing into memory failed", e);
        }
    }

    // --- decoding ----------------------------------------------------------------------------

    /** A value that breaks the protocol: the datagram is garbage. */
    private static final class Garbage extends Exception {
        private static final long serialVersionUID = 1L;
        static final Garbage INSTANCE = new Garbage();

        private Garbage() {
            super(null, null, false, false);
        }
    }

    /** The reply in one datagram, or null when it is garbage. Never throws. */
    public static Reply decodeReply(byte[] data, int offset, int length) {
        try (MessageUnpacker u = MessagePack.newDefaultUnpacker(data, offset, length)) {
            Reply reply = decode(u, length);
            return u.hasNext() ? null : reply; // trailing bytes: Python rejects them too
        } catch (Garbage | IOException | RuntimeException e) { // MessagePackException is one
            return null;
        }
    }

    /** {@link #decodeReply(byte[], int, int)} of a whole array. */
    public static Reply decodeReply(byte[] data) {
        return decodeReply(data, 0, data.length);
    }

    private static Reply decode(MessageUnpacker u, int length) throws IOException, Garbage {
        int size = arrayHeader(u, length);
        if (size == 0) {
            throw Garbage.INSTANCE;
        }
        int type = (int) uint(u, U32_MAX);
        switch (type) {
            case GET_HOST_RESPONSE: {
                if (size != 6) {
                    throw Garbage.INSTANCE;
                }
                long seq = uint(u, U32_MAX), modid = uint(u, U32_MAX), cmdid = uint(u, U32_MAX);
                int retcode = (int) uint(u, 255);
                HostKey host = null;
                if (u.getNextFormat() == MessageFormat.NIL) {
                    u.unpackNil();
                } else {
                    host = host(u, length);
                }
                return new GetHostResponse(seq, modid, cmdid, retcode, host);
            }
            case API_GET_ROUTE_RESPONSE: {
                if (size != 6) {
                    throw Garbage.INSTANCE;
                }
                long seq = uint(u, U32_MAX), modid = uint(u, U32_MAX), cmdid = uint(u, U32_MAX);
                int retcode = (int) uint(u, 255);
                int count = arrayHeader(u, length);
                List<HostKey> hosts = new ArrayList<>(count);
                for (int i = 0; i < count; i++) {
                    hosts.add(host(u, length));
                }
                return new GetRouteResponse(seq, modid, cmdid, retcode, Collections.unmodifiableList(hosts));
            }
            case ERROR_REPLY: {
                if (size != 4) {
                    throw Garbage.INSTANCE;
                }
                long seq = uint64(u);
                int code = (int) uint(u, 255);
                return new ErrorReply(seq, code, string(u, length));
            }
            case 4: case 7: case 10: case 11: case 13: case 14: case 15: {
                // The other messages whose first field is a sequence number (13 numbers itself
                // with 64 bits). None answers a client request.
                if (size < 2) {
                    throw Garbage.INSTANCE;
                }
                long seq = type == 13 ? uint64(u) : uint(u, U32_MAX);
                u.skipValue(size - 2); // still has to be whole, valid msgpack
                return new OtherReply(type, seq);
            }
            default:
                throw Garbage.INSTANCE;
        }
    }

    /** An array header, its size checked against the datagram before anything is allocated. */
    private static int arrayHeader(MessageUnpacker u, int length) throws IOException, Garbage {
        if (u.getNextFormat().getValueType() != ValueType.ARRAY) {
            throw Garbage.INSTANCE;
        }
        int size = u.unpackArrayHeader();
        if (size < 0 || size > length) {
            throw Garbage.INSTANCE;
        }
        return size;
    }

    /** An unsigned integer no larger than max (a negative number, a bool or a float is not). */
    private static long uint(MessageUnpacker u, long max) throws IOException, Garbage {
        MessageFormat format = u.getNextFormat();
        if (format.getValueType() != ValueType.INTEGER) {
            throw Garbage.INSTANCE;
        }
        if (format == MessageFormat.UINT64) {
            BigInteger value = u.unpackBigInteger();
            if (value.compareTo(BigInteger.valueOf(max)) > 0) {
                throw Garbage.INSTANCE;
            }
            return value.longValue();
        }
        long value = u.unpackLong();
        if (value < 0 || value > max) {
            throw Garbage.INSTANCE;
        }
        return value;
    }

    /** An unsigned 64-bit integer, in a long read as unsigned. */
    private static long uint64(MessageUnpacker u) throws IOException, Garbage {
        MessageFormat format = u.getNextFormat();
        if (format.getValueType() != ValueType.INTEGER) {
            throw Garbage.INSTANCE;
        }
        BigInteger value = u.unpackBigInteger();
        if (value.signum() < 0 || value.compareTo(U64_MAX) > 0) {
            throw Garbage.INSTANCE;
        }
        return value.longValue();
    }

    private static HostKey host(MessageUnpacker u, int length) throws IOException, Garbage {
        if (arrayHeader(u, length) != 2) {
            throw Garbage.INSTANCE;
        }
        long ip = uint(u, U32_MAX);
        long port = uint(u, 65535);
        if (port == 0) {
            throw Garbage.INSTANCE;
        }
        return new HostKey(ip, (int) port);
    }

    /** A msgpack str (not bin) of strict UTF-8, as Python's decoder reads it. */
    private static String string(MessageUnpacker u, int length) throws IOException, Garbage {
        if (u.getNextFormat().getValueType() != ValueType.STRING) {
            throw Garbage.INSTANCE;
        }
        int size = u.unpackRawStringHeader();
        if (size < 0 || size > length) {
            throw Garbage.INSTANCE;
        }
        byte[] bytes = u.readPayload(size);
        try {
            return StandardCharsets.UTF_8
                    .newDecoder()
                    .onMalformedInput(CodingErrorAction.REPORT)
                    .onUnmappableCharacter(CodingErrorAction.REPORT)
                    .decode(ByteBuffer.wrap(bytes))
                    .toString();
        } catch (CharacterCodingException e) {
            throw Garbage.INSTANCE;
        }
    }

    // --- ids, ports, addresses ---------------------------------------------------------------

    /** Check an id is an unsigned 32-bit integer. */
    public static long checkId(long value, String name) {
        if (value < 0 || value > U32_MAX) {
            throw new InvalidValueException(name + " must be an integer from 0 to " + U32_MAX + ", got " + value);
        }
        return value;
    }

    /** The agent port of a module: basePort + (modid + cmdid) % ports, summed in 64 bits. */
    public static int portFor(int basePort, int ports, long modid, long cmdid) {
        return basePort + (int) ((modid + cmdid) % ports);
    }

    /**
     * Dotted IPv4 text to its integer, exactly as lars.core.model.ip_to_int: four parts of one to
     * three ASCII digits, each at most 255. -1 if the text is anything else.
     */
    public static long parseIp(String text) {
        long value = 0;
        int i = 0;
        for (int part = 0; part < 4; part++) {
            if (part > 0) {
                if (i >= text.length() || text.charAt(i) != '.') {
                    return -1;
                }
                i++;
            }
            int digits = 0, octet = 0;
            while (i < text.length() && text.charAt(i) >= '0' && text.charAt(i) <= '9') {
                if (++digits > 3) {
                    return -1;
                }
                octet = octet * 10 + (text.charAt(i) - '0');
                i++;
            }
            if (digits == 0 || octet > 255) {
                return -1;
            }
            value = value << 8 | octet;
        }
        return i == text.length() ? value : -1;
    }

    /** The dotted text of an IPv4 integer. */
    public static String formatIp(long ip) {
        return (ip >>> 24 & 0xFF) + "." + (ip >>> 16 & 0xFF) + "." + (ip >>> 8 & 0xFF) + "." + (ip & 0xFF);
    }
}
