/* poll_drive: the loop of the original's qps tool (get_host, then report the answer), in the
   original's UDP protocol, so that it drives the original agent and Lars's agent alike (Lars's
   agent speaks that protocol on the original's ports), with the receive of Lars's clients:
   after a request it polls for the answer for up to BUSY_POLL_US microseconds (a
   non-blocking receive, yielding the CPU between tries) before it blocks, and after a poll
   that ran out it answers the next 16 calls without polling (doubling while polls keep
   running out, up to 4096), as lars.client and the C++ client do. With BUSY_POLL_US 0 it
   sleeps for every answer, like the original's client.

   Usage: poll_drive THREADS SECONDS BUSY_POLL_US [modid:cmdid ...]
     Thread i uses modid i+1, cmdid 1 unless modid:cmdid arguments say otherwise; ports
     8888 + (modid + cmdid) % 3, as the original's client (another base port than 8888:
     the environment variable POLL_DRIVE_BASE_PORT).
   Output: one JSON line in the format of the anchor's qps_timed:
     {"threads", "duration", "loops", "loops_per_s", "ok", "overload", "noexist", "errors",
      "per_thread": [...]}
   A loop counts when the answer's return code is 0, 1 or 3 (NOEXIST), as in the qps tool.

   Part of benchmarks/vs_original.py; built by it with `cc -O2 -pthread`. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/socket.h>

#define MAXT 64
#define BASE_PORT 8888
#define SPIN_SKIP 16
#define SPIN_SKIP_MAX 4096
enum { GET_HOST_REQUEST = 4, GET_HOST_RESPONSE = 5, REPORT_REQUEST = 6 };

struct worker {
    int modid, cmdid;
    long loops, ok, overload, noexist, errors;
    double elapsed;
};

static double seconds, busy_poll;
static int base_port = BASE_PORT;
static pthread_barrier_t start_line;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* --- protobuf, the few fields these messages have ---------------------------------------- */

static size_t put_varint(uint8_t *out, uint64_t value) {
    size_t n = 0;
    while (value >= 0x80) {
        out[n++] = (uint8_t)(value | 0x80);
        value >>= 7;
    }
    out[n++] = (uint8_t)value;
    return n;
}

/* An int32 field: negative values sign-extended to 64 bits, as protobuf does. */
static size_t put_int32(uint8_t *out, int field, int32_t value) {
    out[0] = (uint8_t)(field << 3);
    return 1 + put_varint(out + 1, (uint64_t)(int64_t)value);
}

static int get_varint(const uint8_t **p, const uint8_t *end, uint64_t *value) {
    uint64_t v = 0;
    for (int shift = 0; shift < 70 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *value = v;
            return 0;
        }
    }
    return -1;
}

/* HostInfo: 1 ip, 2 port. */
static int parse_host(const uint8_t *p, const uint8_t *end, int32_t *ip, int32_t *port) {
    while (p < end) {
        uint64_t tag, value;
        if (get_varint(&p, end, &tag) || (tag & 7) != 0 || get_varint(&p, end, &value)) return -1;
        if (tag >> 3 == 1) *ip = (int32_t)value;
        else if (tag >> 3 == 2) *port = (int32_t)value;
    }
    return 0;
}

/* GetHostResponse: 1 seq, 2 modid, 3 cmdid, 4 retcode, 5 HostInfo host. */
static int parse_answer(const uint8_t *buf, ssize_t size, uint32_t *seq, int32_t *retcode,
                        int32_t *ip, int32_t *port) {
    int32_t msgid, msglen;
    if (size < 8) return -1;
    memcpy(&msgid, buf, 4);
    memcpy(&msglen, buf + 4, 4);
    if (msgid != GET_HOST_RESPONSE || msglen != size - 8) return -1;
    const uint8_t *p = buf + 8, *end = buf + size;
    *seq = 0, *retcode = 0, *ip = 0, *port = 0;
    while (p < end) {
        uint64_t tag, value;
        if (get_varint(&p, end, &tag)) return -1;
        if ((tag & 7) == 2) {
            if (get_varint(&p, end, &value) || value > (uint64_t)(end - p)) return -1;
            if (tag >> 3 == 5 && parse_host(p, p + value, ip, port)) return -1;
            p += value;
        } else if ((tag & 7) == 0) {
            if (get_varint(&p, end, &value)) return -1;
            if (tag >> 3 == 1) *seq = (uint32_t)value;
            else if (tag >> 3 == 4) *retcode = (int32_t)value;
        } else {
            return -1;
        }
    }
    return 0;
}

static size_t frame(uint8_t *buf, int32_t msgid, size_t body) {
    int32_t len = (int32_t)body;
    memcpy(buf, &msgid, 4);
    memcpy(buf + 4, &len, 4);
    return 8 + body;
}

/* --- the receive of Lars's clients ------------------------------------------------------- */

struct lane {
    int fd;
    unsigned skip, misses;
};

static ssize_t receive(struct lane *lane, uint8_t *buf, size_t cap) {
    if (busy_poll > 0 && lane->skip == 0) {
        double until = now() + busy_poll;
        for (;;) {
            ssize_t size = recv(lane->fd, buf, cap, MSG_DONTWAIT);
            if (size >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
                lane->misses = 0;
                return size;
            }
            if (now() >= until) break;
            sched_yield();
        }
        lane->misses++;
        unsigned shift = lane->misses < 12 ? lane->misses : 12;
        lane->skip = SPIN_SKIP << shift < SPIN_SKIP_MAX ? SPIN_SKIP << shift : SPIN_SKIP_MAX;
    } else if (lane->skip > 0) {
        lane->skip--;
    }
    return recv(lane->fd, buf, cap, 0); /* SO_RCVTIMEO: 1 s */
}

/* One get_host and, for an answer 0 or 1, its report (if `report`): the return code, or -1
   when no answer came within SO_RCVTIMEO. */
static int32_t call(struct worker *w, struct lane *lane, uint32_t *seq, int report) {
    uint8_t out[64], in[2048];
    size_t body;
    out[8] = 1 << 3;
    body = 1 + put_varint(out + 9, ++*seq);
    body += put_int32(out + 8 + body, 2, w->modid);
    body += put_int32(out + 8 + body, 3, w->cmdid);
    send(lane->fd, out, frame(out, GET_HOST_REQUEST, body), 0);
    uint32_t got_seq;
    int32_t retcode = -1, ip = 0, port = 0;
    for (;;) { /* skip late answers to earlier requests */
        ssize_t size = receive(lane, in, sizeof in);
        if (size < 0) {
            if (getenv("POLL_DRIVE_DEBUG")) perror("recv");
            return -1;
        }
        if (parse_answer(in, size, &got_seq, &retcode, &ip, &port) == 0 && got_seq == *seq) break;
    }
    if (report && (retcode == 0 || retcode == 1)) {
        uint8_t host[32];
        size_t hn = put_int32(host, 1, ip);
        hn += put_int32(host + hn, 2, port);
        body = put_int32(out + 8, 1, w->modid);
        body += put_int32(out + 8 + body, 2, w->cmdid);
        out[8 + body++] = 3 << 3 | 2;
        out[8 + body++] = (uint8_t)hn;
        memcpy(out + 8 + body, host, hn);
        body += hn;
        body += put_int32(out + 8 + body, 4, retcode);
        send(lane->fd, out, frame(out, REPORT_REQUEST, body), 0);
    }
    return retcode;
}

static void *run(void *arg) {
    struct worker *w = arg;
    struct lane lane = {socket(AF_INET, SOCK_DGRAM, 0), 0, 0};
    struct sockaddr_in agent;
    memset(&agent, 0, sizeof agent);
    agent.sin_family = AF_INET;
    agent.sin_port = htons(base_port + (w->modid + w->cmdid) % 3);
    agent.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {1, 0};
    setsockopt(lane.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(lane.fd, (struct sockaddr *)&agent, sizeof agent) != 0) {
        perror("connect");
        exit(1);
    }
    uint32_t seq = 0;
    /* Warm-up, as qps_timed: give the agent up to 1 s to fetch the route from its DNS. */
    for (int i = 0; i < 100 && call(w, &lane, &seq, 0) != 0; i++) usleep(10000);
    pthread_barrier_wait(&start_line);
    double start = now(), end = start + seconds, t = start;
    long n = 0;
    while (t < end) {
        int32_t retcode = call(w, &lane, &seq, 1);
        if (retcode == 0 || retcode == 1 || retcode == 3) {
            w->loops++;
            if (retcode == 3) w->noexist++;
            else if (retcode == 0) w->ok++;
            else w->overload++;
        } else {
            w->errors++;
        }
        if ((++n & 255) == 0) t = now();
    }
    w->elapsed = now() - start;
    close(lane.fd);
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    seconds = argc > 2 ? atof(argv[2]) : 10;
    busy_poll = (argc > 3 ? atof(argv[3]) : 100) * 1e-6;
    if (getenv("POLL_DRIVE_BASE_PORT")) base_port = atoi(getenv("POLL_DRIVE_BASE_PORT"));
    if (threads < 1 || threads > MAXT || seconds <= 0 || busy_poll < 0 || base_port < 1
        || base_port > 65533) {
        fprintf(stderr, "usage: poll_drive THREADS SECONDS BUSY_POLL_US [modid:cmdid ...]\n");
        return 2;
    }
    static struct worker workers[MAXT];
    pthread_t ids[MAXT];
    pthread_barrier_init(&start_line, NULL, threads);
    for (int i = 0; i < threads; i++) {
        workers[i].modid = i + 1, workers[i].cmdid = 1;
        if (argc > 4 + i && sscanf(argv[4 + i], "%d:%d", &workers[i].modid, &workers[i].cmdid) != 2) {
            fprintf(stderr, "poll_drive: bad module %s (modid:cmdid)\n", argv[4 + i]);
            return 2;
        }
        pthread_create(&ids[i], NULL, run, &workers[i]);
    }
    long loops = 0, ok = 0, overload = 0, noexist = 0, errors = 0;
    double rate = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(ids[i], NULL);
        struct worker *w = &workers[i];
        loops += w->loops, ok += w->ok, overload += w->overload;
        noexist += w->noexist, errors += w->errors;
        rate += w->elapsed > 0 ? w->loops / w->elapsed : 0;
    }
    printf("{\"threads\": %d, \"duration\": %g, \"loops\": %ld, \"loops_per_s\": %.1f, "
           "\"ok\": %ld, \"overload\": %ld, \"noexist\": %ld, \"errors\": %ld, \"per_thread\": [",
           threads, seconds, loops, rate, ok, overload, noexist, errors);
    for (int i = 0; i < threads; i++) {
        struct worker *w = &workers[i];
        printf("%s{\"modid\": %d, \"cmdid\": %d, \"loops\": %ld, \"ok\": %ld, \"overload\": %ld,"
               " \"noexist\": %ld, \"errors\": %ld, \"elapsed\": %.3f, \"loops_per_s\": %.1f}",
               i ? ", " : "", w->modid, w->cmdid, w->loops, w->ok, w->overload, w->noexist,
               w->errors, w->elapsed, w->elapsed > 0 ? w->loops / w->elapsed : 0);
    }
    printf("]}\n");
    return 0;
}
