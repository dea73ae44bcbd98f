#include "lars_api.h"

namespace {

/// Run a call of the modern client and turn its errors into the original return codes.
template <class F>
int retcode_of(F&& f) {
    try {
        f();
        return lars::RET_SUCC;
    } catch (const lars::NoRoute&) {
        return lars::RET_NOEXIST;
    } catch (const lars::Overloaded&) {
        return lars::RET_OVERLOAD;
    } catch (const lars::RequestRejected& exc) {
        return static_cast<int>(exc.code());
    } catch (const lars::InvalidValue&) {
        return lars::RET_BAD_REQUEST;
    } catch (const lars::LarsError&) {  // AgentUnavailable
        return lars::RET_SYSTEM_ERROR;
    }
}

bool valid_ids(int modid, int cmdid) { return modid >= 0 && cmdid >= 0; }

}  // namespace

lars_client::lars_client() : client_(std::make_unique<lars::Client>()) {}

lars_client::lars_client(const lars::Options& options)
    : client_(std::make_unique<lars::Client>(options)) {}

lars_client::~lars_client() = default;

int lars_client::reg_init(int modid, int cmdid) {
    if (!valid_ids(modid, cmdid)) {
        return lars::RET_BAD_REQUEST;
    }
    return retcode_of([&] {
        client_->reg_init(static_cast<std::uint32_t>(modid), static_cast<std::uint32_t>(cmdid));
    });
}

int lars_client::get_host(int modid, int cmdid, std::string& ip, int& port) {
    if (!valid_ids(modid, cmdid)) {
        return lars::RET_BAD_REQUEST;
    }
    return retcode_of([&] {
        lars::Host host = client_->get_host(static_cast<std::uint32_t>(modid),
                                            static_cast<std::uint32_t>(cmdid));
        ip = std::move(host.ip);
        port = host.port;
    });
}

void lars_client::report(int modid, int cmdid, const std::string& ip, int port, int retcode) {
    if (!valid_ids(modid, cmdid) || port < 1 || port > 65535) {
        return;
    }
    try {
        client_->report(static_cast<std::uint32_t>(modid), static_cast<std::uint32_t>(cmdid),
                        lars::Host{ip, static_cast<std::uint16_t>(port)},
                        static_cast<std::uint32_t>(retcode));
    } catch (const lars::LarsError&) {  // a bad ip: the original sent garbage, we send nothing
    }
}

int lars_client::get_route(int modid, int cmdid, route_set& route) {
    if (!valid_ids(modid, cmdid)) {
        return lars::RET_BAD_REQUEST;
    }
    return retcode_of([&] {
        for (auto& host : client_->get_route(static_cast<std::uint32_t>(modid),
                                             static_cast<std::uint32_t>(cmdid))) {
            route.emplace_back(std::move(host.ip), host.port);
        }
    });
}
