//! Anonymous mappings served by lego (`LEGO_MMAP=1`): programs that map, grow, unmap,
//! guard, drop and protect anonymous memory, with a cache far smaller than their mappings,
//! print exactly what they print natively; the statistics show that the mappings' pages were
//! really evicted and fetched back; a JIT's page flips between writable and executable and
//! keeps its code across evictions.

use std::fmt::Write as _;
use std::fs;

use std::process::Command;

use lego_tests::{
    assert_rss_within_cache, assert_same_output, heavy, lego_bin, program, which, Outcome, Run,
    ShimSetup, Stats, TempDir, STATED_OVERHEAD_KIB,
};

/// The cache of every run here, in MiB (the smallest lego accepts).
const CACHE_MIB: u64 = 16;

/// Runs `name ARGS` natively and under lego with `LEGO_MMAP=1` plus `env`, checks the output
/// byte for byte, exit 0, the resident peak and peak RSS within the cache, and returns the
/// stats.
fn served(name: &str, args: &[&str], env: &[(&str, &str)]) -> Stats {
    let _serial = heavy();
    let bin = program(name);
    let native = Run::new(&bin).args(args).measure_rss().run();
    native.assert_success();
    let setup = ShimSetup::new(name, CACHE_MIB);
    let mut run = setup.apply(Run::new(&bin).args(args)).env("LEGO_MMAP", "1");
    for (k, v) in env {
        run = run.env(k, v);
    }
    let shimmed = run.run();
    assert_same_output(&native, &shimmed);
    assert_rss_within_cache(&shimmed, CACHE_MIB, Some(&native));
    let stats = setup.stats();
    stats.assert_oversubscribed(CACHE_MIB);
    let n = |k: &str| {
        stats
            .number(k)
            .unwrap_or_else(|| panic!("no {k} in the stats:\n{}", stats.raw))
    };
    assert_eq!(n("pages_poisoned"), 0, "{}", stats.raw);
    eprintln!(
        "{name}: {} mappings served ({} bytes), {} of their pages evicted; {} pages evicted, {} fetched, peak resident {} pages, peak RSS {:?} KiB (native {:?})",
        n("mappings_served"),
        n("mapped_bytes"),
        n("mapped_pages_evicted"),
        stats.pages_evicted,
        stats.pages_fetched,
        stats.peak_resident_pages,
        shimmed.peak_rss_kib,
        native.peak_rss_kib
    );
    stats
}

/// Runs `name ARGS` natively and under lego with `LEGO_MMAP=1`, checks the output byte for
/// byte and returns the stats; unlike [`served`] it holds the peak RSS to nothing (the callers
/// say why).
fn same_output_with_mappings(name: &str, args: &[&str]) -> Stats {
    let _serial = heavy();
    let bin = program(name);
    let native = Run::new(&bin).args(args).run();
    let setup = ShimSetup::new(name, CACHE_MIB);
    let shimmed = setup
        .apply(Run::new(&bin).args(args))
        .env("LEGO_MMAP", "1")
        .run();
    assert_same_output(&native, &shimmed);
    setup.stats()
}

/// 160 MiB of mappings (then more) in a 16 MiB cache: growth in place and by a move, partial
/// unmaps, PROT_NONE guards and a read-only range (faults reported the same), an mremap the
/// kernel refuses (EFAULT both ways), MADV_DONTNEED and MADV_FREE, MAP_FIXED over its own
/// mapping, MREMAP_FIXED, and 600 mappings of random sizes mapped and unmapped.
#[test]
fn mapping_calls_match_the_kernel_under_a_small_cache() {
    let stats = served("mmap_ops", &["32"], &[]);
    let n = |k: &str| stats.number(k).expect("key");
    assert!(
        n("mappings_served") >= 6,
        "the program's mappings were not served:\n{}",
        stats.raw
    );
    assert!(
        n("mapped_bytes") >= 160 << 20,
        "served fewer bytes than the program maps:\n{}",
        stats.raw
    );
    // The mappings are ten times the cache: most evictions are of their pages.
    assert!(
        n("mapped_pages_evicted") * 2 > stats.pages_evicted,
        "the mappings' pages were not the ones paged:\n{}",
        stats.raw
    );
}

/// With `LEGO_MMAP=0` the same program runs on ordinary mappings: nothing is served.
#[test]
fn mappings_stay_ordinary_when_turned_off() {
    let _serial = heavy();
    let bin = program("mmap_ops");
    let native = Run::new(&bin).args(["8"]).run();
    let setup = ShimSetup::new("mmap-off", CACHE_MIB);
    let shimmed = setup
        .apply(Run::new(&bin).args(["8"]))
        .env("LEGO_MMAP", "0")
        .run();
    assert_same_output(&native, &shimmed);
    let stats = setup.stats();
    assert_eq!(stats.number("mappings_served"), Some(0), "{}", stats.raw);
}

/// A JIT page (served: `LEGO_MMAP_MIN=4K`) flipped 10 000 times between read-write and
/// read-execute, patched while writable and called while executable; every thousand flips
/// a 48 MiB sweep pushes it out of the 16 MiB cache while it is writable, and an always
/// executable page (pinned) is called after each sweep.
#[test]
fn jit_page_flips_between_writable_and_executable() {
    let stats = served("jit", &["10000", "48"], &[("LEGO_MMAP_MIN", "4K")]);
    let n = |k: &str| stats.number(k).expect("key");
    assert_eq!(n("mappings_served"), 2, "{}", stats.raw);
    assert!(
        n("mapped_pages_evicted") >= 1,
        "the code page was never evicted, so its coming back was not tested:\n{}",
        stats.raw
    );
}

/// Whether the compiler tests use their large inputs (`LEGO_TEST_GCC=1`: about 330 MiB of
/// peak RSS and 80 s natively for `gcc`, three minutes a test here) rather than the default
/// ones (about 140 MiB and 18 s for `gcc`), which every run of the suite compiles.
fn large_compiles() -> bool {
    std::env::var_os("LEGO_TEST_GCC").is_some()
}

/// A large C file: `functions` small functions and one `main` that calls them all (the long
/// `main` is what makes `cc1` big: its collector's heap is `mmap`ed in 2 MiB chunks).
fn large_c_file(functions: usize) -> String {
    let mut src = String::from("#include <stdio.h>\n");
    for i in 0..functions {
        let _ = writeln!(
            src,
            "int f{i}(int x){{ int a[16]; for(int j=0;j<16;j++) a[j]=x*j+{i}; int s=0; \
             for(int j=0;j<16;j++) s+=a[j]^(s<<1); return s+{i}; }}"
        );
    }
    src.push_str("int main(void){ int s=0;\n");
    for i in 0..functions {
        let _ = writeln!(src, "s+=f{i}(s);");
    }
    src.push_str("printf(\"%d\\n\",s);}\n");
    src
}

/// A template-heavy C++ file: `types` struct types, each with its own instantiations of
/// `std::map`, `std::vector`, `std::unordered_map`, `std::sort` and `std::function`, in a
/// function that `main` calls (every instantiation is new code for `cc1plus` to build and
/// optimise, and its memory grows with them).
fn template_heavy_cpp_file(types: usize) -> String {
    let mut src = String::from(
        "#include <algorithm>\n#include <cstdio>\n#include <functional>\n#include <map>\n\
         #include <string>\n#include <unordered_map>\n#include <vector>\n",
    );
    for i in 0..types {
        let _ = writeln!(
            src,
            "struct S{i} {{ int a; std::string b; bool operator<(const S{i}& o) const \
             {{ return a < o.a || (a == o.a && b < o.b); }} }};\n\
             long g{i}(int n) {{ std::map<S{i}, std::vector<S{i}>> m; \
             std::unordered_map<int, S{i}> u; std::vector<S{i}> v; \
             for (int j = 0; j < n; j++) {{ S{i} s{{j * {i} % 97, std::to_string(j)}}; \
             v.push_back(s); m[s].push_back(s); u[j] = s; }} \
             std::sort(v.begin(), v.end()); \
             std::function<long(const S{i}&)> f = [](const S{i}& s) {{ return s.a + (long)s.b.size(); }}; \
             long t = 0; for (auto& s : v) t += f(s); for (auto& kv : m) t += (long)kv.second.size(); \
             return t + (long)u.size(); }}"
        );
    }
    src.push_str("int main() { long t = 0;\n");
    for i in 0..types {
        let _ = writeln!(src, "t += g{i}({});", 5 + i % 11);
    }
    src.push_str("std::printf(\"%ld\\n\", t); }\n");
    src
}

/// The largest value of `counter` in the `LEGO_STATS=1` summaries on stderr (one per
/// process: the driver, `cc1`, `as`).
fn largest_in_summaries(out: &Outcome, counter: &str) -> u64 {
    out.stderr
        .lines()
        .filter_map(|l| {
            let mut words = l.strip_prefix("lego:")?.split_whitespace();
            (words.next()? == counter).then(|| words.next()?.parse::<u64>().ok())?
        })
        .max()
        .unwrap_or_else(|| panic!("no {counter} in any summary:\n{out}"))
}

/// `COMPILER -O2 -c` on `source` (written to `file_name`) natively and under `LEGO_MMAP=1`
/// with a cache of a tenth of the native peak RSS (at least lego's 16 MiB): the same object
/// file, the compiler's mapped pages paged (a quarter of what it mapped evicted at least),
/// and the peak RSS within the cache plus the stated overhead plus what the compiler needs
/// for an empty file (its own code and data, which lego does not manage).
fn compiles_paged(compiler: &str, file_name: &str, source: &str, empty: &str) {
    let _serial = heavy();
    let dir = TempDir::new(&format!("{compiler}-big"));
    let src = dir.path().join(file_name);
    fs::write(&src, source).expect("write the generated source file");
    let extension = src
        .extension()
        .expect("a source file name with an extension");
    let tiny = dir.path().join("tiny").with_extension(extension);
    fs::write(&tiny, empty).expect("write the empty source file");
    let binary = which(compiler);
    let compile = |input: &std::path::Path, output: &str| {
        let out = dir.path().join(output);
        Run::new(&binary)
            .args([
                std::ffi::OsStr::new("-O2"),
                std::ffi::OsStr::new("-c"),
                input.as_os_str(),
                std::ffi::OsStr::new("-o"),
                out.as_os_str(),
            ])
            .measure_rss()
    };
    let empty = compile(&tiny, "tiny.o").run();
    empty.assert_success();
    let native = compile(&src, "native.o").run();
    native.assert_success();
    let cache_mib = (native.rss_kib() / 10 / 1024).max(CACHE_MIB);
    let setup = ShimSetup::new(&format!("{compiler}-big"), cache_mib);
    let shimmed = setup
        .apply(compile(&src, "lego.o"))
        .env("LEGO_MMAP", "1")
        .env("LEGO_STATS", "1")
        .run();
    shimmed.assert_success();
    let native_obj = fs::read(dir.path().join("native.o")).expect("native object");
    let lego_obj = fs::read(dir.path().join("lego.o")).expect("lego's object");
    assert!(
        native_obj == lego_obj,
        "{compiler} under lego wrote a different object file ({} bytes against {})",
        lego_obj.len(),
        native_obj.len()
    );
    let evicted = largest_in_summaries(&shimmed, "mapped_pages_evicted");
    let served = largest_in_summaries(&shimmed, "mapped_bytes");
    let limit = cache_mib * 1024 + STATED_OVERHEAD_KIB + empty.rss_kib();
    eprintln!(
        "{compiler} -O2 on {file_name} ({} bytes): native peak RSS {} KiB; under lego with a {cache_mib} MiB cache {} KiB (limit {limit} KiB: cache + {STATED_OVERHEAD_KIB} KiB + {compiler} on an empty file {} KiB); mapped {served} bytes, {evicted} of their pages evicted",
        source.len(),
        native.rss_kib(),
        shimmed.rss_kib(),
        empty.rss_kib()
    );
    assert!(
        evicted * 4096 >= served / 4,
        "the compiler's mappings were not paged (mapped {served} bytes, {evicted} pages evicted):\n{shimmed}"
    );
    assert!(
        shimmed.rss_kib() <= limit,
        "peak RSS {} KiB exceeds {limit} KiB:\n{shimmed}",
        shimmed.rss_kib()
    );
}

/// `gcc -O2` on a large generated C file, paged under a tenth of its peak RSS (see
/// [`compiles_paged`]): 1000 functions by default, 3000 with `LEGO_TEST_GCC=1`.
#[test]
fn gcc_compiles_a_large_file_paged() {
    let functions = if large_compiles() { 3000 } else { 1000 };
    compiles_paged(
        "gcc",
        "big.c",
        &large_c_file(functions),
        "int main(void) { return 0; }\n",
    );
}

/// `g++ -O2` on a generated template-heavy C++ file, paged under a tenth of its peak RSS
/// (see [`compiles_paged`]): GXX_TYPES struct types by default, three times as many with
/// `LEGO_TEST_GCC=1`.
#[test]
fn gxx_compiles_a_template_heavy_file_paged() {
    let types = if large_compiles() {
        3 * GXX_TYPES
    } else {
        GXX_TYPES
    };
    compiles_paged(
        "g++",
        "templates.cpp",
        &template_heavy_cpp_file(types),
        "int main() { return 0; }\n",
    );
}

/// Struct types of the default `g++` test's file (about 200 MiB of peak RSS and 10 s natively
/// here; each type adds about 9 MiB and 0.7 s).
const GXX_TYPES: usize = 6;

/// The durable heap covers served mappings: a 48 MiB mapping (three times the cache) and a
/// mapping with a `PROT_NONE` guard and a read-only part, filled before they were protected,
/// checkpointed (the guard is read past its protection by the epoch cut) and changed again
/// before a normal exit; `lego replay` and `LEGO_RESTORE` give back every byte, and the
/// protections (the guard faults, the read-only part refuses a write).
#[test]
fn mappings_are_restored_with_their_protections() {
    let _serial = heavy();
    let dir = TempDir::new("mmap-durable");
    let store = TempDir::new("mmap-durable-store");
    let log = dir.path().join("log");
    let image = dir.path().join("heap.img");
    let run = |args: &[&str]| {
        Run::new(program("mmap_durable"))
            .args(args)
            .shim()
            .env("LEGO_MMAP", "1")
            .env("LEGO_CACHE_SIZE", format!("{CACHE_MIB}M"))
            .env("LEGO_HEAP_SIZE", "4G")
            .env("LEGO_BACKEND", store.backend())
    };
    let first = run(&["run", "48"]).env("LEGO_LOG_DIR", &log).run();
    first.assert_success();
    let replay = Command::new(lego_bin())
        .arg("replay")
        .arg(&log)
        .arg("-o")
        .arg(&image)
        .output()
        .expect("running lego replay");
    assert!(
        replay.status.success(),
        "lego replay failed:\n{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let restored = run(&["verify"]).env("LEGO_RESTORE", &image).run();
    restored.assert_success();
    assert_eq!(
        restored.stdout,
        "verify: big mapping holds the final bytes\n\
         verify: guard faults on read 1, read-only faults on write 1\n\
         verify: guard holds its bytes once readable\n\
         verify: unmapped and mapped again\n",
        "{restored}"
    );
}

/// A forked child of a program with a served mapping larger than the cache: as for the heap,
/// the fork is served (nothing paged in): the child reads the parent's bytes as of the fork
/// (its evicted pages from the store's copies kept for it), unmaps half, maps and protects new
/// memory, while the parent rewrites its copy; each sees only its own bytes.
#[test]
fn forked_child_keeps_its_copy_of_a_mapping() {
    let stats = same_output_with_mappings("mmap_fork", &["48"]);
    let n = |k: &str| stats.number(k).expect("key");
    assert!(n("mapped_pages_evicted") > 0, "{}", stats.raw);
    assert_eq!(n("fork_page_ins"), 0, "the fork paged in:\n{}", stats.raw);
    assert_eq!(n("forks_served"), 1, "{}", stats.raw);
}

/// A read-only mapping three times the cache: its pages are pinned (never evicted), so once
/// they fill the cache no fault could ever get room; lego serves them beyond the cache instead
/// of waiting (the overflow README states), and the heap block after it still pages.
#[test]
fn pinned_pages_beyond_the_cache_are_served() {
    let stats = same_output_with_mappings("mmap_pinned", &["48"]);
    let pinned_pages = 48 * 256;
    assert!(
        stats.peak_resident_pages >= pinned_pages,
        "the pinned mapping was not resident at once:\n{}",
        stats.raw
    );
    assert!(stats.pages_evicted > 0, "{}", stats.raw);
}
