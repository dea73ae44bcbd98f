// The codec against clients/conformance/wire_fixtures.json: bytes and readings produced by
// the Python codec and client (python -m tests.wire_fixtures).
#include "check.hpp"

#include <lars/client.hpp>
#include <lars/wire.hpp>

#include <nlohmann/json.hpp>

#include <fstream>

using nlohmann::json;

static json fixtures;

static std::string to_hex(const std::string& bytes) {
    static const char* digits = "0123456789abcdef";
    std::string out;
    for (unsigned char c : bytes) {
        out += digits[c >> 4];
        out += digits[c & 15];
    }
    return out;
}

static std::string from_hex(const std::string& hex) {
    std::string out;
    for (std::size_t i = 0; i + 1 < hex.size(); i += 2) {
        out += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
    }
    return out;
}

static json hostkey_json(const lars::wire::HostKey& h) { return json::array({h.ip, h.port}); }

/// A decoded reply in the fixture's form.
static json reply_json(const lars::wire::Reply& reply) {
    using namespace lars::wire;
    if (const auto* r = std::get_if<GetHostResponse>(&reply)) {
        return {{"type", 5},         {"seq", r->seq},         {"modid", r->modid},
                {"cmdid", r->cmdid}, {"retcode", r->retcode}, {"host", r->host ? hostkey_json(*r->host) : json(nullptr)}};
    }
    if (const auto* r = std::get_if<GetRouteResponse>(&reply)) {
        json hosts = json::array();
        for (const auto& h : r->hosts) hosts.push_back(hostkey_json(h));
        return {{"type", 8},         {"seq", r->seq},         {"modid", r->modid},
                {"cmdid", r->cmdid}, {"retcode", r->retcode}, {"hosts", hosts}};
    }
    if (const auto* r = std::get_if<ErrorReply>(&reply)) {
        return {{"type", 9}, {"seq", r->seq}, {"code", r->code}, {"reason", r->reason}};
    }
    const auto& r = std::get<OtherReply>(reply);
    return {{"type", r.type}, {"seq", r.seq}};
}

template <class F>
static json outcome(F&& f) {
    try {
        return f();
    } catch (const lars::NoRoute&) {
        return {{"error", "NoRoute"}};
    } catch (const lars::Overloaded&) {
        return {{"error", "Overloaded"}};
    } catch (const lars::AgentUnavailable&) {
        return {{"error", "AgentUnavailable"}};
    } catch (const lars::RequestRejected&) {
        return {{"error", "RequestRejected"}};
    }
}

TEST(encodes_get_host_requests_as_python_does) {
    for (const auto& c : fixtures["encode"]["get_host_request"]) {
        CHECK_EQ(to_hex(lars::wire::encode_get_host_request(c["seq"], c["modid"], c["cmdid"])),
                 c["hex"].get<std::string>());
    }
}

TEST(encodes_get_route_requests_as_python_does) {
    for (const auto& c : fixtures["encode"]["get_route_request"]) {
        CHECK_EQ(to_hex(lars::wire::encode_get_route_request(c["seq"], c["modid"], c["cmdid"])),
                 c["hex"].get<std::string>());
    }
}

TEST(encodes_reports_as_python_does) {
    for (const auto& c : fixtures["encode"]["report_request"]) {
        auto ip = lars::wire::parse_ip(c["ip"].get<std::string>());
        CHECK(ip.has_value());
        const lars::wire::HostKey host{*ip, c["port"].get<std::uint16_t>()};
        CHECK_EQ(to_hex(lars::wire::encode_report_request(c["modid"], c["cmdid"], host,
                                                          c["retcode"])),
                 c["hex"].get<std::string>());
    }
}

TEST(reads_replies_as_python_does) {
    int cases = 0;
    for (const auto& c : fixtures["decode"]) {
        ++cases;
        const std::string data = from_hex(c["hex"]);
        const auto reply = lars::wire::decode_reply(data.data(), data.size());
        const json got = reply ? reply_json(*reply) : json(nullptr);
        if (got != c["reply"]) {
            lars_test::fail(__FILE__, __LINE__,
                            c["name"].get<std::string>() + ": " + got.dump() +
                                " != " + c["reply"].dump());
            continue;
        }
        if (!reply) continue;
        const json host = outcome([&]() -> json {
            return {{"host", lars::detail::host_result(*reply, 1, 1).to_string()}};
        });
        CHECK_EQ(host.dump(), c["get_host"].dump());
        const json route = outcome([&]() -> json {
            json hosts = json::array();
            for (const auto& h : lars::detail::route_result(*reply, 1, 1)) {
                hosts.push_back(h.to_string());
            }
            return {{"hosts", hosts}};
        });
        CHECK_EQ(route.dump(), c["get_route"].dump());
    }
    CHECK(cases > 40);
}

TEST(parses_ip_text_as_python_does) {
    for (const auto& c : fixtures["ip"]) {
        const auto got = lars::wire::parse_ip(c["text"].get<std::string>());
        const json value = got ? json(*got) : json(nullptr);
        CHECK_EQ(value.dump() + " for " + c["text"].dump(), c["int"].dump() + " for " + c["text"].dump());
        if (got && c["text"].get<std::string>().find("0") != 0) {
            CHECK_EQ(lars::wire::parse_ip(lars::wire::format_ip(*got)).value_or(1), *got);
        }
    }
    CHECK_EQ(lars::wire::format_ip(167772161), std::string("10.0.0.1"));
    CHECK_EQ(lars::wire::format_ip(4294967295u), std::string("255.255.255.255"));
}

TEST(computes_ports_as_python_does) {
    for (const auto& c : fixtures["port"]) {
        CHECK_EQ(lars::wire::port_for(c["base_port"], c["ports"], c["modid"], c["cmdid"]),
                 c["port"].get<std::uint16_t>());
        lars::Options options;
        options.base_port = c["base_port"];
        options.ports = c["ports"];
        CHECK_EQ(lars::Client(options).port(c["modid"], c["cmdid"]),
                 c["port"].get<std::uint16_t>());
    }
}

TEST(parses_host_text) {
    CHECK(lars::Host::parse("10.0.0.1:7001") == (lars::Host{"10.0.0.1", 7001}));
    CHECK_EQ(lars::Host::parse("1.2.3.4:65535").to_string(), std::string("1.2.3.4:65535"));
    CHECK_THROWS(lars::InvalidValue, lars::Host::parse("10.0.0.1"));
    CHECK_THROWS(lars::InvalidValue, lars::Host::parse("10.0.0.1:0"));
    CHECK_THROWS(lars::InvalidValue, lars::Host::parse("10.0.0.1:65536"));
    CHECK_THROWS(lars::InvalidValue, lars::Host::parse("10.0.0:80"));
    CHECK_THROWS(lars::InvalidValue, lars::Host::parse("10.0.0.1:8x"));
}

int main(int argc, char** argv) {
    if (argc < 2) {
        std::cerr << "usage: test_wire FIXTURES.json" << std::endl;
        return 2;
    }
    std::ifstream in(argv[1]);
    if (!in) {
        std::cerr << "cannot read " << argv[1] << std::endl;
        return 2;
    }
    fixtures = json::parse(in);
    return lars_test::run_all(1, argv);
}
