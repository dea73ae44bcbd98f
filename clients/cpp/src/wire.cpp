#include "lars/wire.hpp"

#include <msgpack.hpp>

#include <cstdio>
#include <limits>

namespace lars::wire {
namespace {

constexpr std::uint64_t U32_MAX = std::numeric_limits<std::uint32_t>::max();

/// A packer's output: appends to a string (short requests stay in its inline buffer).
struct StringBuffer {
    std::string data;
    void write(const char* bytes, std::size_t size) { data.append(bytes, size); }
};

/// An unsigned integer no larger than `max`, or nullopt (a negative integer, a bool,
/// a float or anything else is not one: Python's checks take `int` only).
std::optional<std::uint64_t> as_uint(const msgpack::object& o, std::uint64_t max) {
    if (o.type != msgpack::type::POSITIVE_INTEGER || o.via.u64 > max) {
        return std::nullopt;
    }
    return o.via.u64;
}

/// One [ip, port] host, or nullopt.
std::optional<HostKey> as_host(const msgpack::object& o) {
    if (o.type != msgpack::type::ARRAY || o.via.array.size != 2) {
        return std::nullopt;
    }
    auto ip = as_uint(o.via.array.ptr[0], U32_MAX);
    auto port = as_uint(o.via.array.ptr[1], 65535);
    if (!ip || !port || *port == 0) {
        return std::nullopt;
    }
    return HostKey{static_cast<std::uint32_t>(*ip), static_cast<std::uint16_t>(*port)};
}

/// Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF), as Python's
/// decoder reads a msgpack str.
bool valid_utf8(const char* text, std::size_t size) {
    const auto* s = reinterpret_cast<const unsigned char*>(text);
    std::size_t i = 0;
    while (i < size) {
        unsigned c = s[i];
        std::size_t n;
        std::uint32_t cp;
        if (c < 0x80) {
            ++i;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            n = 1;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            n = 2;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            n = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (i + n >= size) {  // the sequence runs past the end
            return false;
        }
        for (std::size_t k = 1; k <= n; ++k) {
            if ((s[i + k] & 0xC0) != 0x80) {
                return false;
            }
            cp = cp << 6 | (s[i + k] & 0x3F);
        }
        static constexpr std::uint32_t smallest[] = {0, 0x80, 0x800, 0x10000};
        if (cp < smallest[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
            return false;
        }
        i += n + 1;
    }
    return true;
}

/// The fields [seq, modid, cmdid, retcode] shared by the two responses.
struct Head {
    std::uint32_t seq, modid, cmdid, retcode;
};

std::optional<Head> as_head(const msgpack::object* f) {
    auto seq = as_uint(f[1], U32_MAX);
    auto modid = as_uint(f[2], U32_MAX);
    auto cmdid = as_uint(f[3], U32_MAX);
    auto code = as_uint(f[4], 255);
    if (!seq || !modid || !cmdid || !code) {
        return std::nullopt;
    }
    return Head{static_cast<std::uint32_t>(*seq), static_cast<std::uint32_t>(*modid),
                static_cast<std::uint32_t>(*cmdid), static_cast<std::uint32_t>(*code)};
}

std::optional<Reply> decode_object(const msgpack::object& o) {
    if (o.type != msgpack::type::ARRAY || o.via.array.size == 0) {
        return std::nullopt;
    }
    const msgpack::object* f = o.via.array.ptr;
    const std::uint32_t size = o.via.array.size;
    auto type = as_uint(f[0], U32_MAX);
    if (!type) {
        return std::nullopt;
    }
    switch (*type) {
        case GET_HOST_RESPONSE: {
            if (size != 6) {
                return std::nullopt;
            }
            auto head = as_head(f);
            if (!head) {
                return std::nullopt;
            }
            std::optional<HostKey> host;
            if (f[5].type != msgpack::type::NIL) {
                host = as_host(f[5]);
                if (!host) {
                    return std::nullopt;
                }
            }
            return GetHostResponse{head->seq, head->modid, head->cmdid, head->retcode, host};
        }
        case API_GET_ROUTE_RESPONSE: {
            if (size != 6 || f[5].type != msgpack::type::ARRAY) {
                return std::nullopt;
            }
            auto head = as_head(f);
            if (!head) {
                return std::nullopt;
            }
            std::vector<HostKey> hosts;
            hosts.reserve(f[5].via.array.size);
            for (std::uint32_t i = 0; i < f[5].via.array.size; ++i) {
                auto host = as_host(f[5].via.array.ptr[i]);
                if (!host) {
                    return std::nullopt;
                }
                hosts.push_back(*host);
            }
            return GetRouteResponse{head->seq, head->modid, head->cmdid, head->retcode,
                                    std::move(hosts)};
        }
        case ERROR_REPLY: {
            if (size != 4) {
                return std::nullopt;
            }
            auto seq = as_uint(f[1], std::numeric_limits<std::uint64_t>::max());
            auto code = as_uint(f[2], 255);
            if (!seq || !code || f[3].type != msgpack::type::STR ||
                !valid_utf8(f[3].via.str.ptr, f[3].via.str.size)) {
                return std::nullopt;
            }
            return ErrorReply{*seq, static_cast<std::uint32_t>(*code),
                              std::string(f[3].via.str.ptr, f[3].via.str.size)};
        }
        // The other messages whose first field is a sequence number (13 numbers itself
        // with 64 bits). None answers a client request.
        case 4:
        case 7:
        case 10:
        case 11:
        case 13:
        case 14:
        case 15: {
            if (size < 2) {
                return std::nullopt;
            }
            auto seq = as_uint(f[1], *type == 13 ? std::numeric_limits<std::uint64_t>::max()
                                                 : U32_MAX);
            if (!seq) {
                return std::nullopt;
            }
            return OtherReply{static_cast<std::uint32_t>(*type), *seq};
        }
        default:
            return std::nullopt;
    }
}

}  // namespace

std::string encode_get_host_request(std::uint32_t seq, std::uint32_t modid, std::uint32_t cmdid) {
    StringBuffer buffer;
    msgpack::packer<StringBuffer> pk(buffer);
    pk.pack_array(4);
    pk.pack_uint32(GET_HOST_REQUEST);
    pk.pack_uint32(seq);
    pk.pack_uint32(modid);
    pk.pack_uint32(cmdid);
    return std::move(buffer.data);
}

std::string encode_get_route_request(std::uint32_t seq, std::uint32_t modid,
                                     std::uint32_t cmdid) {
    StringBuffer buffer;
    msgpack::packer<StringBuffer> pk(buffer);
    pk.pack_array(4);
    pk.pack_uint32(API_GET_ROUTE_REQUEST);
    pk.pack_uint32(seq);
    pk.pack_uint32(modid);
    pk.pack_uint32(cmdid);
    return std::move(buffer.data);
}

std::string encode_report_request(std::uint32_t modid, std::uint32_t cmdid, HostKey host,
                                  std::uint32_t retcode) {
    StringBuffer buffer;
    msgpack::packer<StringBuffer> pk(buffer);
    pk.pack_array(5);
    pk.pack_uint32(REPORT_REQUEST);
    pk.pack_uint32(modid);
    pk.pack_uint32(cmdid);
    pk.pack_array(2);
    pk.pack_uint32(host.ip);
    pk.pack_uint16(host.port);
    pk.pack_uint32(retcode);
    return std::move(buffer.data);
}

std::optional<Reply> decode_reply(const char* data, std::size_t size) noexcept {
    try {
        // A datagram of `size` bytes holds no container of more than `size` elements:
        // the limits stop a forged header from asking for gigabytes before the data ends.
        const msgpack::unpack_limit limit(size, size, size, size, size, 64);
        std::size_t offset = 0;
        msgpack::object_handle handle =
            msgpack::unpack(data, size, offset, nullptr, nullptr, limit);
        if (offset != size) {
            return std::nullopt;  // trailing bytes: Python's unpackb rejects them too
        }
        return decode_object(handle.get());
    } catch (...) {  // msgpack-c throws several kinds (and bad_alloc): all mean garbage
        return std::nullopt;
    }
}

std::uint64_t reply_seq(const Reply& reply) noexcept {
    return std::visit([](const auto& r) -> std::uint64_t { return r.seq; }, reply);
}

std::optional<std::uint32_t> parse_ip(std::string_view text) noexcept {
    std::uint32_t value = 0;
    std::size_t i = 0;
    for (int part = 0; part < 4; ++part) {
        if (part > 0) {
            if (i >= text.size() || text[i] != '.') {
                return std::nullopt;
            }
            ++i;
        }
        std::size_t digits = 0;
        unsigned octet = 0;
        while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
            if (++digits > 3) {
                return std::nullopt;
            }
            octet = octet * 10 + static_cast<unsigned>(text[i] - '0');
            ++i;
        }
        if (digits == 0 || octet > 255) {
            return std::nullopt;
        }
        value = value << 8 | octet;
    }
    if (i != text.size()) {
        return std::nullopt;
    }
    return value;
}

std::string format_ip(std::uint32_t ip) {
    char text[16];
    std::snprintf(text, sizeof text, "%u.%u.%u.%u", ip >> 24, ip >> 16 & 0xFF, ip >> 8 & 0xFF,
                  ip & 0xFF);
    return text;
}

}  // namespace lars::wire
