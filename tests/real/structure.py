"""Builds a large, deterministic Python structure and prints a digest of it.

usage: PYTHONMALLOC=malloc python3 structure.py [scale=1000000]

Used by the lego tests and demo: with PYTHONMALLOC=malloc every object lives in the malloc
heap, so under liblego.so the whole structure is paged through the DRAM cache. The output
depends only on the scale (no hash() of strings, which is randomized per process).
"""
import hashlib
import sys

scale = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000

# Big ints (not the small-int cache), strings of varying length, tuples, dicts of lists.
ints = [(i * 7919) % 1_000_003 + 1_000_000 + i for i in range(scale)]
strs = ["k%09d-%s" % (i, "xyz" * (i % 17)) for i in range(scale)]
index = {s: n for n, s in zip(ints, strs)}
groups = {}
for i in range(scale):
    groups.setdefault("g%05d" % (i % 5000), []).append((i, strs[i][:8]))
floats = [i / 7.0 for i in range(0, scale, 2)]

h = hashlib.sha256()
total = 0
for s in strs:
    n = index[s]
    total += n
    h.update(s.encode())
h.update(str(total).encode())
for name in sorted(groups):
    g = groups[name]
    h.update(("%s:%d:%d:%s" % (name, len(g), sum(t[0] for t in g), g[-1][1])).encode())
h.update(repr(sum(floats)).encode())
# A second pass in another order, after everything above has been built.
for i in range(scale - 1, -1, -97):
    h.update(strs[i].encode())
    h.update(str(ints[i]).encode())

print("scale", scale)
print("entries", len(index), "groups", len(groups), "total", total)
print("digest", h.hexdigest())
