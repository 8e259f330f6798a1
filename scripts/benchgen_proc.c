/* benchgen: the server's CPU and memory from /proc (see benchgen.h). */
#define _GNU_SOURCE
#include "benchgen.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

/*
 * The server is the process tree under --server-pid: luamilter runs a
 * supervisor and worker processes, so CPU and memory are summed over the
 * supervisor and its descendants. */

#define MAX_PROCS 1024

/* Reads fields of /proc/PID/stat after "(comm)"; returns -1 if gone. */
static int proc_stat(int pid, int *ppid, unsigned long t[4])
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p)
        return -1;
    long lt[4] = {0, 0, 0, 0};
    /* state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17) */
    if (sscanf(p + 2,
               "%*c %d %*d %*d %*d %*d %*u %*u %*u %*u %*u %ld %ld %ld %ld",
               ppid, &lt[0], &lt[1], &lt[2], &lt[3]) != 5)
        return -1;
    for (int i = 0; i < 4; i++)
        t[i] = (unsigned long)lt[i];
    return 0;
}

/* The root and every live descendant; returns how many. */
static int proc_tree(int root, int *pids)
{
    int n = 0;
    pids[n++] = root;
    DIR *d = opendir("/proc");
    if (!d)
        return n;
    int cand[MAX_PROCS], ppids[MAX_PROCS], nc = 0;
    struct dirent *e;
    while ((e = readdir(d)) && nc < MAX_PROCS) {
        int pid = atoi(e->d_name);
        unsigned long t[4];
        int pp;
        if (pid > 0 && pid != root && proc_stat(pid, &pp, t) == 0) {
            cand[nc] = pid;
            ppids[nc++] = pp;
        }
    }
    closedir(d);
    for (int grew = 1; grew && n < MAX_PROCS;) {
        grew = 0;
        for (int i = 0; i < nc; i++) {
            if (!cand[i])
                continue;
            for (int k = 0; k < n; k++)
                if (ppids[i] == pids[k]) {
                    pids[n++] = cand[i];
                    cand[i] = 0;
                    grew = 1;
                    break;
                }
        }
    }
    return n;
}

/* CPU seconds of the tree: live processes, plus children the root reaped. */
double proc_cpu(int root, int *nprocs)
{
    int pids[MAX_PROCS], n = proc_tree(root, pids);
    unsigned long sum = 0;
    for (int i = 0; i < n; i++) {
        unsigned long t[4];
        int pp;
        if (proc_stat(pids[i], &pp, t) < 0) {
            if (i == 0)
                return -1;
            continue;
        }
        sum += t[0] + t[1] + (i == 0 ? t[2] + t[3] : 0);
    }
    if (nprocs)
        *nprocs = n;
    return (double)sum / (double)sysconf(_SC_CLK_TCK);
}

static long status_kb(int pid, const char *key)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    long v = -1;
    size_t kl = strlen(key);
    while (fgets(line, sizeof line, f))
        if (strncmp(line, key, kl) == 0 && line[kl] == ':') {
            v = strtol(line + kl + 1, NULL, 10);
            break;
        }
    fclose(f);
    return v;
}

/* Sum of a /proc/PID/status field (VmRSS, VmHWM) over the tree. */
long proc_status_kb(int root, const char *key)
{
    int pids[MAX_PROCS], n = proc_tree(root, pids);
    long sum = 0;
    for (int i = 0; i < n; i++) {
        long v = status_kb(pids[i], key);
        if (v < 0 && i == 0)
            return -1;
        if (v > 0)
            sum += v;
    }
    return sum;
}

void proc_reset_hwm(int root)
{
    int pids[MAX_PROCS], n = proc_tree(root, pids);
    for (int i = 0; i < n; i++) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/clear_refs", pids[i]);
        FILE *f = fopen(path, "w");
        if (f) {
            fputs("5", f); /* 5: reset the peak RSS (VmHWM) */
            fclose(f);
        }
    }
}

/* Busy CPU seconds of the whole machine (all CPUs), from /proc/stat. */
double proc_machine_busy(void)
{
    FILE *f = fopen("/proc/stat", "r");
    if (!f)
        return -1;
    unsigned long long v[8] = {0};
    int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0],
                   &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]);
    fclose(f);
    if (n != 8)
        return -1;
    /* user nice system [idle iowait] irq softirq steal */
    unsigned long long busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    return (double)busy / (double)sysconf(_SC_CLK_TCK);
}

double proc_self_cpu(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 +
           (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
}
