/* Program 8: proves whether main ran.
 *
 * usage: hello [exit status=0]
 *
 * Prints "main ran" first thing (flushed), makes a few small allocations, and exits with
 * the given status (the CLI test checks that the status passes through `lego run`). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    printf("main ran\n");
    fflush(stdout);
    char *p = malloc(100);
    if (!p) return 1;
    strcpy(p, "heap works");
    char *q = strdup(p);
    printf("%s\n", q ? q : "strdup failed");
    free(q);
    free(p);
    return argc > 1 ? atoi(argv[1]) : 0;
}
