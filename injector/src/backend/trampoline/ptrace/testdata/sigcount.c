/* Target for the exact signal-accounting test of the ptrace session (tests.rs). Three threads
 * sleep in short loops, the main thread blocks in read(2) on stdin. Handlers count every SIGUSR1
 * (recording si_code and si_pid) and every SIGRTMIN (recording si_value). For each line read on
 * stdin it prints
 *   REPORT usr1=<n> code=<si_code of the last> pid=<si_pid of the last> rt=<m> values=<v,v,...>
 * It prints READY once the threads run. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t usr1, usr1_code, usr1_pid, rt;
static volatile int rt_values[64];

static void on_usr1(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    usr1_code = si->si_code;
    usr1_pid = si->si_pid;
    usr1++;
}

static void on_rt(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    if (rt < 64) rt_values[rt] = si->si_value.sival_int;
    rt++;
}

static void *sleeper(void *arg) {
    (void)arg;
    for (;;) usleep(200);
    return NULL;
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sa.sa_sigaction = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_sigaction = on_rt;
    sigaction(SIGRTMIN, &sa, NULL);
    for (int i = 0; i < 3; i++) {
        pthread_t t;
        pthread_create(&t, NULL, sleeper, NULL);
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("READY\n");
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        printf("REPORT usr1=%d code=%d pid=%d rt=%d values=", (int)usr1, (int)usr1_code, (int)usr1_pid, (int)rt);
        for (int i = 0; i < rt && i < 64; i++) printf("%s%d", i ? "," : "", rt_values[i]);
        printf("\n");
    }
    return 0;
}
