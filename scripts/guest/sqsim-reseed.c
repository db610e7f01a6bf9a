/*
 * sqsim-reseed: give the guest kernel's CRNG a host-provided seed, now.
 *
 * Usage (as root):  sqsim-reseed [@SECONDS[.FRACTION]] < SEED
 *                   (SEED: 32 to 512 bytes, binary)
 *
 * Why: warm-started VMs are clones of one saved snapshot, so they all resume
 * with the same kernel CRNG state and could hand out the same "random" bytes
 * (the same keys in every job). Writing to /dev/urandom is not enough: it only
 * mixes into the input pool, and Linux (6.1 here) does not rekey the CRNG from
 * that pool until its reseed interval has passed. The tiny image's cloud
 * kernel has no vmgenid driver to do it on restore either. So the host sends
 * each clone its own seed and this program, right after the restore:
 *   1. RNDADDENTROPY: mixes the seed into the input pool, crediting 8 bits per
 *      byte (the seed comes from the host's CSPRNG);
 *   2. RNDRESEEDCRNG: rekeys the CRNG from the input pool at once, so every
 *      later read of /dev/urandom or getrandom() depends on the seed.
 * At least 32 bytes (256 bits): that is what the kernel needs before it counts
 * its CRNG as seeded at all, and the tiny guest reaches its prompt before that
 * (entropy_avail 4 or 5; the first read of /dev/urandom would spend ~1 s under
 * TCG on jitter entropy). With less, RNDRESEEDCRNG would fail with ENODATA
 * there after the seed had been added, so a short seed is refused up front.
 * Both need CAP_SYS_ADMIN. RNDRESEEDCRNG exists since Linux 4.17; an older
 * kernel answers ENOTTY or EINVAL. Any refusal is a failure, not a warning:
 * the caller relies on the reseed having happened.
 * Only the kernel is reseeded: a process that already drew randomness before
 * the snapshot (a userspace PRNG, a cached key) still holds it.
 *
 * With @SECONDS[.FRACTION] (since the epoch, UTC) it also sets the wall clock
 * (CLOCK_REALTIME), which a clone resumes stale by its template's age: one
 * program for both, because under TCG every program a fresh clone starts
 * costs a tenth of a second of translation.
 *
 * Exit 0 and print nothing on success; otherwise exit 1 with one line on
 * stderr ("sqsim-reseed: WHAT: WHY").
 *
 * Built by scripts/build-tiny-image.sh and installed as /sbin/sqsim-reseed in
 * the tiny initramfs. It uses no libc, only the kernel's UAPI headers (for the
 * ioctl numbers, struct rand_pool_info and errno values) and raw system
 * calls: a static glibc binary would be ~680 KB (+300 KB gzipped initramfs)
 * for what is a read and two ioctls; this one is about 2 KB. x86-64 only,
 * like the guest. Build flags (see the script): -nostdlib -static -no-pie
 * -ffreestanding -fno-stack-protector -fno-tree-loop-distribute-patterns;
 * anything else the compiler would need from a libc (memset, memcpy) is then
 * a link error, never a silent dependency.
 */
#include <asm/ioctls.h>   /* TCGETS */
#include <asm/termbits.h> /* struct termios (the kernel's) */
#include <asm/unistd.h>   /* __NR_* */
#include <linux/errno.h>
#include <linux/fcntl.h>
#include <linux/random.h> /* RNDADDENTROPY, RNDRESEEDCRNG, rand_pool_info */
#include <linux/time.h>   /* struct timespec, CLOCK_REALTIME */
#include <stddef.h>       /* NULL (from the compiler, not a libc) */

#define SEED_MIN 32  /* bytes: 256 bits, the kernel's POOL_READY_BITS */
#define SEED_MAX 512

/* --- The few pieces of a libc this needs. --- */

#define STR_(x) #x
#define STR(x) STR_(x)

/*
 * Process entry: argc is at the stack pointer. Align the stack to 16 bytes
 * for the call to C (the kernel already does; this does not depend on it),
 * call sqsim_reseed(argc, argv) and exit with what it returns.
 */
__asm__(".text\n"
        ".global _start\n"
        "_start:\n"
        "    xor %ebp, %ebp\n"
        "    mov (%rsp), %edi\n"
        "    lea 8(%rsp), %rsi\n"
        "    and $-16, %rsp\n"
        "    call sqsim_reseed\n"
        "    mov %eax, %edi\n"
        "    mov $" STR(__NR_exit_group) ", %eax\n"
        "    syscall\n"
        "    hlt\n");

/* A system call with up to three arguments; returns -errno on failure. */
static long sys3(long nr, long a, long b, long c)
{
    long ret;

    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a), "S"(b), "d"(c)
                     : "rcx", "r11", "memory");
    return ret;
}

/* The reason for an error, in words that say what to fix. */
static const char *why(long err)
{
    switch (err) {
    case EPERM:
        return "not permitted (needs root: CAP_SYS_ADMIN)";
    case ENOTTY:
        return "not supported (not the kernel's random device?)";
    case EINVAL:
        return "invalid argument";
    case ENODATA: /* not with SEED_MIN bytes credited, but say so if it is */
        return "the kernel CRNG is not initialised yet";
    case ENOENT:
        return "no such file";
    case EACCES:
        return "permission denied";
    case EBADF:
        return "not open (bad file descriptor)";
    case EISDIR:
        return "is a directory";
    case EIO:
        return "input/output error";
    default:
        return "unexpected error";
    }
}

/* Append s to the line being built at *p (bounded by end). */
static void put(char **p, char *end, const char *s)
{
    while (*s && *p < end)
        *(*p)++ = *s++;
}

/*
 * Write one line "sqsim-reseed: WHAT[: REASON]" to stderr in one write, so
 * it is never interleaved, and return the exit status 1.
 */
static int fail(const char *what, const char *reason)
{
    char line[160], *p = line, *end = line + sizeof(line) - 1;

    put(&p, end, "sqsim-reseed: ");
    put(&p, end, what);
    if (reason) {
        put(&p, end, ": ");
        put(&p, end, reason);
    }
    *p++ = '\n';
    sys3(__NR_write, 2, (long)line, p - line);
    return 1;
}

/* --- The program. --- */

/* struct rand_pool_info ends in a flexible array: give it room. */
static union {
    struct rand_pool_info info;
    unsigned char raw[sizeof(struct rand_pool_info) + SEED_MAX];
} req;

static int reseed(unsigned char *seed, long *len)
{
    struct termios tio;
    unsigned char extra;
    long n, fd, r;

    /* A seed typed at a terminal would be neither binary nor secret. */
    if (sys3(__NR_ioctl, 0, TCGETS, (long)&tio) == 0)
        return fail("stdin is a terminal", "pipe the seed in (sqsim-reseed < SEED)");

    /* Read to end of file: a pipe may deliver the seed in pieces. */
    while (*len < SEED_MAX) {
        n = sys3(__NR_read, 0, (long)(seed + *len), SEED_MAX - *len);
        if (n == -EINTR)
            continue;
        if (n < 0)
            return fail("reading the seed from stdin", why(-n));
        if (n == 0)
            break;
        *len += n;
    }
    if (*len == 0)
        return fail("no seed on stdin", "expected 32 to 512 bytes");
    if (*len < SEED_MIN)
        return fail("seed shorter than 32 bytes", "the CRNG needs 256 bits");
    /* More than we take: refuse rather than silently use only part of it. */
    if (*len == SEED_MAX) {
        do
            n = sys3(__NR_read, 0, (long)&extra, 1);
        while (n == -EINTR);
        if (n != 0)
            return fail("seed longer than 512 bytes", NULL);
    }

    /* The ioctls work on either device; they need root, not write access. */
    fd = sys3(__NR_open, (long)"/dev/urandom", O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0)
        return fail("opening /dev/urandom", why(-fd));
    req.info.entropy_count = (int)(*len * 8); /* bits, credited in full */
    req.info.buf_size = (int)*len;            /* bytes */
    r = sys3(__NR_ioctl, fd, RNDADDENTROPY, (long)&req.info);
    if (r < 0)
        return fail("RNDADDENTROPY", why(-r));
    r = sys3(__NR_ioctl, fd, RNDRESEEDCRNG, 0);
    /* Before 4.17 the random driver answered EINVAL to an unknown ioctl. */
    if (r == -ENOTTY || r == -EINVAL)
        return fail("RNDRESEEDCRNG", "not supported by this kernel (needs Linux 4.17+)");
    if (r < 0)
        return fail("RNDRESEEDCRNG", why(-r));
    sys3(__NR_close, fd, 0, 0);
    return 0;
}

/* "@SECONDS[.FRACTION]" as a timespec; 0 if it is not one. */
static int parse_time(const char *s, struct timespec *ts)
{
    long sec = 0, nsec = 0, scale = 100000000;
    int digits = 0;

    if (*s++ != '@')
        return 0;
    for (; *s >= '0' && *s <= '9'; s++, digits++) {
        if (sec > (1L << 40))
            return 0;
        sec = sec * 10 + (*s - '0');
    }
    if (digits == 0)
        return 0;
    if (*s == '.') {
        for (s++; *s >= '0' && *s <= '9'; s++) {
            nsec += (*s - '0') * scale;
            scale /= 10;
        }
    }
    if (*s != '\0')
        return 0;
    ts->tv_sec = sec;
    ts->tv_nsec = nsec;
    return 1;
}

int sqsim_reseed(int argc, char **argv)
{
    volatile unsigned char *v = req.raw;
    struct timespec ts;
    long len = 0, r;
    int rc;
    unsigned i;

    if (argc > 2 || (argc == 2 && !parse_time(argv[1], &ts)))
        return fail("usage: sqsim-reseed [@SECONDS[.FRACTION]] < SEED (32 to 512 bytes, binary)",
                    NULL);
    rc = reseed((unsigned char *)req.info.buf, &len);
    if (rc == 0 && argc == 2) {
        r = sys3(__NR_clock_settime, CLOCK_REALTIME, (long)&ts, 0);
        if (r < 0)
            rc = fail("setting the clock", why(-r));
    }
    /* The seed is key material: do not leave it in this process's memory.
     * (volatile: the compiler may not drop stores it thinks are dead.) */
    for (i = 0; i < sizeof(req.raw); i++)
        v[i] = 0;
    return rc;
}
