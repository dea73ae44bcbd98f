package lars.tools;

import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import lars.client.Host;
import lars.client.LarsClient;
import lars.client.LarsException;

/**
 * The get_host + report loop of {@code lars bench} (and of the original qps tool), in Java.
 *
 * <pre>
 *   java -cp ... lars.tools.Bench [--host 127.0.0.1] [--base-port 8888] [--ports 3]
 *        [--modid 1] [--cmdid 1] [--threads 1] [--duration 10] [--warmup 2] [--json]
 * </pre>
 *
 * Thread i loops on module MODID/CMDID+i with the one shared LarsClient for --duration seconds,
 * after --warmup seconds of the same loop (the JIT compiles meanwhile). Prints loops/s in total
 * and per thread, and get_host latency percentiles.
 */
public final class Bench {
    private Bench() {}

    private static final class Result {
        long cmdid;
        long loops;
        long errors;
        double seconds;
        float[] latenciesUs = new float[1 << 16];

        void record(float us) {
            if ((int) loops == latenciesUs.length) {
                latenciesUs = Arrays.copyOf(latenciesUs, latenciesUs.length * 2);
            }
            latenciesUs[(int) loops] = us;
        }
    }

    private static void loop(LarsClient client, long modid, Result r, double seconds, boolean measure) {
        long began = System.nanoTime();
        long end = began + (long) (seconds * 1e9);
        long now = began;
        while (now < end) {
            Host host;
            try {
                host = client.getHost(modid, r.cmdid);
            } catch (LarsException e) {
                if (measure) {
                    r.errors++;
                }
                now = System.nanoTime();
                continue;
            }
            long done = System.nanoTime();
            client.report(modid, r.cmdid, host, true);
            if (measure) {
                r.record((done - now) / 1000f);
                r.loops++;
            }
            now = System.nanoTime();
        }
        if (measure) {
            r.seconds = (now - began) / 1e9;
        }
    }

    public static void main(String[] args) throws Exception {
        LarsClient.Options options = LarsClient.Options.defaults();
        long modid = 1, cmdid = 1;
        int threads = 1;
        double duration = 10, warmup = 2;
        boolean json = false;
        for (int i = 0; i < args.length; i++) {
            String arg = args[i];
            if (arg.equals("--json")) {
                json = true;
                continue;
            }
            if (i + 1 >= args.length) {
                System.err.println("bench: missing value for " + arg);
                System.exit(2);
            }
            String value = args[++i];
            switch (arg) {
                case "--host" -> options = options.withHost(value);
                case "--base-port" -> options = options.withBasePort(Integer.parseInt(value));
                case "--ports" -> options = options.withPorts(Integer.parseInt(value));
                case "--timeout" -> options = options.withTimeout(Duration.ofMillis(Math.round(Double.parseDouble(value) * 1000)));
                case "--modid" -> modid = Long.parseLong(value);
                case "--cmdid" -> cmdid = Long.parseLong(value);
                case "--threads" -> threads = Math.max(1, Integer.parseInt(value));
                case "--duration" -> duration = Double.parseDouble(value);
                case "--warmup" -> warmup = Double.parseDouble(value);
                default -> {
                    System.err.println("bench: unknown argument " + arg);
                    System.exit(2);
                }
            }
        }
        try (LarsClient client = new LarsClient(options)) {
            for (int t = 0; t < threads; t++) {
                try {
                    client.regInit(modid, cmdid + t);
                } catch (LarsException e) {
                    System.err.println("bench needs module " + modid + "/" + (cmdid + t) + ": " + e.getMessage());
                    System.exit(1);
                }
            }
            List<Result> results = new ArrayList<>();
            List<Thread> workers = new ArrayList<>();
            CountDownLatch warm = new CountDownLatch(threads), go = new CountDownLatch(1);
            final long mod = modid;
            final double measured = duration, warming = warmup;
            for (int t = 0; t < threads; t++) {
                Result r = new Result();
                r.cmdid = cmdid + t;
                results.add(r);
                Thread worker = new Thread(() -> {
                    loop(client, mod, r, warming, false);
                    warm.countDown();
                    try {
                        go.await();
                    } catch (InterruptedException e) {
                        return;
                    }
                    loop(client, mod, r, measured, true);
                });
                workers.add(worker);
                worker.start();
            }
            warm.await();
            go.countDown();
            for (Thread worker : workers) {
                worker.join();
            }
            double total = 0;
            int count = 0;
            for (Result r : results) {
                total += r.seconds > 0 ? r.loops / r.seconds : 0;
                count += (int) r.loops;
            }
            float[] all = new float[count];
            int at = 0;
            for (Result r : results) {
                System.arraycopy(r.latenciesUs, 0, all, at, (int) r.loops);
                at += (int) r.loops;
            }
            Arrays.sort(all);
            double p50 = count == 0 ? 0 : all[count / 2];
            double p99 = count == 0 ? 0 : all[Math.min(count - 1, (int) (count * 0.99))];
            if (json) {
                StringBuilder out = new StringBuilder();
                out.append(String.format("{\"threads\": %d, \"duration\": %s, \"loops_per_s\": %.1f, \"per_thread\": [", threads, duration, total));
                for (int i = 0; i < results.size(); i++) {
                    Result r = results.get(i);
                    out.append(String.format("%s{\"modid\": %d, \"cmdid\": %d, \"loops\": %d, \"loops_per_s\": %.1f, \"errors\": %d}",
                            i > 0 ? ", " : "", modid, r.cmdid, r.loops, r.seconds > 0 ? r.loops / r.seconds : 0, r.errors));
                }
                out.append(String.format("], \"p50_us\": %.1f, \"p99_us\": %.1f}", p50, p99));
                System.out.println(out);
            } else {
                for (Result r : results) {
                    System.out.printf("thread module %d/%d: %10.0f loops/s (%d loops, %d errors)%n",
                            modid, r.cmdid, r.seconds > 0 ? r.loops / r.seconds : 0, r.loops, r.errors);
                }
                System.out.printf("total: %.0f loops/s with %d thread(s) over %ss; get_host latency p50 %.0f us, p99 %.0f us%n",
                        total, threads, duration, p50, p99);
            }
        }
    }
}
