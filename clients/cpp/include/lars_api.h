// The original Lars C++ API (api/cpp/lars_api/lars_api.h), on the new protocol.
//
// Existing code keeps its calls: `lars_client api; api.reg_init(modid, cmdid);
// api.get_host(modid, cmdid, ip, port); api.report(modid, cmdid, ip, port, retcode);
// api.get_route(modid, cmdid, route);` and the return codes lars::RET_SUCC, RET_OVERLOAD,
// RET_SYSTEM_ERROR, RET_NOEXIST. Differences from the original, all deliberate:
//
// * No reactor or protobuf headers: include this file and link the lars_client library.
// * A request that gets no answer returns RET_SYSTEM_ERROR after timeout x (retries + 1)
//   instead of blocking for ever; stale replies are discarded by sequence number.
// * A lars_client may be shared between threads (see lars/client.hpp).
// * reg_init retries like lars::Client::reg_init (10 x 200 ms while NoRoute).
// * Negative ids are refused with RET_BAD_REQUEST (the wire carries unsigned 32-bit ids;
//   ids above INT_MAX need lars::Client).
// * get_route appends to `route`, as the original did; it leaves `route` as it was on error.
//
// The modern API, lars::Client (std::optional, typed exceptions), is in lars/client.hpp;
// lars_client::client() gives the one behind a lars_client.
#pragma once

#include <lars/client.hpp>

#include <memory>
#include <string>
#include <utility>
#include <vector>

typedef std::pair<std::string, int> ip_port;
typedef std::vector<ip_port> route_set;
typedef route_set::iterator route_set_it;

namespace lars {
/// The original return codes (lars.proto's LarsRetCode), plus BAD_REQUEST.
enum LarsRetCode {
    RET_SUCC = 0,
    RET_OVERLOAD = 1,
    RET_SYSTEM_ERROR = 2,
    RET_NOEXIST = 3,
    RET_BAD_REQUEST = 4,
};
}  // namespace lars

class lars_client {
public:
    /// The agent on 127.0.0.1, ports 8888-8890, as the original.
    lars_client();
    /// Another agent address, ports, timeout or retries.
    explicit lars_client(const lars::Options& options);
    ~lars_client();

    /// Register a module at start-up (first pull of its route). RET_SUCC, RET_NOEXIST, or
    /// RET_SYSTEM_ERROR if the agent does not answer.
    int reg_init(int modid, int cmdid);

    /// One host of the module into ip and port. RET_SUCC, RET_OVERLOAD, RET_NOEXIST,
    /// RET_SYSTEM_ERROR (no answer), or the agent's code for a rejected request.
    int get_host(int modid, int cmdid, std::string& ip, int& port);

    /// Report the result of a call to ip:port (retcode 0 success, else failure).
    void report(int modid, int cmdid, const std::string& ip, int port, int retcode);

    /// Every host of the module, appended to route. Codes as get_host.
    int get_route(int modid, int cmdid, route_set& route);

    /// The modern client behind this one.
    lars::Client& client() { return *client_; }

private:
    std::unique_ptr<lars::Client> client_;
};
