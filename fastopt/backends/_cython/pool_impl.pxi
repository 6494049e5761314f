# Included by kernels_impl.pxi: the thread team of a step, fastopt's own.
#
# Why not OpenMP's. A parallel region ends at a barrier that waits for every
# thread of the team, whether it has work or not. Inside a NumPy training
# loop the step follows OpenBLAS's matmuls; its worker is asleep, and on
# this 2-core VM 1-2% of the wake-ups waited a whole scheduler tick (about
# 4 ms) before the worker ran, while the step itself takes 0.1 ms
# (docs/performance.md, "Inside the training loop"). With a static
# schedule the master also waits for the worker's half of the work.
#
# Here the tasks of a phase are claimed one at a time from a shared counter
# by whichever thread is running: the master claims from the start, a worker
# joins when it wakes. The master waits only for tasks that a worker has
# claimed, never for a worker to wake: a worker that wakes late finds the
# counter spent and goes back to sleep. So a threaded step is never much
# slower than the serial one (the master alone runs every task), and as
# fast as the team when the worker is awake.
#
# The results do not depend on who ran a task: each task writes its own
# partial sums, added in task order afterwards, as before.
#
# Waiting: after a job in which it ran a task, a worker spins for
# ``spin_us`` microseconds (default 50) for the next one, which catches the
# phases of one step and back-to-back steps without a system call; then it
# sleeps on a futex. A worker that woke to find the job done sleeps at once,
# leaving the core to BLAS. Waking a sleeping worker costs the master 13-15 us
# in a training loop (the futex wake). Issuing it earlier, ahead of the step's
# Python, saved nothing. Having the worker wake itself before the next step is
# due took the core from BLAS's last matmul (docs/performance.md, "Waking the
# worker inside the loop"). Workers are started on first use, with the
# asynchronous signals blocked (Ctrl-C reaches the Python thread). A second
# Python thread stepping while the team is busy runs its step serially. A
# forked child has no workers and runs its steps serially
# (fastopt._openmp.on_fork_serial); its team state is reset all the same.
#
# Elsewhere than Linux (no futex) each job runs as an OpenMP loop with a
# static schedule, one parallel region per pass (the steps before this team
# ran all passes in one region, with barriers between them: a clipped step
# now wakes OpenMP's workers twice); ``set_thread_pool(False)``
# (FASTOPT_THREAD_POOL=openmp) picks that path on Linux too.
cdef extern from *:
    """
    #include <pthread.h>
    #include <signal.h>
    #include <stdint.h>
    #include <string.h>
    #include <time.h>
    #if defined(__linux__)
    #include <limits.h>
    #include <linux/futex.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    #define FO_POOL_FUTEX 1
    #else
    #define FO_POOL_FUTEX 0
    #endif
    #if defined(__x86_64__) || defined(__i386__)
    #include <immintrin.h>
    #define fo_cpu_relax() _mm_pause()
    #else
    #define fo_cpu_relax() __asm__ __volatile__("" ::: "memory")
    #endif

    typedef void (*fo_task_fn)(void* ctx, long long t);

    #define FO_POOL_MAX 256
    /* A range's claim word: the job's number (24 bits), then the range's
       next unclaimed task and its end (20 bits each). Its owner claims from
       the front, other threads from the back. */
    #define FO_CLAIM_BITS 20
    #define FO_CLAIM_MASK ((1ull << FO_CLAIM_BITS) - 1)
    #define FO_EPOCH_MASK 0xFFFFFFull
    #define FO_POOL_MAX_TASKS ((long long)FO_CLAIM_MASK)
    typedef struct { unsigned long long word; char pad[56]; } __attribute__((aligned(64)))
        fo_claim_line;

    static struct {
        /* the job, published before the claim words and `epoch` */
        fo_task_fn fn;
        void* ctx;
        long long n;
        /* on lines of their own: workers add to `done` while the master polls
           it, and spinning workers poll `epoch` */
        long long done __attribute__((aligned(64)));   /* tasks of this job finished */
        unsigned int epoch __attribute__((aligned(64)));   /* the job number; the futex word */
        int active __attribute__((aligned(64)));                 /* threads that take part (master included) */
        int sleepers;               /* workers in, or about to enter, futex_wait */
        int busy;                   /* a master is running a job */
        int nworkers;               /* workers started */
        int max_team;               /* the team size a failed start left (0: none failed) */
        int spin_us;
        int own;                    /* 1: this team; 0: an OpenMP loop */
        int at_fork;                /* the fork handler is registered */
        pid_t tid[FO_POOL_MAX];     /* workers' thread ids (placement) */
        int new_worker;
        /* thread r's range of the job's tasks: the r-th of `active` equal
           ones, so that each thread runs the same tasks from step to step
           (their data stays in its core's cache, as with a static schedule) */
        fo_claim_line claim[FO_POOL_MAX];
    } fo_pool = {.own = FO_POOL_FUTEX, .spin_us = 50};   /* cython_cpu sets both at import */

    static inline int fo_pool_elapsed_us(const struct timespec* t0) {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        return (int)((t.tv_sec - t0->tv_sec) * 1000000 + (t.tv_nsec - t0->tv_nsec) / 1000);
    }

    /* Thread `me` of `team` runs the tasks of job `e` still unclaimed: its
       own range first, then the others' from their ends; 1 if it ran any.
       A claim is a compare-and-swap of the range's word, which fails once
       the job is over, so a thread that comes late never touches a finished
       job's data (fn and ctx are read after a successful claim, while the
       job cannot end: its master waits for every claimed task). */
    static int fo_pool_claim(unsigned int e, int me, int team) {
        int worked = 0, k;
        unsigned long long job = (unsigned long long)(e & FO_EPOCH_MASK);
        for (k = 0; k < team; k++) {
            int own = k == 0;
            unsigned long long* w = &fo_pool.claim[(me + k) % team].word;
            unsigned long long c = __atomic_load_n(w, __ATOMIC_ACQUIRE);
            for (;;) {
                long long next = (long long)((c >> FO_CLAIM_BITS) & FO_CLAIM_MASK);
                long long end = (long long)(c & FO_CLAIM_MASK);
                if ((c >> (2 * FO_CLAIM_BITS)) != job) return worked;   /* job over */
                if (next >= end) break;
                if (__atomic_compare_exchange_n(
                        w, &c, own ? c + (1ull << FO_CLAIM_BITS) : c - 1, 0,
                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                    fo_task_fn fn = __atomic_load_n(&fo_pool.fn, __ATOMIC_RELAXED);
                    void* ctx = __atomic_load_n(&fo_pool.ctx, __ATOMIC_RELAXED);
                    fn(ctx, own ? next : end - 1);
                    __atomic_add_fetch(&fo_pool.done, 1, __ATOMIC_RELEASE);
                    worked = 1;
                    c = __atomic_load_n(w, __ATOMIC_ACQUIRE);
                }       /* else c holds the word's new value */
            }
        }
        return worked;
    }

    static void fo_pool_serial(fo_task_fn fn, void* ctx, long long n) {
        long long t;
        for (t = 0; t < n; t++) fn(ctx, t);
    }

    #if FO_POOL_FUTEX
    /* The next job's number after `seen`: spin for spin_us, then sleep. */
    static unsigned int fo_pool_wait(unsigned int seen, int spin_us) {
        unsigned int e;
        if (spin_us > 0) {
            struct timespec t0;
            int i;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            for (i = 1;; i++) {
                e = __atomic_load_n(&fo_pool.epoch, __ATOMIC_ACQUIRE);
                if (e != seen) return e;
                fo_cpu_relax();
                if ((i & 63) == 0 && fo_pool_elapsed_us(&t0) >= spin_us) break;
            }
        }
        for (;;) {
            /* sleepers before epoch, as the master bumps epoch before it reads
               sleepers (both sequentially consistent): either the master sees
               this sleeper and wakes it, or the worker sees the new job */
            __atomic_add_fetch(&fo_pool.sleepers, 1, __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&fo_pool.epoch, __ATOMIC_SEQ_CST) == seen)
                syscall(SYS_futex, &fo_pool.epoch, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
            __atomic_sub_fetch(&fo_pool.sleepers, 1, __ATOMIC_SEQ_CST);
            e = __atomic_load_n(&fo_pool.epoch, __ATOMIC_ACQUIRE);
            if (e != seen) return e;
        }
    }

    static void* fo_pool_worker(void* arg) {
        int id = (int)(intptr_t)arg, worked = 1;
        unsigned int seen = __atomic_load_n(&fo_pool.epoch, __ATOMIC_ACQUIRE);
        __atomic_store_n(&fo_pool.tid[id], (pid_t)syscall(SYS_gettid), __ATOMIC_RELEASE);
        __atomic_store_n(&fo_pool.new_worker, 1, __ATOMIC_RELEASE);
        for (;;) {
            seen = fo_pool_wait(seen, worked ? __atomic_load_n(&fo_pool.spin_us,
                                                                __ATOMIC_RELAXED) : 0);
            {
                int team = __atomic_load_n(&fo_pool.active, __ATOMIC_RELAXED);
                worked = id < team && fo_pool_claim(seen, id, team);
            }
        }
        return NULL;
    }

    /* In a forked child only the forking thread exists: no workers, and no
       job in flight (every range used up, so that nothing of a job the
       parent was running can be claimed). */
    static void fo_pool_after_fork(void) {
        int r;
        fo_pool.nworkers = 0;
        fo_pool.max_team = 0;
        fo_pool.busy = 0;
        fo_pool.sleepers = 0;
        fo_pool.done = 0;
        fo_pool.n = 0;
        for (r = 0; r < FO_POOL_MAX; r++) fo_pool.claim[r].word = 0;
        memset(fo_pool.tid, 0, sizeof fo_pool.tid);
        fo_pool_master_cpu = -1;
    }

    /* Workers 1..want-1 running (as many as could be started): the team. */
    static int fo_pool_start(int want) {
        sigset_t all, old;
        if (want > FO_POOL_MAX) want = FO_POOL_MAX;
        if (fo_pool.max_team && want > fo_pool.max_team) want = fo_pool.max_team;
        if (fo_pool.nworkers + 1 >= want) return want;
        if (!fo_pool.at_fork) {
            pthread_atfork(NULL, NULL, fo_pool_after_fork);
            fo_pool.at_fork = 1;
        }
        /* asynchronous signals go to the Python thread (Ctrl-C); a fault in
           a worker still reaches the handlers (faulthandler's traceback) */
        sigfillset(&all);
        sigdelset(&all, SIGSEGV);
        sigdelset(&all, SIGBUS);
        sigdelset(&all, SIGFPE);
        sigdelset(&all, SIGILL);
        sigdelset(&all, SIGABRT);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        while (fo_pool.nworkers + 1 < want) {
            pthread_t th;
            pthread_attr_t attr;
            int ok;
            pthread_attr_init(&attr);
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            ok = pthread_create(&th, &attr, fo_pool_worker,
                                (void*)(intptr_t)(fo_pool.nworkers + 1)) == 0;
            pthread_attr_destroy(&attr);
            if (!ok) {              /* keep the team started so far; no retries */
                fo_pool.max_team = fo_pool.nworkers + 1;
                break;
            }
            fo_pool.nworkers++;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        return fo_pool.nworkers + 1;
    }
    #endif

    /* OpenMP's team, as the steps ran before this one existed: a static
       schedule, then the region's barrier */
    static void fo_pool_openmp(fo_task_fn fn, void* ctx, long long n, int nthreads) {
    #if defined(_OPENMP)
        fo_place_workers(nthreads);
        #pragma omp parallel num_threads(nthreads)
        {
            long long t;
            fo_note_worker(omp_get_thread_num());
            #pragma omp for schedule(static)
            for (t = 0; t < n; t++) fn(ctx, t);
        }
    #else
        (void)nthreads;
        fo_pool_serial(fn, ctx, n);
    #endif
    }

    /* fn(ctx, t) for t in 0..n-1, by the caller and up to nthreads - 1
       workers; returns when every task has finished. */
    static void fo_pool_run(fo_task_fn fn, void* ctx, long long n, int nthreads) {
    #if FO_POOL_FUTEX
        unsigned int e;
        long spins = 0;
        int r;
        if (nthreads < 2 || n < 2) { fo_pool_serial(fn, ctx, n); return; }
        if (!fo_pool.own || n > FO_POOL_MAX_TASKS) {
            fo_pool_openmp(fn, ctx, n, nthreads);
            return;
        }
        {
            int idle = 0;
            if (!__atomic_compare_exchange_n(&fo_pool.busy, &idle, 1, 0,
                                             __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
                fo_pool_serial(fn, ctx, n);     /* another thread's step holds the team */
                return;
            }
        }
        nthreads = fo_pool_start(nthreads);
        fo_place_team(fo_pool.tid, nthreads, &fo_pool.new_worker, &fo_pool_master_cpu);
        e = fo_pool.epoch + 1;
        __atomic_store_n(&fo_pool.fn, fn, __ATOMIC_RELAXED);
        __atomic_store_n(&fo_pool.ctx, ctx, __ATOMIC_RELAXED);
        __atomic_store_n(&fo_pool.n, n, __ATOMIC_RELAXED);
        __atomic_store_n(&fo_pool.done, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&fo_pool.active, nthreads, __ATOMIC_RELAXED);
        for (r = 0; r < nthreads; r++) {
            unsigned long long lo = (unsigned long long)(n * r / nthreads);
            unsigned long long hi = (unsigned long long)(n * (r + 1) / nthreads);
            __atomic_store_n(&fo_pool.claim[r].word,
                             ((unsigned long long)(e & FO_EPOCH_MASK) << (2 * FO_CLAIM_BITS))
                             | (lo << FO_CLAIM_BITS) | hi, __ATOMIC_RELEASE);
        }
        __atomic_store_n(&fo_pool.epoch, e, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&fo_pool.sleepers, __ATOMIC_SEQ_CST) > 0)
            syscall(SYS_futex, &fo_pool.epoch, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
        fo_pool_claim(e, 0, nthreads);
        /* tasks a worker claimed and still runs */
        while (__atomic_load_n(&fo_pool.done, __ATOMIC_ACQUIRE) < n) {
            if (++spins > 10000) sched_yield();     /* past ~0.2-1 ms: a preempted worker */
            else fo_cpu_relax();
        }
        __atomic_store_n(&fo_pool.busy, 0, __ATOMIC_RELEASE);
    #else
        if (nthreads < 2 || n < 2) fo_pool_serial(fn, ctx, n);
        else fo_pool_openmp(fn, ctx, n, nthreads);
    #endif
    }

    static void fo_pool_configure(int own, int spin_us) {
        fo_pool.own = own && FO_POOL_FUTEX;
        __atomic_store_n(&fo_pool.spin_us, spin_us < 0 ? 0 : spin_us, __ATOMIC_RELAXED);
    }
    static int fo_pool_own(void) { return fo_pool.own; }
    static int fo_pool_workers(void) { return fo_pool.nworkers; }
    static int fo_pool_spin_us(void) { return fo_pool.spin_us; }
    """
    ctypedef void (*fo_task_fn)(void* ctx, long long t) noexcept nogil
    void fo_pool_run(fo_task_fn fn, void* ctx, long long n, int nthreads) nogil
    void fo_pool_configure(int own, int spin_us) nogil
    int fo_pool_own() nogil
    int fo_pool_workers() nogil
    int fo_pool_spin_us() nogil


def set_thread_pool(bint own, int spin_us=50):
    """Which team runs a threaded step: fastopt's own (``own``, Linux; its
    workers spin ``spin_us`` microseconds for the next job, then sleep) or
    an OpenMP loop (static schedule)."""
    fo_pool_configure(own, spin_us)


def thread_pool():
    """``(kind, workers started, spin_us)``: kind "fastopt" or "openmp"."""
    return ("fastopt" if fo_pool_own() else "openmp"), fo_pool_workers(), fo_pool_spin_us()

