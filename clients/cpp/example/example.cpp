// The original Lars API example (api/cpp/example/example.cpp), unchanged but for the includes
// the reactor headers used to bring in: existing code builds against lars_api.h as it was.
//
//   example MODID CMDID [BASE_PORT]
#include "lars_api.h"
#include <cstdio>
#include <cstdlib>
#include <iostream>

void usage()
{
    printf("usage: ./example [modid] [cmdid] [base_port]\n");
}

int main(int argc, char **argv)
{
    int ret = 0;

    if (argc != 3 && argc != 4) {
        usage();
        return 1;
    }

    int modid = atoi(argv[1]);
    int cmdid = atoi(argv[2]);
    lars::Options options;
    if (argc == 4) {
        options.base_port = static_cast<std::uint16_t>(atoi(argv[3]));
    }
    lars_client api(options);

    std::string ip;
    int port;

    // 1. register the module (once)
    ret = api.reg_init(modid, cmdid);
    if (ret != 0) {
        std::cout << "modid " << modid << ", cmdid " << cmdid << " still not exist host, after register, ret = " << ret << std::endl;
    }

    // 2. every host of the module
    route_set route;
    ret = api.get_route(modid, cmdid, route);
    if (ret == 0) {
        std::cout << "get route succ!" << std::endl;
        for (route_set_it it = route.begin(); it != route.end(); it++) {
            std::cout << "ip = " << (*it).first << ", port = " << (*it).second << std::endl;
        }
    }

    // 3. one host
    ret = api.get_host(modid, cmdid, ip, port);

    std::string result = (ret == 0)? "SUCC" :"OVERLOAD";

    if (ret == 0) {
        std::cout << "host is " << ip << ":" << port << std::endl;
        api.report(modid, cmdid, ip, port, 0);
        std::cout << "report modid = " << modid << ", cmdid = " << cmdid << " | " <<  ip << ":" << port << " " << result << std::endl;
    }

    return 0;
}
