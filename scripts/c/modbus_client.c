/* The floor for a Modbus TCP request (libmodbus, Debian libmodbus-dev): N back-to-back reads of COUNT
   holding registers from address 0, unit 1, one connection to 127.0.0.1 with TCP_NODELAY, no decoding.
   After 10 unmeasured reads (connection warm), prints one JSON object on stdout: wall and this process's
   own CPU time (CLOCK_PROCESS_CPUTIME_ID), in total and per request, e.g.
     {"requests": 2000, "registers": 125, "errors": 0, "wall_s": 0.101, "cpu_s": 0.012,
      "req_per_s": 19802, "wall_us_per_request": 50.5, "cpu_us_per_request": 6.0, ...}
   A failed read is counted in "errors" and the loop goes on (bounded by N either way).
   build: cc -O2 -o modbus_client modbus_client.c $(pkg-config --cflags --libs libmodbus)
   usage: modbus_client PORT [N=2000] [COUNT=125] */
#include <modbus.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static double seconds(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 1502;
    int n = argc > 2 ? atoi(argv[2]) : 2000;
    int count = argc > 3 ? atoi(argv[3]) : 125;
    if (n < 1 || n > 10000000 || count < 1 || count > MODBUS_MAX_READ_REGISTERS) {
        fprintf(stderr, "usage: modbus_client PORT [N=2000 (1..1e7)] [COUNT=125 (1..125)]\n");
        return 2;
    }
    modbus_t *ctx = modbus_new_tcp("127.0.0.1", port);
    if (ctx == NULL || modbus_set_slave(ctx, 1) < 0 || modbus_connect(ctx) < 0) {
        fprintf(stderr, "connect 127.0.0.1:%d: %s\n", port, modbus_strerror(errno));
        return 1;
    }
    modbus_set_response_timeout(ctx, 2, 0);
    int one = 1;
    setsockopt(modbus_get_socket(ctx), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    uint16_t regs[MODBUS_MAX_READ_REGISTERS];
    for (int i = 0; i < 10; i++) modbus_read_registers(ctx, 0, count, regs);
    int errors = 0;
    double cpu0 = seconds(CLOCK_PROCESS_CPUTIME_ID), t0 = seconds(CLOCK_MONOTONIC);
    for (int i = 0; i < n; i++)
        if (modbus_read_registers(ctx, 0, count, regs) != count) errors++;
    double wall = seconds(CLOCK_MONOTONIC) - t0, cpu = seconds(CLOCK_PROCESS_CPUTIME_ID) - cpu0;
    modbus_close(ctx);
    modbus_free(ctx);
    printf("{\"requests\": %d, \"registers\": %d, \"errors\": %d, \"wall_s\": %.6f, \"cpu_s\": %.6f, "
           "\"req_per_s\": %.1f, \"registers_per_s\": %.1f, \"wall_us_per_request\": %.3f, "
           "\"cpu_us_per_request\": %.3f}\n", n, count, errors, wall, cpu, n / wall, (double)n * count / wall,
           wall / n * 1e6, cpu / n * 1e6);
    return errors == n;
}
