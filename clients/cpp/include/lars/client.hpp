// lars::Client: ask the local Lars agent for hosts and report call results (C++17).
//
//     #include <lars/client.hpp>
//
//     lars::Client client;                           // agent on 127.0.0.1, ports 8888-8890
//     lars::Host host = client.get_host(1, 1);       // throws NoRoute, Overloaded, ...
//     client.report(1, 1, host, lars::Outcome::ok);  // or a retcode: 0 success, else failure
//     std::vector<lars::Host> all = client.get_route(1, 1);
//     client.reg_init(1, 1);                         // preload a module at start-up
//     if (auto h = client.try_get_host(1, 1)) { ... }  // nullopt: no route or overloaded
//     client.call(1, 1, [](const lars::Host& h) { ... });  // reports ok, or failed if it throws
//
// The behaviour is the Python client's (lars/client.py, DESIGN.md §8): the module is served
// on base_port + (modid + cmdid) % ports; each request carries a fresh sequence number and
// every attempt waits `timeout` for the reply to that number (replies to earlier requests
// are discarded); `retries` more attempts resend the same request with the same number;
// no reply at all is AgentUnavailable after timeout x (retries + 1). A report is one
// datagram, best effort: no agent, no report, no error.
//
// Thread safety: a Client may be shared by any number of threads. Each call borrows a UDP
// socket for its port from a pool (a mutex guards only the pool) and has it to itself until
// it returns, so concurrent calls never read each other's replies; the pool grows to the
// number of calls in flight at once. One thread alone uses one socket per port.
#pragma once

#include <lars/wire.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace lars {

// --- errors: one root, as lars.errors ------------------------------------------------------

/// Root of every error the client throws on purpose.
class LarsError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// A local mistake: a bad option, an IP address that is not dotted IPv4 text.
class InvalidValue : public LarsError {
public:
    using LarsError::LarsError;
};

/// The module has no route: it does not exist, or the agent has not received it yet.
class NoRoute : public LarsError {
public:
    using LarsError::LarsError;
};

/// Every host of the module is overloaded; the agent gave no host this time.
class Overloaded : public LarsError {
public:
    using LarsError::LarsError;
};

/// The agent did not answer within timeout x (retries + 1), or cannot be reached.
class AgentUnavailable : public LarsError {
public:
    using LarsError::LarsError;
};

/// The agent answered with an error (an invalid request, an internal error) or with a reply
/// of the wrong kind. `code()` is the agent's return code (SYSTEM_ERROR if it gave none).
class RequestRejected : public LarsError {
public:
    RequestRejected(const std::string& what, std::uint32_t code) : LarsError(what), code_(code) {}
    std::uint32_t code() const noexcept { return code_; }

private:
    std::uint32_t code_;
};

// --- values --------------------------------------------------------------------------------

/// One node of a route: dotted IPv4 address and port.
struct Host {
    std::string ip;
    std::uint16_t port = 0;

    /// "ip:port".
    std::string to_string() const { return ip + ":" + std::to_string(port); }
    /// Parse "ip:port"; throws InvalidValue.
    static Host parse(std::string_view text);

    friend bool operator==(const Host& a, const Host& b) {
        return a.port == b.port && a.ip == b.ip;
    }
    friend bool operator!=(const Host& a, const Host& b) { return !(a == b); }
    friend bool operator<(const Host& a, const Host& b) {
        return a.ip != b.ip ? a.ip < b.ip : a.port < b.port;
    }
};

inline std::ostream& operator<<(std::ostream& out, const Host& host) {
    return out << host.ip << ':' << host.port;
}

/// How a call to a host ended, for report().
enum class Outcome { ok, failed };

/// Where the agent is and how long to wait for it (the defaults of lars.toml's [agent] and
/// [client] sections).
struct Options {
    std::string host = "127.0.0.1";
    std::uint16_t base_port = 8888;
    std::uint32_t ports = 3;
    std::chrono::microseconds timeout = std::chrono::milliseconds(250);  // per attempt
    unsigned retries = 2;  // attempts after the first
    /// How long a call polls for the agent's answer before it blocks (as lars.client's
    /// busy_poll): a local agent usually answers within it, and a thread that does not
    /// sleep does not pay the wake-up. A socket whose polls keep running out stops
    /// polling for a while. Zero turns it off.
    std::chrono::microseconds busy_poll{100};
};

/// reg_init: attempts while the agent answers NoRoute, and the pause between them.
inline constexpr int REG_INIT_ATTEMPTS = 10;
inline constexpr std::chrono::milliseconds REG_INIT_PAUSE{200};

namespace detail {
/// The host of a reply to get_host, or the error it stands for (sans-IO, as
/// ClientCore.host_result).
Host host_result(const wire::Reply& reply, std::uint32_t modid, std::uint32_t cmdid);
/// The hosts of a reply to get_route, or the error it stands for.
std::vector<Host> route_result(const wire::Reply& reply, std::uint32_t modid,
                               std::uint32_t cmdid);
}  // namespace detail

// --- the client ----------------------------------------------------------------------------

class Client {
public:
    /// A client of the agent described by `options`; throws InvalidValue for bad options
    /// (no socket is opened before the first call).
    explicit Client(Options options = Options());
    ~Client();
    Client(const Client&) = delete;
    Client& operator=(const Client&) = delete;

    /// One healthy host of the module. Throws NoRoute, Overloaded, AgentUnavailable,
    /// RequestRejected.
    Host get_host(std::uint32_t modid, std::uint32_t cmdid);

    /// get_host, with nullopt instead of NoRoute or Overloaded ("no host this time"); the
    /// other errors are still thrown.
    std::optional<Host> try_get_host(std::uint32_t modid, std::uint32_t cmdid);

    /// Every host of the module (NoRoute if it has none).
    std::vector<Host> get_route(std::uint32_t modid, std::uint32_t cmdid);

    /// Preload a module at start-up: get_route, retried while the agent answers NoRoute (its
    /// DNS may not have answered yet), REG_INIT_ATTEMPTS times REG_INIT_PAUSE apart. No
    /// answer at all is AgentUnavailable at once.
    std::vector<Host> reg_init(std::uint32_t modid, std::uint32_t cmdid);

    /// Report how a call to `host` ended: retcode 0 is a success, anything else a failure.
    /// Best effort: never waits, never fails for want of an agent. Throws InvalidValue if
    /// host.ip is not dotted IPv4 text or host.port is 0.
    void report(std::uint32_t modid, std::uint32_t cmdid, const Host& host, std::uint32_t retcode);
    void report(std::uint32_t modid, std::uint32_t cmdid, const Host& host, Outcome outcome) {
        report(modid, cmdid, host, outcome == Outcome::ok ? 0u : 1u);
    }
    /// A bool would silently become retcode 0 or 1 (true = failure): say Outcome instead.
    template <class T, std::enable_if_t<std::is_same_v<T, bool>, int> = 0>
    void report(std::uint32_t, std::uint32_t, const Host&, T) = delete;

    /// Get a host, call f(host), report ok when it returns and failed when it throws (then
    /// rethrow). Returns what f returns.
    template <class F>
    auto call(std::uint32_t modid, std::uint32_t cmdid, F&& f)
        -> std::invoke_result_t<F, const Host&>;

    /// The agent port that serves the module.
    std::uint16_t port(std::uint32_t modid, std::uint32_t cmdid) const noexcept {
        return wire::port_for(options_.base_port, options_.ports, modid, cmdid);
    }

    const Options& options() const noexcept { return options_; }

private:
    struct Socket;
    class Lease;

    std::uint32_t next_seq() noexcept { return seq_.fetch_add(1, std::memory_order_relaxed); }
    wire::Reply exchange(std::uint32_t modid, std::uint32_t cmdid, std::uint32_t seq,
                         const std::string& request);
    std::unique_ptr<Socket> take(std::uint16_t port);
    void give_back(std::uint16_t port, std::unique_ptr<Socket> socket) noexcept;

    Options options_;
    std::uint32_t address_;  // the agent's IPv4 address, network order
    std::atomic<std::uint32_t> seq_;
    std::mutex pool_mutex_;
    std::vector<std::vector<std::unique_ptr<Socket>>> pool_;  // idle sockets, by port index
};

template <class F>
auto Client::call(std::uint32_t modid, std::uint32_t cmdid, F&& f)
    -> std::invoke_result_t<F, const Host&> {
    using Result = std::invoke_result_t<F, const Host&>;
    const Host host = get_host(modid, cmdid);
    if constexpr (std::is_void_v<Result>) {
        try {
            std::forward<F>(f)(host);
        } catch (...) {
            report(modid, cmdid, host, Outcome::failed);
            throw;
        }
        report(modid, cmdid, host, Outcome::ok);
    } else {
        std::optional<Result> result;
        try {
            result.emplace(std::forward<F>(f)(host));
        } catch (...) {
            report(modid, cmdid, host, Outcome::failed);
            throw;
        }
        report(modid, cmdid, host, Outcome::ok);
        return std::move(*result);
    }
}

}  // namespace lars
