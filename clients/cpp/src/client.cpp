#include "lars/client.hpp"

#include <algorithm>
#include <arpa/inet.h>
#include <cerrno>
#include <cstring>
#include <netdb.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <thread>
#include <unistd.h>

namespace lars {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::microseconds;

/// How much later than its deadline a receive may end before we shorten SO_RCVTIMEO
/// (setting it costs a system call; the first receive of an attempt is always a little
/// shorter than the full timeout).
constexpr microseconds RCVTIMEO_SLACK{1000};
/// After a poll that ran out, a socket answers this many calls without polling, doubled for
/// each further one in a row up to SPIN_SKIP_MAX (as lars.client).
constexpr unsigned SPIN_SKIP = 16;
constexpr unsigned SPIN_SKIP_MAX = 4096;

const char* retcode_name(std::uint32_t code) {
    switch (code) {
        case retcode::SUCC: return "SUCC";
        case retcode::OVERLOAD: return "OVERLOAD";
        case retcode::SYSTEM_ERROR: return "SYSTEM_ERROR";
        case retcode::NOEXIST: return "NOEXIST";
        case retcode::BAD_REQUEST: return "BAD_REQUEST";
        default: return nullptr;
    }
}

[[noreturn]] void raise_for(std::uint32_t code, std::uint32_t modid, std::uint32_t cmdid) {
    const std::string module = std::to_string(modid) + "/" + std::to_string(cmdid);
    if (code == retcode::NOEXIST) {
        throw NoRoute("no route for module " + module);
    }
    if (code == retcode::OVERLOAD) {
        throw Overloaded("every host of module " + module + " is overloaded");
    }
    const char* name = retcode_name(code);
    throw RequestRejected(
        std::string("agent answered ") + (name ? name : std::to_string(code).c_str()),
        code == retcode::SUCC ? retcode::SYSTEM_ERROR : code);
}

[[noreturn]] void raise_unexpected(const wire::Reply& reply) {
    if (const auto* error = std::get_if<wire::ErrorReply>(&reply)) {
        throw RequestRejected("agent rejected the request: " + error->reason,
                              error->code == retcode::SUCC ? retcode::SYSTEM_ERROR : error->code);
    }
    std::uint32_t type = 0;
    if (std::holds_alternative<wire::GetHostResponse>(reply)) {
        type = wire::GET_HOST_RESPONSE;
    } else if (std::holds_alternative<wire::GetRouteResponse>(reply)) {
        type = wire::API_GET_ROUTE_RESPONSE;
    } else {
        type = std::get<wire::OtherReply>(reply).type;
    }
    throw RequestRejected("unexpected reply from the agent: message type " + std::to_string(type),
                          retcode::SYSTEM_ERROR);
}

Host to_host(wire::HostKey key) { return Host{wire::format_ip(key.ip), key.port}; }

std::string seconds(microseconds us) {
    char text[32];
    std::snprintf(text, sizeof text, "%g", static_cast<double>(us.count()) / 1e6);
    return text;
}

timeval to_timeval(microseconds us) {
    timeval tv{};
    tv.tv_sec = static_cast<time_t>(us.count() / 1000000);
    tv.tv_usec = static_cast<suseconds_t>(us.count() % 1000000);
    return tv;
}

}  // namespace

Host Host::parse(std::string_view text) {
    const auto colon = text.rfind(':');
    if (colon == std::string_view::npos || !wire::parse_ip(text.substr(0, colon))) {
        throw InvalidValue("not IP:PORT: " + std::string(text));
    }
    const std::string_view digits = text.substr(colon + 1);
    unsigned long port = 0;
    if (digits.empty() || digits.size() > 5) {
        throw InvalidValue("not IP:PORT: " + std::string(text));
    }
    for (char c : digits) {
        if (c < '0' || c > '9') {
            throw InvalidValue("not IP:PORT: " + std::string(text));
        }
        port = port * 10 + static_cast<unsigned long>(c - '0');
    }
    if (port < 1 || port > 65535) {
        throw InvalidValue("port must be from 1 to 65535: " + std::string(text));
    }
    return Host{std::string(text.substr(0, colon)), static_cast<std::uint16_t>(port)};
}

namespace detail {

Host host_result(const wire::Reply& reply, std::uint32_t modid, std::uint32_t cmdid) {
    if (const auto* r = std::get_if<wire::GetHostResponse>(&reply)) {
        if (r->retcode == retcode::SUCC && r->host) {
            return to_host(*r->host);
        }
        raise_for(r->retcode, modid, cmdid);
    }
    raise_unexpected(reply);
}

std::vector<Host> route_result(const wire::Reply& reply, std::uint32_t modid,
                               std::uint32_t cmdid) {
    if (const auto* r = std::get_if<wire::GetRouteResponse>(&reply)) {
        if (r->retcode == retcode::SUCC) {
            std::vector<Host> hosts;
            hosts.reserve(r->hosts.size());
            for (const auto& key : r->hosts) {
                hosts.push_back(to_host(key));
            }
            return hosts;
        }
        raise_for(r->retcode, modid, cmdid);
    }
    raise_unexpected(reply);
}

}  // namespace detail

// --- sockets -------------------------------------------------------------------------------

/// One connected UDP socket to one agent port, used by one call at a time.
struct Client::Socket {
    int fd = -1;
    microseconds rcvtimeo{0};  // what SO_RCVTIMEO is set to now
    std::unique_ptr<char[]> buffer{new char[wire::RECEIVE_SIZE]};
    unsigned skip = 0;    // calls left to answer without polling
    unsigned misses = 0;  // polls in a row that ran out

    /// Poll for a datagram for up to `budget`: its size, or -1 (errno set) when none came.
    ssize_t poll_receive(microseconds budget) {
        if (budget.count() <= 0 || skip > 0) {
            if (skip > 0) {
                --skip;
            }
            errno = EAGAIN;
            return -1;
        }
        const auto until = Clock::now() + budget;
        for (;;) {
            const ssize_t size = ::recv(fd, buffer.get(), wire::RECEIVE_SIZE, MSG_DONTWAIT);
            if (size >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
                misses = 0;
                return size;
            }
            if (Clock::now() >= until) {
                break;
            }
            ::sched_yield();  // a polling client must not keep a busy agent from running
        }
        ++misses;
        skip = std::min(SPIN_SKIP << std::min(misses, 12u), SPIN_SKIP_MAX);
        errno = EAGAIN;
        return -1;
    }

    ~Socket() {
        if (fd >= 0) {
            ::close(fd);
        }
    }

    void set_rcvtimeo(microseconds timeout) {
        const timeval tv = to_timeval(timeout);
        if (::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0) {
            rcvtimeo = timeout;
        }
    }
};

/// A socket borrowed from the pool for the length of one call.
class Client::Lease {
public:
    Lease(Client& client, std::uint16_t port)
        : client_(client), port_(port), socket_(client.take(port)) {}
    ~Lease() { client_.give_back(port_, std::move(socket_)); }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    Socket& operator*() const { return *socket_; }

private:
    Client& client_;
    std::uint16_t port_;
    std::unique_ptr<Socket> socket_;
};

Client::Client(Options options)
    : options_(std::move(options)),
      address_(0),
      seq_(static_cast<std::uint32_t>(::getpid()) & 0xFFFF) {
    if (options_.ports < 1 || options_.base_port < 1 ||
        std::uint64_t{options_.base_port} + options_.ports - 1 > 65535) {
        throw InvalidValue("bad agent ports: base_port=" + std::to_string(options_.base_port) +
                           " ports=" + std::to_string(options_.ports));
    }
    if (options_.timeout.count() <= 0) {
        throw InvalidValue("timeout must be > 0");
    }
    addrinfo hints{};
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_DGRAM;
    addrinfo* found = nullptr;
    if (::getaddrinfo(options_.host.c_str(), nullptr, &hints, &found) != 0 || found == nullptr) {
        throw InvalidValue("cannot resolve the agent host " + options_.host);
    }
    address_ = reinterpret_cast<sockaddr_in*>(found->ai_addr)->sin_addr.s_addr;
    ::freeaddrinfo(found);
    pool_.resize(options_.ports);
}

Client::~Client() = default;

std::unique_ptr<Client::Socket> Client::take(std::uint16_t port) {
    const std::size_t index = port - options_.base_port;
    {
        std::lock_guard<std::mutex> lock(pool_mutex_);
        auto& idle = pool_[index];
        if (!idle.empty()) {
            auto socket = std::move(idle.back());
            idle.pop_back();
            return socket;
        }
    }
    auto socket = std::make_unique<Socket>();
    socket->fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (socket->fd < 0) {
        throw AgentUnavailable(std::string("cannot open a UDP socket: ") + std::strerror(errno));
    }
    sockaddr_in agent{};
    agent.sin_family = AF_INET;
    agent.sin_port = htons(port);
    agent.sin_addr.s_addr = address_;
    if (::connect(socket->fd, reinterpret_cast<const sockaddr*>(&agent), sizeof agent) != 0) {
        throw AgentUnavailable("cannot reach the agent at " + options_.host + ":" +
                               std::to_string(port) + ": " + std::strerror(errno));
    }
    socket->set_rcvtimeo(options_.timeout);
    return socket;
}

void Client::give_back(std::uint16_t port, std::unique_ptr<Socket> socket) noexcept {
    if (!socket) {
        return;
    }
    try {
        std::lock_guard<std::mutex> lock(pool_mutex_);
        pool_[port - options_.base_port].push_back(std::move(socket));
    } catch (...) {  // no memory to keep it: close it
    }
}

// --- requests ------------------------------------------------------------------------------

wire::Reply Client::exchange(std::uint32_t modid, std::uint32_t cmdid, std::uint32_t seq,
                             const std::string& request) {
    const std::uint16_t agent_port = port(modid, cmdid);
    Lease lease(*this, agent_port);
    Socket& socket = *lease;
    for (unsigned attempt = 0; attempt <= options_.retries; ++attempt) {
        const auto deadline = Clock::now() + options_.timeout;
        bool refused = false;
        if (::send(socket.fd, request.data(), request.size(), 0) < 0) {
            // ECONNREFUSED: an earlier datagram met a closed port. Anything else (a full
            // buffer, an interrupted call): the attempt is lost, as a lost datagram would be.
            refused = true;
        }
        bool polled = false;
        while (!refused) {
            if (!polled) {  // the first receive of the attempt: poll for the answer first
                polled = true;
                const ssize_t size = socket.poll_receive(options_.busy_poll);
                if (size >= 0) {
                    auto reply =
                        wire::decode_reply(socket.buffer.get(), static_cast<std::size_t>(size));
                    if (reply && wire::reply_seq(*reply) == seq) {
                        return std::move(*reply);
                    }
                    continue;  // garbage, or a late reply to an earlier request
                }
                if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                    refused = true;  // ECONNREFUSED: nothing listens on the port (yet)
                    break;
                }
            }
            const auto remaining =
                std::chrono::duration_cast<microseconds>(deadline - Clock::now());
            if (remaining.count() <= 0) {
                break;
            }
            if (remaining + RCVTIMEO_SLACK < socket.rcvtimeo || remaining > socket.rcvtimeo) {
                socket.set_rcvtimeo(remaining);
            }
            const ssize_t size = ::recv(socket.fd, socket.buffer.get(), wire::RECEIVE_SIZE, 0);
            if (size < 0) {
                if (errno == EINTR) {
                    continue;
                }
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    break;  // SO_RCVTIMEO ran out: the attempt is over
                }
                refused = true;  // ECONNREFUSED: nothing listens on the port (yet)
                break;
            }
            auto reply = wire::decode_reply(socket.buffer.get(), static_cast<std::size_t>(size));
            if (reply && wire::reply_seq(*reply) == seq) {
                return std::move(*reply);
            }
            // garbage, or a late reply to an earlier request: keep waiting
        }
        if (refused) {
            std::this_thread::sleep_until(deadline);  // wait the attempt out, then resend
        }
    }
    throw AgentUnavailable("no answer from the agent at " + options_.host + ":" +
                           std::to_string(agent_port) + " after " +
                           std::to_string(options_.retries + 1) + " attempts of " +
                           seconds(options_.timeout) + "s");
}

Host Client::get_host(std::uint32_t modid, std::uint32_t cmdid) {
    const std::uint32_t seq = next_seq();
    const auto reply = exchange(modid, cmdid, seq, wire::encode_get_host_request(seq, modid, cmdid));
    return detail::host_result(reply, modid, cmdid);
}

std::optional<Host> Client::try_get_host(std::uint32_t modid, std::uint32_t cmdid) {
    try {
        return get_host(modid, cmdid);
    } catch (const NoRoute&) {
        return std::nullopt;
    } catch (const Overloaded&) {
        return std::nullopt;
    }
}

std::vector<Host> Client::get_route(std::uint32_t modid, std::uint32_t cmdid) {
    const std::uint32_t seq = next_seq();
    const auto reply =
        exchange(modid, cmdid, seq, wire::encode_get_route_request(seq, modid, cmdid));
    return detail::route_result(reply, modid, cmdid);
}

std::vector<Host> Client::reg_init(std::uint32_t modid, std::uint32_t cmdid) {
    for (int attempt = 1;; ++attempt) {
        try {
            return get_route(modid, cmdid);
        } catch (const NoRoute&) {
            if (attempt == REG_INIT_ATTEMPTS) {
                throw;
            }
        }
        std::this_thread::sleep_for(REG_INIT_PAUSE);
    }
}

void Client::report(std::uint32_t modid, std::uint32_t cmdid, const Host& host,
                    std::uint32_t retcode) {
    const auto ip = wire::parse_ip(host.ip);
    if (!ip) {
        throw InvalidValue("not an IPv4 address: '" + host.ip + "'");
    }
    if (host.port == 0) {
        throw InvalidValue("port must be from 1 to 65535, got 0");
    }
    const std::string request = wire::encode_report_request(modid, cmdid, {*ip, host.port}, retcode);
    try {
        Lease lease(*this, port(modid, cmdid));
        // Best effort, like the original's: an error (no agent) loses this report only.
        (void)::send((*lease).fd, request.data(), request.size(), MSG_DONTWAIT);
    } catch (const AgentUnavailable&) {  // no socket to send it from: no report
    }
}

}  // namespace lars
