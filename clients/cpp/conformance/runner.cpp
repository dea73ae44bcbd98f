// The C++ runner of the client conformance scenario: clients/conformance/README.md.
// It does exactly what tests/conformance_runner.py does, with lars::Client.
//
//   conformance_runner --scenario clients/conformance/scenario.json --base-port N
//                      --dead-base-port M [--host 127.0.0.1] [--module-offset K]
//
// One JSON line per step, then {"passed": N, "failed": M}; exit 1 if a step failed.
#include <lars/client.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

// ordered_json: the lines keep their keys in the order written, as the Python runner's.
using json = nlohmann::ordered_json;

namespace {

/// The name of a client error, as the scenario spells it (the Python class names).
template <class F>
json outcome_of(F&& f) {
    try {
        return f();
    } catch (const lars::NoRoute&) {
        return "NoRoute";
    } catch (const lars::Overloaded&) {
        return "Overloaded";
    } catch (const lars::AgentUnavailable&) {
        return "AgentUnavailable";
    } catch (const lars::RequestRejected&) {
        return "RequestRejected";
    } catch (const lars::InvalidValue&) {
        return "InvalidValue";
    }
}

json sorted_hosts(const std::vector<lars::Host>& hosts) {
    std::vector<std::string> names;
    for (const auto& h : hosts) names.push_back(h.to_string());
    std::sort(names.begin(), names.end());
    return names;
}

std::string format_seconds(double s) {
    std::ostringstream out;
    out.precision(4);
    out << std::fixed << s;
    return out.str();
}

/// What is wrong with a step's outcomes (empty: it passed).
std::vector<std::string> check(const json& expect, const std::vector<json>& outcomes,
                               double elapsed) {
    std::vector<std::string> problems;
    if (expect.contains("counts")) {
        std::map<std::string, long> got;
        for (const auto& o : outcomes) got[o.is_string() ? o.get<std::string>() : o.dump()] += 1;
        std::map<std::string, long> want;
        for (const auto& [k, v] : expect["counts"].items()) want[k] = v.get<long>();
        if (got != want) problems.push_back("counts " + json(got).dump() + " != " + json(want).dump());
    }
    if (expect.contains("one_of")) {
        for (const auto& o : outcomes) {
            const auto& allowed = expect["one_of"];
            if (std::find(allowed.begin(), allowed.end(), o) == allowed.end()) {
                problems.push_back("outcome " + o.dump() + " is not one of " + allowed.dump());
            }
        }
    }
    if (expect.contains("period")) {
        const std::size_t p = expect["period"];
        for (std::size_t i = 0; i + p < outcomes.size(); ++i) {
            if (outcomes[i] != outcomes[i + p]) {
                problems.push_back("not periodic with period " + std::to_string(p) + ": outcome " +
                                   std::to_string(i) + " != " + std::to_string(i + p));
                break;
            }
        }
    }
    if (expect.contains("spacing")) {
        for (const auto& [value, gap] : expect["spacing"].items()) {
            std::vector<std::size_t> where;
            for (std::size_t i = 0; i < outcomes.size(); ++i) {
                if (outcomes[i] == json(value)) where.push_back(i);
            }
            bool ok = where.size() >= 2;
            for (std::size_t i = 1; ok && i < where.size(); ++i) {
                ok = where[i] - where[i - 1] == gap.get<std::size_t>();
            }
            if (!ok) problems.push_back(value + " at " + json(where).dump() + ": not every " + gap.dump());
        }
    }
    if (expect.contains("hosts")) {
        std::vector<std::string> want = expect["hosts"];
        std::sort(want.begin(), want.end());
        for (const auto& o : outcomes) {
            if (o != json(want)) problems.push_back("hosts " + o.dump() + " != " + json(want).dump());
        }
    }
    if (expect.contains("error")) {
        for (const auto& o : outcomes) {
            if (o != expect["error"]) problems.push_back(o.dump() + " instead of " + expect["error"].dump());
        }
    }
    if (expect.contains("port_index")) {
        for (const auto& o : outcomes) {
            if (o != expect["port_index"]) problems.push_back("port index " + o.dump() + " != " + expect["port_index"].dump());
        }
    }
    if (expect.contains("elapsed")) {
        const double low = expect["elapsed"].value("min", 0.0);
        const double high = expect["elapsed"].value("max", HUGE_VAL);
        if (elapsed < low || elapsed > high) {
            problems.push_back("took " + format_seconds(elapsed) + "s, not within [" +
                               json(low).dump() + ", " + json(high).dump() + "]");
        }
    }
    return problems;
}

json run_step(const json& step, std::map<std::string, std::unique_ptr<lars::Client>>& clients,
              std::uint32_t offset) {
    const std::string op = step["op"];
    lars::Client& client = *clients.at(step.value("agent", std::string("live")));
    std::uint32_t modid = 0, cmdid = 0;
    if (step.contains("module")) {
        modid = step["module"][0];
        cmdid = step["module"][1];
    }
    if (op != "port") modid += offset;
    std::vector<json> outcomes;
    const auto began = std::chrono::steady_clock::now();
    const int repeat = step.value("repeat", 1);
    for (int i = 0; i < repeat; ++i) {
        if (op == "get_host") {
            outcomes.push_back(outcome_of([&] { return json(client.get_host(modid, cmdid).to_string()); }));
        } else if (op == "get_route") {
            outcomes.push_back(outcome_of([&] { return sorted_hosts(client.get_route(modid, cmdid)); }));
        } else if (op == "reg_init") {
            outcomes.push_back(outcome_of([&] { return sorted_hosts(client.reg_init(modid, cmdid)); }));
        } else if (op == "report") {
            outcomes.push_back(outcome_of([&] {
                client.report(modid, cmdid, lars::Host::parse(step["host"].get<std::string>()),
                              step["retcode"].get<std::uint32_t>());
                return json("ok");
            }));
        } else if (op == "port") {
            outcomes.push_back(client.port(modid, cmdid) - client.options().base_port);
        } else {
            std::cerr << "unknown op " << op << " in step " << step["name"] << std::endl;
            std::exit(2);
        }
    }
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
    const auto problems = check(step.value("expect", json::object()), outcomes, elapsed);
    return {{"name", step["name"]},
            {"ok", problems.empty()},
            {"elapsed", std::round(elapsed * 10000) / 10000},
            {"outcomes", outcomes},
            {"problems", problems}};
}

[[noreturn]] void usage(const std::string& problem) {
    std::cerr << "conformance_runner: " << problem
              << "\nusage: conformance_runner --scenario FILE --base-port N --dead-base-port M "
                 "[--host H] [--module-offset K]"
              << std::endl;
    std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
    std::string scenario_path, host = "127.0.0.1";
    long base_port = -1, dead_base_port = -1, offset = 0;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        if (i + 1 >= argc) usage("missing value for " + arg);
        const std::string value = argv[++i];
        if (arg == "--scenario") scenario_path = value;
        else if (arg == "--host") host = value;
        else if (arg == "--base-port") base_port = std::stol(value);
        else if (arg == "--dead-base-port") dead_base_port = std::stol(value);
        else if (arg == "--module-offset") offset = std::stol(value);
        else usage("unknown argument " + arg);
    }
    if (scenario_path.empty() || base_port < 0 || dead_base_port < 0) {
        usage("--scenario, --base-port and --dead-base-port are required");
    }
    std::ifstream in(scenario_path);
    if (!in) usage("cannot read " + scenario_path);
    const json scenario = json::parse(in);
    const json& settings = scenario["client"];

    std::map<std::string, std::unique_ptr<lars::Client>> clients;
    for (const auto& [name, base] : {std::pair<std::string, long>{"live", base_port}, {"dead", dead_base_port}}) {
        lars::Options options;
        options.host = host;
        options.base_port = static_cast<std::uint16_t>(base);
        options.ports = settings["ports"];
        options.timeout = std::chrono::microseconds(
            std::llround(settings["timeout"].get<double>() * 1e6));
        options.retries = settings["retries"];
        clients[name] = std::make_unique<lars::Client>(options);
    }

    int number = 0, failed = 0;
    for (const auto& step : scenario["steps"]) {
        json result = run_step(step, clients, static_cast<std::uint32_t>(offset));
        failed += result["ok"] ? 0 : 1;
        json line = {{"step", ++number}};
        line.update(result);
        std::cout << line.dump() << std::endl;
    }
    std::cout << json{{"passed", number - failed}, {"failed", failed}}.dump() << std::endl;
    return failed ? 1 : 0;
}
