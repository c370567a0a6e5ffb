/* What a setuid-root binary from a hostile image does first: say whose rights it runs with.
 * Used by tests/test_security_store.py; compiled static so it runs on any base. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("euid=%d\n", (int)geteuid());
    return 0;
}
