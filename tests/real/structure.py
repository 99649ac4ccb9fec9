"""Builds a large, deterministic Python structure and prints a digest of it.

usage: PYTHONMALLOC=malloc python3 structure.py [scale=1000000]

Used by the lego tests and demo: with PYTHONMALLOC=malloc every object lives in the malloc
heap, so under liblego.so the whole structure is paged through the DRAM cache. The output
depends only on the scale (no hash() of strings, which is randomized per process).

The bulk of the heap is a list of byte strings and ints built and then read in order, as a
log-processing or simulation program would; the dictionaries are kept small enough to stay
hot. (A structure whose every step touches a random place of a heap ten times the cache
measures the disk, not the program: see scripts/bench.sh for random-access numbers.)
"""
import hashlib
import sys

scale = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000

records = []
for i in range(scale):
    key = b"k%09d-" % i
    records.append(key * (1 + i % 9) + b"|%d" % ((i * 7919) % 1_000_003))
numbers = [(i * 7919) % 1_000_003 + 1_000_000 + i for i in range(scale)]

groups = {}
for i in range(0, scale, 50):
    groups.setdefault("g%04d" % (i % 4000), []).append((i, records[i][:8]))

h = hashlib.sha256()
total = 0
for r, n in zip(records, numbers):
    h.update(r)
    total += n
h.update(str(total).encode())
for name in sorted(groups):
    g = groups[name]
    h.update(("%s:%d:%d:%s" % (name, len(g), sum(t[0] for t in g), g[-1][1])).encode())
# A second pass, backwards, after everything above has been built.
for i in range(scale - 1, -1, -3):
    h.update(records[i])
    h.update(str(numbers[i]).encode())

print("scale", scale)
print("records", len(records), "groups", len(groups), "total", total)
print("digest", h.hexdigest())
