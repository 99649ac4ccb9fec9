/* lego.h: the durable heap's API, exported by liblego.so (LD_PRELOAD).
 *
 * A program that never calls these still gets crash-consistent epochs every LEGO_FLUSH_MS
 * when LEGO_LOG_DIR is set. Programs that want to find their data after a restore
 * (LEGO_RESTORE=IMAGE) hang it off the root pointer, and call lego_checkpoint() where they
 * need a durable point.
 *
 * Declare the functions weak to run with or without liblego.so:
 *     #pragma weak lego_checkpoint
 *     if (lego_checkpoint) lego_checkpoint();
 */
#ifndef LEGO_H
#define LEGO_H

#ifdef __cplusplus
extern "C" {
#endif

/* Returns once every write the program made before the call is in a committed epoch of the
 * log (durable on disk with LEGO_SYNC=fdatasync, the default), with that epoch's number
 * (`lego replay --epoch N` rebuilds exactly it). Returns -1 with errno ENOTSUP when the heap
 * has no log (LEGO_LOG_DIR unset, or in a forked child), or EIO when the log could not be
 * written (the heap in memory is intact; the log keeps its last committed epoch). Other
 * threads keep running; only their writes made before the call are covered. */
long lego_checkpoint(void);

/* The root pointer kept in the heap's header: NULL in a new heap, and after a restore what
 * lego_set_root last stored before the epoch that was restored. */
void *lego_root(void);

/* Stores the root pointer (a pointer into the lego heap, or NULL). It is part of the heap:
 * it becomes durable with the next epoch, like any write. */
void lego_set_root(void *p);

#ifdef __cplusplus
}
#endif

#endif /* LEGO_H */
