// The README's lars::Client example, built so that it stays true.
//
//   modern MODID CMDID [BASE_PORT]
#include <lars/client.hpp>

#include <cstdlib>
#include <iostream>

static bool call_the_service(const std::string&, int) { return true; }

int main(int argc, char** argv) {
    if (argc != 3 && argc != 4) {
        std::cerr << "usage: modern MODID CMDID [BASE_PORT]" << std::endl;
        return 2;
    }
    const auto modid = static_cast<std::uint32_t>(std::strtoul(argv[1], nullptr, 10));
    const auto cmdid = static_cast<std::uint32_t>(std::strtoul(argv[2], nullptr, 10));
    lars::Options options;
    if (argc == 4) options.base_port = static_cast<std::uint16_t>(std::atoi(argv[3]));
    lars::Client client(options);
    try {
        client.reg_init(modid, cmdid);  // preload a module at start-up
        lars::Host host = client.get_host(modid, cmdid);
        bool ok = call_the_service(host.ip, host.port);
        client.report(modid, cmdid, host, ok ? lars::Outcome::ok : lars::Outcome::failed);
        std::cout << "host " << host << std::endl;
        if (auto again = client.try_get_host(modid, cmdid)) std::cout << "then " << *again << std::endl;
        for (const auto& h : client.get_route(modid, cmdid)) std::cout << "route " << h << std::endl;
        int n = client.call(modid, cmdid, [](const lars::Host&) { return 42; });
        std::cout << "call returned " << n << std::endl;
    } catch (const lars::NoRoute& exc) {
        std::cerr << "no route: " << exc.what() << std::endl;
        return 1;
    } catch (const lars::LarsError& exc) {  // Overloaded, AgentUnavailable, RequestRejected
        std::cerr << exc.what() << std::endl;
        return 1;
    }
    return 0;
}
