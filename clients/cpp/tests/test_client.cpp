// lars::Client and lars_client against a fake agent on loopback: sequence numbers, retries
// with the same seq, stale replies, timeouts, error mapping, reports, reg_init, threads.
#include "check.hpp"

#include <lars/client.hpp>
#include <lars_api.h>

#include <msgpack.hpp>

#include <arpa/inet.h>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <mutex>
#include <netinet/in.h>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

constexpr auto TIMEOUT = 100ms;
constexpr unsigned RETRIES = 2;

double seconds_since(Clock::time_point start) {
    return std::chrono::duration<double>(Clock::now() - start).count();
}

/// A request as the fake agent saw it: its array of unsigned integers, flattened
/// ([6, modid, cmdid, [ip, port], retcode] becomes 6 modid cmdid ip port retcode).
struct Request {
    std::vector<std::uint64_t> fields;
    std::string bytes;
    std::uint64_t operator[](std::size_t i) const { return fields.at(i); }
};

void flatten(const msgpack::object& o, std::vector<std::uint64_t>& out) {
    if (o.type == msgpack::type::ARRAY) {
        for (std::uint32_t i = 0; i < o.via.array.size; ++i) flatten(o.via.array.ptr[i], out);
    } else if (o.type == msgpack::type::POSITIVE_INTEGER) {
        out.push_back(o.via.u64);
    }
}

std::string get_host_response(std::uint64_t seq, std::uint32_t modid, std::uint32_t cmdid,
                              std::uint32_t retcode, std::uint32_t ip = 0,
                              std::uint16_t port = 0) {
    msgpack::sbuffer buffer;
    msgpack::packer<msgpack::sbuffer> pk(buffer);
    pk.pack_array(6);
    pk.pack(5).pack(seq).pack(modid).pack(cmdid).pack(retcode);
    if (port) {
        pk.pack_array(2).pack(ip).pack(port);
    } else {
        pk.pack_nil();
    }
    return std::string(buffer.data(), buffer.size());
}

std::string route_response(std::uint64_t seq, std::uint32_t modid, std::uint32_t cmdid,
                           std::uint32_t retcode,
                           const std::vector<std::pair<std::uint32_t, std::uint16_t>>& hosts) {
    msgpack::sbuffer buffer;
    msgpack::packer<msgpack::sbuffer> pk(buffer);
    pk.pack_array(6);
    pk.pack(8).pack(seq).pack(modid).pack(cmdid).pack(retcode);
    pk.pack_array(static_cast<std::uint32_t>(hosts.size()));
    for (const auto& [ip, port] : hosts) pk.pack_array(2).pack(ip).pack(port);
    return std::string(buffer.data(), buffer.size());
}

std::string error_reply(std::uint64_t seq, std::uint32_t code, const std::string& reason) {
    msgpack::sbuffer buffer;
    msgpack::packer<msgpack::sbuffer> pk(buffer);
    pk.pack_array(4).pack(9).pack(seq).pack(code).pack(reason);
    return std::string(buffer.data(), buffer.size());
}

/// A UDP server on a loopback port chosen by the kernel: each datagram goes to the handler,
/// whose datagrams go back to the sender.
class FakeAgent {
public:
    using Handler = std::function<std::vector<std::string>(const Request&, int index)>;

    explicit FakeAgent(Handler handler) : handler_(std::move(handler)) {
        fd_ = ::socket(AF_INET, SOCK_DGRAM, 0);
        sockaddr_in address{};
        address.sin_family = AF_INET;
        address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        ::bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof address);
        socklen_t size = sizeof address;
        ::getsockname(fd_, reinterpret_cast<sockaddr*>(&address), &size);
        port = ntohs(address.sin_port);
        timeval tv{0, 20000};
        ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        thread_ = std::thread([this] { serve(); });
    }

    ~FakeAgent() {
        stop_ = true;
        thread_.join();
        ::close(fd_);
    }

    lars::Options options(std::chrono::microseconds timeout = TIMEOUT,
                          unsigned retries = RETRIES) const {
        lars::Options o;
        o.base_port = port;
        o.ports = 1;
        o.timeout = timeout;
        o.retries = retries;
        return o;
    }

    std::vector<Request> requests() {
        std::lock_guard<std::mutex> lock(mutex_);
        return requests_;
    }

    /// Wait until `count` datagrams came in (reports need no reply to wait for).
    bool wait_for(std::size_t count) {
        for (int i = 0; i < 200; ++i) {
            if (requests().size() >= count) return true;
            std::this_thread::sleep_for(5ms);
        }
        return false;
    }

    std::uint16_t port = 0;

private:
    void serve() {
        char buffer[65536];
        int index = 0;
        while (!stop_) {
            sockaddr_in peer{};
            socklen_t size = sizeof peer;
            const ssize_t n =
                ::recvfrom(fd_, buffer, sizeof buffer, 0, reinterpret_cast<sockaddr*>(&peer), &size);
            if (n < 0) continue;
            Request request;
            request.bytes.assign(buffer, static_cast<std::size_t>(n));
            auto handle = msgpack::unpack(buffer, static_cast<std::size_t>(n));
            flatten(handle.get(), request.fields);
            {
                std::lock_guard<std::mutex> lock(mutex_);
                requests_.push_back(request);
            }
            for (const auto& reply : handler_(request, index++)) {
                ::sendto(fd_, reply.data(), reply.size(), 0, reinterpret_cast<sockaddr*>(&peer),
                         size);
            }
        }
    }

    Handler handler_;
    int fd_ = -1;
    std::atomic<bool> stop_{false};
    std::mutex mutex_;
    std::vector<Request> requests_;
    std::thread thread_;
};

/// A loopback UDP port that nothing listens on (bound, then closed).
std::uint16_t dead_port() {
    const int fd = ::socket(AF_INET, SOCK_DGRAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address);
    socklen_t size = sizeof address;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &size);
    ::close(fd);
    return ntohs(address.sin_port);
}

constexpr std::uint32_t IP1 = 167772161;  // 10.0.0.1

FakeAgent::Handler answer_with(std::uint32_t retcode) {
    return [retcode](const Request& r, int) -> std::vector<std::string> {
        if (r[0] == 4) {
            return {get_host_response(r[1], static_cast<std::uint32_t>(r[2]),
                                      static_cast<std::uint32_t>(r[3]), retcode, IP1,
                                      retcode == 0 ? 7001 : 0)};
        }
        if (r[0] == 7) {
            return {route_response(r[1], static_cast<std::uint32_t>(r[2]),
                                   static_cast<std::uint32_t>(r[3]), retcode,
                                   retcode == 0 ? std::vector<std::pair<std::uint32_t, std::uint16_t>>{{IP1, 7001}, {IP1 + 1, 7002}}
                                                : std::vector<std::pair<std::uint32_t, std::uint16_t>>{})};
        }
        return {};
    };
}

}  // namespace

TEST(get_host_returns_the_agents_host) {
    FakeAgent agent(answer_with(0));
    lars::Client client(agent.options());
    CHECK(client.get_host(1, 2) == (lars::Host{"10.0.0.1", 7001}));
    auto requests = agent.requests();
    CHECK_EQ(requests.size(), 1u);
    CHECK_EQ(requests[0].fields.size(), 4u);
    CHECK_EQ(requests[0][0], 4u);
    CHECK_EQ(requests[0][2], 1u);
    CHECK_EQ(requests[0][3], 2u);
}

TEST(sequence_numbers_start_from_the_pid_and_grow) {
    FakeAgent agent(answer_with(0));
    lars::Client client(agent.options());
    client.get_host(1, 1);
    client.get_route(1, 1);
    client.get_host(1, 1);
    auto requests = agent.requests();
    CHECK_EQ(requests.size(), 3u);
    CHECK_EQ(requests[0][1], static_cast<std::uint64_t>(::getpid() & 0xFFFF));
    CHECK_EQ(requests[1][1], requests[0][1] + 1);
    CHECK_EQ(requests[2][1], requests[0][1] + 2);
}

TEST(stale_replies_and_garbage_are_discarded) {
    FakeAgent agent([](const Request& r, int) -> std::vector<std::string> {
        return {get_host_response(r[1] - 1, 1, 1, 0, IP1 + 9, 9),  // an earlier request's
                "\xc1", std::string("\x93\x05", 2),                 // garbage
                error_reply(r[1] + 1, 4, "not yours"),              // someone else's error
                get_host_response(r[1], 1, 1, 0, IP1, 7001)};
    });
    lars::Client client(agent.options());
    CHECK(client.get_host(1, 1) == (lars::Host{"10.0.0.1", 7001}));
    CHECK_EQ(agent.requests().size(), 1u);
}

TEST(a_lost_request_is_resent_with_the_same_seq) {
    FakeAgent agent([](const Request& r, int index) -> std::vector<std::string> {
        if (index < 2) return {};  // the first two attempts go unanswered
        return {get_host_response(r[1], 1, 1, 0, IP1, 7001)};
    });
    lars::Client client(agent.options());
    const auto start = Clock::now();
    CHECK(client.get_host(1, 1) == (lars::Host{"10.0.0.1", 7001}));
    const double took = seconds_since(start);
    CHECK(took >= 0.19 && took < 0.35);
    auto requests = agent.requests();
    CHECK_EQ(requests.size(), 3u);
    CHECK(requests[0].bytes == requests[1].bytes && requests[1].bytes == requests[2].bytes);
}

TEST(no_answer_is_agent_unavailable_after_timeout_times_attempts) {
    FakeAgent agent([](const Request&, int) -> std::vector<std::string> { return {}; });
    lars::Client client(agent.options());
    const auto start = Clock::now();
    CHECK_THROWS(lars::AgentUnavailable, client.get_host(1, 1));
    const double took = seconds_since(start);
    CHECK(took >= 0.29 && took < 0.45);
    CHECK_EQ(agent.requests().size(), 3u);
    // A late reply to that request does not answer the next one.
    CHECK_THROWS(lars::AgentUnavailable, client.get_route(1, 1));
}

TEST(a_closed_port_is_agent_unavailable_after_the_same_time) {
    lars::Options options;
    options.base_port = dead_port();
    options.ports = 1;
    options.timeout = TIMEOUT;
    options.retries = RETRIES;
    lars::Client client(options);
    const auto start = Clock::now();
    CHECK_THROWS(lars::AgentUnavailable, client.get_host(1, 1));
    const double took = seconds_since(start);
    CHECK(took >= 0.29 && took < 0.45);
    try {
        client.get_route(1, 1);
    } catch (const lars::AgentUnavailable& exc) {
        CHECK(std::string(exc.what()).find("after 3 attempts of 0.1s") != std::string::npos);
    }
}

TEST(retcodes_become_typed_errors) {
    {
        FakeAgent agent(answer_with(lars::retcode::NOEXIST));
        lars::Client client(agent.options());
        CHECK_THROWS(lars::NoRoute, client.get_host(1, 1));
        CHECK_THROWS(lars::NoRoute, client.get_route(1, 1));
        CHECK(!client.try_get_host(1, 1).has_value());
    }
    {
        FakeAgent agent(answer_with(lars::retcode::OVERLOAD));
        lars::Client client(agent.options());
        CHECK_THROWS(lars::Overloaded, client.get_host(1, 1));
        CHECK(!client.try_get_host(1, 1).has_value());
    }
    {
        FakeAgent agent(answer_with(lars::retcode::SYSTEM_ERROR));
        lars::Client client(agent.options());
        CHECK_THROWS(lars::RequestRejected, client.get_host(1, 1));
        CHECK_THROWS(lars::RequestRejected, client.try_get_host(1, 1));
    }
    {
        FakeAgent agent([](const Request& r, int) -> std::vector<std::string> {
            return {error_reply(r[1], 4, "modid out of range")};
        });
        lars::Client client(agent.options());
        try {
            client.get_host(1, 1);
            CHECK(false);
        } catch (const lars::RequestRejected& exc) {
            CHECK_EQ(exc.code(), 4u);
            CHECK(std::string(exc.what()).find("modid out of range") != std::string::npos);
        }
        try {
            client.get_host(1, 1);
        } catch (const lars::LarsError&) {  // the root catches them all
        }
    }
}

TEST(get_route_returns_every_host) {
    FakeAgent agent(answer_with(0));
    lars::Client client(agent.options());
    const auto hosts = client.get_route(3, 4);
    CHECK_EQ(hosts.size(), 2u);
    CHECK(hosts[0] == (lars::Host{"10.0.0.1", 7001}));
    CHECK(hosts[1] == (lars::Host{"10.0.0.2", 7002}));
    CHECK_EQ(agent.requests()[0][0], 7u);
}

TEST(report_sends_one_datagram_with_the_retcode) {
    FakeAgent agent([](const Request&, int) -> std::vector<std::string> { return {}; });
    lars::Client client(agent.options());
    client.report(1, 2, lars::Host{"10.0.0.1", 7001}, 0u);
    client.report(1, 2, lars::Host{"10.0.0.1", 7001}, lars::Outcome::failed);
    client.report(4294967295u, 2, lars::Host{"255.255.255.255", 65535}, 4294967295u);
    CHECK(agent.wait_for(3));
    auto requests = agent.requests();
    CHECK(requests[0].fields == (std::vector<std::uint64_t>{6, 1, 2, IP1, 7001, 0}));
    CHECK(requests[1].fields == (std::vector<std::uint64_t>{6, 1, 2, IP1, 7001, 1}));
    CHECK(requests[2].fields ==
          (std::vector<std::uint64_t>{6, 4294967295u, 2, 4294967295u, 65535, 4294967295u}));
    CHECK_THROWS(lars::InvalidValue, client.report(1, 1, lars::Host{"10.0.0", 1}, 0u));
    CHECK_THROWS(lars::InvalidValue, client.report(1, 1, lars::Host{"10.0.0.1", 0}, 0u));
}

TEST(report_without_an_agent_is_silent_and_quick) {
    lars::Options options;
    options.base_port = dead_port();
    options.ports = 1;
    lars::Client client(options);
    const auto start = Clock::now();
    for (int i = 0; i < 5; ++i) client.report(1, 1, lars::Host{"10.0.0.1", 7001}, 1u);
    CHECK(seconds_since(start) < 0.05);
}

TEST(reg_init_retries_while_no_route) {
    FakeAgent agent([](const Request& r, int index) -> std::vector<std::string> {
        const std::uint32_t code = index < 2 ? lars::retcode::NOEXIST : 0;
        return {route_response(r[1], 1, 1, code, code ? std::vector<std::pair<std::uint32_t, std::uint16_t>>{}
                                                      : std::vector<std::pair<std::uint32_t, std::uint16_t>>{{IP1, 7001}})};
    });
    lars::Client client(agent.options());
    const auto start = Clock::now();
    CHECK_EQ(client.reg_init(1, 1).size(), 1u);
    CHECK(seconds_since(start) >= 0.39);
    CHECK_EQ(agent.requests().size(), 3u);
}

TEST(reg_init_gives_up_on_no_route_after_its_attempts) {
    FakeAgent agent(answer_with(lars::retcode::NOEXIST));
    lars::Client client(agent.options());
    CHECK_THROWS(lars::NoRoute, client.reg_init(1, 1));
    CHECK_EQ(agent.requests().size(), static_cast<std::size_t>(lars::REG_INIT_ATTEMPTS));
}

TEST(reg_init_does_not_retry_a_missing_agent) {
    FakeAgent agent([](const Request&, int) -> std::vector<std::string> { return {}; });
    lars::Client client(agent.options());
    CHECK_THROWS(lars::AgentUnavailable, client.reg_init(1, 1));
    CHECK_EQ(agent.requests().size(), RETRIES + 1);
}

TEST(call_reports_success_or_failure) {
    FakeAgent agent(answer_with(0));
    lars::Client client(agent.options());
    CHECK_EQ(client.call(1, 1, [](const lars::Host& h) { return h.port; }), 7001);
    client.call(1, 1, [](const lars::Host&) {});
    CHECK_THROWS(std::runtime_error,
                 client.call(1, 1, [](const lars::Host&) -> int { throw std::runtime_error("x"); }));
    CHECK(agent.wait_for(6));
    auto requests = agent.requests();
    CHECK_EQ(requests[1][0], 6u);
    CHECK_EQ(requests[1][5], 0u);
    CHECK_EQ(requests[3][5], 0u);
    CHECK_EQ(requests[5][5], 1u);
}

TEST(threads_share_a_client_without_crossing_replies) {
    // The agent answers module m with host ip m: each thread must only ever see its own.
    FakeAgent agent([](const Request& r, int) -> std::vector<std::string> {
        if (r[0] != 4) return {};
        return {get_host_response(r[1], static_cast<std::uint32_t>(r[2]), 1, 0,
                                  static_cast<std::uint32_t>(r[2]), 80)};
    });
    lars::Client client(agent.options(std::chrono::milliseconds(1000)));
    std::atomic<int> wrong{0}, done{0};
    std::vector<std::thread> threads;
    for (std::uint32_t t = 1; t <= 8; ++t) {
        threads.emplace_back([&, t] {
            for (int i = 0; i < 200; ++i) {
                const auto host = client.get_host(t, 1);
                if (host.ip != lars::wire::format_ip(t)) ++wrong;
                client.report(t, 1, host, 0u);
                ++done;
            }
        });
    }
    for (auto& thread : threads) thread.join();
    CHECK_EQ(wrong.load(), 0);
    CHECK_EQ(done.load(), 1600);
}

TEST(bad_options_are_refused) {
    lars::Options options;
    options.ports = 0;
    CHECK_THROWS(lars::InvalidValue, lars::Client(options));
    options.ports = 3;
    options.base_port = 65534;
    CHECK_THROWS(lars::InvalidValue, lars::Client(options));
    options.base_port = 8888;
    options.timeout = std::chrono::microseconds(0);
    CHECK_THROWS(lars::InvalidValue, lars::Client(options));
}

TEST(the_original_api_returns_retcodes) {
    FakeAgent agent(answer_with(0));
    lars_client api(agent.options());
    std::string ip;
    int port = 0;
    CHECK_EQ(api.get_host(1, 1, ip, port), lars::RET_SUCC);
    CHECK_EQ(ip, std::string("10.0.0.1"));
    CHECK_EQ(port, 7001);
    route_set route{{"1.1.1.1", 1}};
    CHECK_EQ(api.get_route(1, 1, route), lars::RET_SUCC);
    CHECK_EQ(route.size(), 3u);  // appended, as the original did
    CHECK(route[1] == (ip_port{"10.0.0.1", 7001}));
    CHECK_EQ(api.reg_init(1, 1), lars::RET_SUCC);
    api.report(1, 1, ip, port, 0);
    api.report(1, 1, "not an ip", port, 0);  // dropped, no exception
    CHECK_EQ(api.get_host(-1, 1, ip, port), lars::RET_BAD_REQUEST);
}

TEST(the_original_api_maps_errors_to_retcodes) {
    {
        FakeAgent agent(answer_with(lars::retcode::OVERLOAD));
        lars_client api(agent.options());
        std::string ip = "unchanged";
        int port = -1;
        CHECK_EQ(api.get_host(1, 1, ip, port), lars::RET_OVERLOAD);
        CHECK_EQ(ip, std::string("unchanged"));
    }
    {
        FakeAgent agent(answer_with(lars::retcode::NOEXIST));
        lars_client api(agent.options());
        std::string ip;
        int port = 0;
        route_set route;
        CHECK_EQ(api.get_host(1, 1, ip, port), lars::RET_NOEXIST);
        CHECK_EQ(api.get_route(1, 1, route), lars::RET_NOEXIST);
        CHECK(route.empty());
    }
    {
        FakeAgent agent([](const Request& r, int) -> std::vector<std::string> {
            return {error_reply(r[1], 4, "bad")};
        });
        lars_client api(agent.options());
        std::string ip;
        int port = 0;
        CHECK_EQ(api.get_host(1, 1, ip, port), lars::RET_BAD_REQUEST);
    }
    {
        lars::Options options;
        options.base_port = dead_port();
        options.ports = 1;
        options.timeout = std::chrono::milliseconds(50);
        lars_client api(options);
        std::string ip;
        int port = 0;
        CHECK_EQ(api.get_host(1, 1, ip, port), lars::RET_SYSTEM_ERROR);
        CHECK_EQ(api.reg_init(1, 1), lars::RET_SYSTEM_ERROR);
    }
}

int main(int argc, char** argv) { return lars_test::run_all(argc, argv); }
