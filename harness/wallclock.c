/* A wall clock that jumps, for one process (harness.faults.JumpingClock).
 *
 * LD_PRELOADed into a process under test: CLOCK_REALTIME (clock_gettime, gettimeofday, time) is
 * shifted by the signed 64-bit number of seconds stored in the 8-byte file that
 * KEYLEASE_WALLCLOCK_FILE names, read through a shared mapping, so the test makes the clock jump
 * by rewriting the file while the process runs. CLOCK_MONOTONIC and every other clock are left
 * alone, as a real clock step (NTP, an operator, a VM restored from a snapshot) leaves them.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile int64_t *offset_seconds;
static int (*real_clock_gettime)(clockid_t, struct timespec *);
static int (*real_gettimeofday)(struct timeval *, void *);

__attribute__((constructor)) static void setup(void) {
    real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    real_gettimeofday = dlsym(RTLD_NEXT, "gettimeofday");
    const char *path = getenv("KEYLEASE_WALLCLOCK_FILE");
    if (!path) return;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    void *map = mmap(NULL, sizeof(int64_t), PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (map != MAP_FAILED) offset_seconds = map;
}

static int64_t offset(void) { return offset_seconds ? *offset_seconds : 0; }

int clock_gettime(clockid_t id, struct timespec *ts) {
    int rc = real_clock_gettime(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) ts->tv_sec += offset();
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    int rc = real_gettimeofday(tv, tz);
    if (rc == 0 && tv) tv->tv_sec += offset();
    return rc;
}

time_t time(time_t *t) {
    struct timespec ts;
    real_clock_gettime(CLOCK_REALTIME, &ts);
    time_t now = ts.tv_sec + offset();
    if (t) *t = now;
    return now;
}
