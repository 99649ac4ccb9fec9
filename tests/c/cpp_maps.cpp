// Program 7: C++ containers from four std::threads (operator new/delete through malloc).
//
// usage: cpp_maps [keys per thread=18000]
//
// Each thread builds a std::unordered_map<std::string, std::vector<int>> (vectors grown by
// push_back, ~3 KiB each: ~80 MiB per thread with its growth garbage) and a std::map<std::string, long>, churns
// std::strings (build, append, erase), then the main thread merges the four ordered maps
// and prints digests that do not depend on hash-table iteration order or scheduling. Any
// inconsistency prints "WRONG DATA" and exits 1.
//
// Access is kept as local as a well-behaved program's: the table is reserved up front (no
// rehash walks over every node), entries are verified in insertion order, the ordered map
// and the churn ring are small. Random access over 10x the cache would measure the store's
// latency, not the runtime's correctness.
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace {

uint64_t mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

uint64_t digest(const std::string& s) {
    uint64_t h = 1469598103934665603ULL;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ULL;
    return h;
}

struct Result {
    std::map<std::string, long> ordered;
    uint64_t unordered_digest = 0;  // order-independent: a sum of per-entry digests
    uint64_t churn_digest = 0;
    size_t entries = 0;
    bool bad = false;
};

// Keys up to 15 characters fit std::string's inline buffer; every 16th key is longer, so
// some keys live in the heap too.
std::string key_for(int thread, size_t i) {
    std::string k = "t" + std::to_string(thread) + "-" + std::to_string(mix64(i) % 100000000);
    if (i % 16 == 0) k.append(20 + i % 23, static_cast<char>('a' + i % 26));
    return k;
}

void work(int thread, size_t keys, Result* out) {
    std::unordered_map<std::string, std::vector<int>> table;
    table.reserve(keys);
    for (size_t i = 0; i < keys; i++) {
        std::vector<int>& v = table[key_for(thread, i)];
        size_t n = 16 + mix64(i ^ static_cast<uint64_t>(thread)) % 1500;
        for (size_t j = 0; j < n; j++) v.push_back(static_cast<int>(mix64(i * 131 + j) & 0x7fffffff));
    }
    // Re-derive every entry and check it: the containers must hold what was put in.
    for (size_t i = 0; i < keys; i++) {
        auto it = table.find(key_for(thread, i));
        if (it == table.end()) {
            std::printf("WRONG DATA: thread %d lost key %zu\n", thread, i);
            out->bad = true;
            continue;
        }
        uint64_t h = digest(it->first);
        for (int x : it->second) h = mix64(h ^ static_cast<uint64_t>(x));
        out->unordered_digest += h;
    }
    for (size_t i = 0; i < keys; i++) {
        auto it = table.find(key_for(thread, i));
        if (it == table.end()) continue;
        long s = 0;
        for (int x : it->second) s += x % 1000;
        out->ordered[it->first.substr(0, 5)] += s;
    }
    out->entries = table.size();
    // String churn: many short-lived strings of growing and shrinking sizes.
    std::vector<std::string> ring(256);
    for (size_t i = 0; i < keys * 4; i++) {
        std::string& s = ring[mix64(i) % ring.size()];
        if (s.size() > 3000) s.erase(s.size() / 3);
        s += key_for(thread, i);
        out->churn_digest ^= digest(s) + i;
    }
}

}  // namespace

int main(int argc, char** argv) {
    size_t keys = argc > 1 ? std::stoul(argv[1]) : 18000;
    std::vector<Result> results(4);
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; t++) threads.emplace_back(work, t, keys, &results[static_cast<size_t>(t)]);
    for (auto& t : threads) t.join();

    std::map<std::string, long> merged;
    bool bad = false;
    for (size_t t = 0; t < results.size(); t++) {
        const Result& r = results[t];
        std::printf("thread %zu: %zu entries, unordered digest %016llx, churn %016llx\n", t, r.entries,
                    static_cast<unsigned long long>(r.unordered_digest),
                    static_cast<unsigned long long>(r.churn_digest));
        for (const auto& [k, v] : r.ordered) merged[k] += v;
        bad |= r.bad;
    }
    uint64_t h = 0;
    size_t shown = 0;
    for (const auto& [k, v] : merged) {
        h = mix64(h ^ digest(k) ^ static_cast<uint64_t>(v));
        if (shown++ < 5) std::printf("  %s = %ld\n", k.c_str(), v);
    }
    std::printf("merged: %zu prefixes, digest %016llx\n", merged.size(), static_cast<unsigned long long>(h));
    std::printf("%s\n", bad ? "FAILED" : "all checks passed");
    return bad ? 1 : 0;
}
