// The Lars client protocol without I/O: bytes out for requests, replies in from bytes.
//
// The reference is the Python codec, lars/wire.py (DESIGN.md §4): every message is one
// msgpack array whose first element is the message type id, then the fields in order.
// A UDP datagram carries exactly one message. Hosts travel as [ip, port], ip the IPv4
// address as an unsigned 32-bit integer in host order (10.0.0.1 = 167772161).
//
//   [4, seq, modid, cmdid]                          GetHostRequest       client -> agent
//   [5, seq, modid, cmdid, retcode, host-or-nil]    GetHostResponse      agent -> client
//   [6, modid, cmdid, [ip, port], retcode]          ReportRequest        client -> agent
//   [7, seq, modid, cmdid]                          ApiGetRouteRequest   client -> agent
//   [8, seq, modid, cmdid, retcode, [[ip, port]...]] ApiGetRouteResponse agent -> client
//   [9, seq, code, reason]                          ErrorReply           agent -> client
//
// decode_reply() accepts exactly what the Python client accepts and discards the rest
// (clients/conformance/wire_fixtures.json, generated from the Python code, is the test).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace lars {

/// Return codes of the agent (0-3 as in the original Lars, 4 a Lars addition).
namespace retcode {
inline constexpr std::uint32_t SUCC = 0;
inline constexpr std::uint32_t OVERLOAD = 1;
inline constexpr std::uint32_t SYSTEM_ERROR = 2;
inline constexpr std::uint32_t NOEXIST = 3;
inline constexpr std::uint32_t BAD_REQUEST = 4;
}  // namespace retcode

namespace wire {

/// Message type ids (stable: never renumbered).
inline constexpr std::uint32_t GET_HOST_REQUEST = 4;
inline constexpr std::uint32_t GET_HOST_RESPONSE = 5;
inline constexpr std::uint32_t REPORT_REQUEST = 6;
inline constexpr std::uint32_t API_GET_ROUTE_REQUEST = 7;
inline constexpr std::uint32_t API_GET_ROUTE_RESPONSE = 8;
inline constexpr std::uint32_t ERROR_REPLY = 9;

/// The largest datagram a client receives (the most UDP carries).
inline constexpr std::size_t RECEIVE_SIZE = 65536;

/// A host as it travels: the IPv4 address as an integer in host order, and the port.
struct HostKey {
    std::uint32_t ip = 0;
    std::uint16_t port = 0;
    friend bool operator==(const HostKey& a, const HostKey& b) {
        return a.ip == b.ip && a.port == b.port;
    }
};

struct GetHostResponse {
    std::uint32_t seq, modid, cmdid, retcode;
    std::optional<HostKey> host;
};

struct GetRouteResponse {
    std::uint32_t seq, modid, cmdid, retcode;
    std::vector<HostKey> hosts;
};

struct ErrorReply {
    std::uint64_t seq;  // 64 bits: it echoes whatever the refused message carried
    std::uint32_t code;
    std::string reason;
};

/// A message of another kind that names a sequence number: it answers no client request,
/// and the client turns it into RequestRejected when its seq is the one awaited (as the
/// Python client does). Only its type and seq are checked.
struct OtherReply {
    std::uint32_t type;
    std::uint64_t seq;
};

using Reply = std::variant<GetHostResponse, GetRouteResponse, ErrorReply, OtherReply>;

std::string encode_get_host_request(std::uint32_t seq, std::uint32_t modid, std::uint32_t cmdid);
std::string encode_get_route_request(std::uint32_t seq, std::uint32_t modid, std::uint32_t cmdid);
std::string encode_report_request(std::uint32_t modid, std::uint32_t cmdid, HostKey host,
                                  std::uint32_t retcode);

/// The reply in one datagram, or nullopt when the datagram is garbage (not msgpack, not a
/// valid message, trailing bytes, a value out of range). Never throws.
std::optional<Reply> decode_reply(const char* data, std::size_t size) noexcept;

/// The sequence number a reply answers.
std::uint64_t reply_seq(const Reply& reply) noexcept;

/// The agent port of a module: base_port + (modid + cmdid) % ports, summed in 64 bits.
constexpr std::uint16_t port_for(std::uint16_t base_port, std::uint32_t ports, std::uint32_t modid,
                                 std::uint32_t cmdid) {
    return static_cast<std::uint16_t>(
        base_port + (std::uint64_t{modid} + std::uint64_t{cmdid}) % ports);
}

/// Dotted IPv4 text to its integer, exactly as lars.core.model.ip_to_int: four parts of
/// one to three ASCII digits, each at most 255. nullopt if the text is anything else.
std::optional<std::uint32_t> parse_ip(std::string_view text) noexcept;

/// The dotted text of an IPv4 integer.
std::string format_ip(std::uint32_t ip);

}  // namespace wire
}  // namespace lars
