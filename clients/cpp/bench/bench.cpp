// bench: the get_host + report loop of `lars bench` (and of the original qps tool), in C++.
//
//   bench [--host 127.0.0.1] [--base-port 8888] [--ports 3] [--modid 1] [--cmdid 1]
//         [--threads 1] [--duration 10] [--json]
//
// Thread i loops on module MODID/CMDID+i with the one shared lars::Client for --duration
// seconds. Prints loops/s in total and per thread, and get_host latency percentiles;
// --json prints {"threads", "duration", "loops_per_s", "per_thread": [...], "p50_us", "p99_us"}.
#include <lars/client.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Result {
    std::uint32_t cmdid = 0;
    long loops = 0;
    long errors = 0;
    double seconds = 0;
    std::vector<float> latencies_us;
};

[[noreturn]] void usage(const char* problem) {
    std::fprintf(stderr,
                 "bench: %s\nusage: bench [--host H] [--base-port N] [--ports N] [--modid N] "
                 "[--cmdid N] [--threads N] [--duration S] [--json]\n",
                 problem);
    std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
    lars::Options options;
    std::uint32_t modid = 1, cmdid = 1;
    int threads = 1;
    double duration = 10;
    bool json = false;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) usage(("missing value for " + arg).c_str());
            return argv[++i];
        };
        if (arg == "--host") options.host = value();
        else if (arg == "--base-port") options.base_port = static_cast<std::uint16_t>(std::stoul(value()));
        else if (arg == "--ports") options.ports = static_cast<std::uint32_t>(std::stoul(value()));
        else if (arg == "--modid") modid = static_cast<std::uint32_t>(std::stoul(value()));
        else if (arg == "--cmdid") cmdid = static_cast<std::uint32_t>(std::stoul(value()));
        else if (arg == "--threads") threads = std::max(1, std::stoi(value()));
        else if (arg == "--duration") duration = std::stod(value());
        else if (arg == "--json") json = true;
        else usage(("unknown argument " + arg).c_str());
    }

    lars::Client client(options);
    for (int t = 0; t < threads; ++t) {  // every module's route is loaded first
        try {
            client.reg_init(modid, cmdid + static_cast<std::uint32_t>(t));
        } catch (const lars::LarsError& exc) {
            std::fprintf(stderr, "bench needs module %u/%u: %s\n", modid,
                         cmdid + static_cast<std::uint32_t>(t), exc.what());
            return 1;
        }
    }

    std::vector<Result> results(static_cast<std::size_t>(threads));
    std::atomic<bool> go{false};
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
            Result& r = results[static_cast<std::size_t>(t)];
            r.cmdid = cmdid + static_cast<std::uint32_t>(t);
            r.latencies_us.reserve(1 << 20);
            while (!go.load()) std::this_thread::yield();
            const auto began = Clock::now();
            const auto end = began + std::chrono::duration<double>(duration);
            auto now = began;
            while (now < end) {
                std::optional<lars::Host> host;
                try {
                    host = client.get_host(modid, r.cmdid);
                } catch (const lars::LarsError&) {
                    ++r.errors;
                    now = Clock::now();
                    continue;
                }
                const auto done = Clock::now();
                client.report(modid, r.cmdid, *host, lars::Outcome::ok);
                r.latencies_us.push_back(
                    std::chrono::duration<float, std::micro>(done - now).count());
                ++r.loops;
                now = Clock::now();
            }
            r.seconds = std::chrono::duration<double>(now - began).count();
        });
    }
    go = true;
    for (auto& w : workers) w.join();

    std::vector<float> all;
    double total = 0;
    for (const auto& r : results) {
        all.insert(all.end(), r.latencies_us.begin(), r.latencies_us.end());
        total += r.seconds > 0 ? static_cast<double>(r.loops) / r.seconds : 0;
    }
    std::sort(all.begin(), all.end());
    const double p50 = all.empty() ? 0 : all[all.size() / 2];
    const double p99 = all.empty() ? 0 : all[std::min(all.size() - 1, all.size() * 99 / 100)];

    if (json) {
        std::printf("{\"threads\": %d, \"duration\": %g, \"loops_per_s\": %.1f, \"per_thread\": [",
                    threads, duration, total);
        for (std::size_t i = 0; i < results.size(); ++i) {
            const auto& r = results[i];
            std::printf("%s{\"modid\": %u, \"cmdid\": %u, \"loops\": %ld, \"loops_per_s\": %.1f, "
                        "\"errors\": %ld}",
                        i ? ", " : "", modid, r.cmdid, r.loops,
                        r.seconds > 0 ? static_cast<double>(r.loops) / r.seconds : 0, r.errors);
        }
        std::printf("], \"p50_us\": %.1f, \"p99_us\": %.1f}\n", p50, p99);
        return 0;
    }
    for (const auto& r : results) {
        std::printf("thread module %u/%u: %10.0f loops/s (%ld loops, %ld errors)\n", modid, r.cmdid,
                    r.seconds > 0 ? static_cast<double>(r.loops) / r.seconds : 0, r.loops,
                    r.errors);
    }
    std::printf("total: %.0f loops/s with %d thread(s) over %gs; get_host latency p50 %.0f us, "
                "p99 %.0f us\n",
                total, threads, duration, p50, p99);
    return 0;
}
