use std::os::unix::fs::PermissionsExt;

use proptest::prelude::*;

use super::*;

fn sealer(heap: u64) -> Sealer {
    Sealer::new(&SealKey::from_bytes([7; KEY_BYTES]), heap)
}

const AS: SealedAs = SealedAs {
    page: 12,
    version: 3,
    crc: 0x5eed_c0de,
    part: 0,
};

fn sealed(s: &Sealer, what: SealedAs, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    s.seal_into(what, data, &mut v).expect("seals");
    v
}

#[test]
fn a_page_round_trips_and_its_plaintext_is_not_in_the_value() {
    let s = sealer(1);
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let v = sealed(&s, AS, &page);
    assert_eq!(v.len(), page.len() + SEALED_OVERHEAD_BYTES);
    assert!(
        !v.windows(16).any(|w| w == &page[100..116]),
        "plaintext leaked"
    );
    let mut out = vec![0u8; 4096];
    s.open_into(AS, &v, &mut out).expect("opens");
    assert_eq!(out, page);
}

#[test]
fn another_page_version_checksum_part_heap_or_key_does_not_open() {
    let s = sealer(1);
    let page = [0x5au8; 4096];
    let v = sealed(&s, AS, &page);
    let mut out = [0u8; 4096];
    for other in [
        SealedAs { page: 13, ..AS },
        SealedAs { version: 2, ..AS },
        SealedAs {
            crc: 0x5eed_c0df,
            ..AS
        },
        SealedAs { part: 1, ..AS },
    ] {
        assert_eq!(s.open_into(other, &v, &mut out), Err(SealError::Forged));
        assert_eq!(out, [0u8; 4096], "no plaintext on failure");
    }
    assert_eq!(
        sealer(2).open_into(AS, &v, &mut out),
        Err(SealError::Forged)
    );
    let other_key = Sealer::new(&SealKey::from_bytes([8; KEY_BYTES]), 1);
    assert_eq!(
        other_key.open_into(AS, &v, &mut out),
        Err(SealError::Forged)
    );
    // The same key and heap under a new incarnation (a restore) opens the old values.
    sealer(1)
        .open_into(AS, &v, &mut out)
        .expect("same key, same heap");
}

#[test]
fn nonces_are_unique_per_seal_and_per_incarnation() {
    let s = sealer(1);
    let a = sealed(&s, AS, &[1u8; 64]);
    let b = sealed(&s, AS, &[1u8; 64]);
    assert_ne!(a[..NONCE_BYTES], b[..NONCE_BYTES]);
    assert_ne!(a, b, "the same page sealed twice gives two values");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..64 {
        let v = sealed(&sealer(1), AS, &[1u8; 8]);
        seen.insert(v[..4].to_vec());
    }
    assert!(
        seen.len() > 60,
        "incarnations are random: {} of 64 distinct",
        seen.len()
    );
}

#[test]
fn a_value_of_the_wrong_length_is_refused() {
    let s = sealer(1);
    let v = sealed(&s, AS, &[1u8; 4096]);
    let mut out = [0u8; 4096];
    assert!(matches!(
        s.open_into(AS, &v[..v.len() - 1], &mut out),
        Err(SealError::Length { .. })
    ));
    assert!(matches!(
        s.open_into(AS, &v, &mut out[..4095]),
        Err(SealError::Length { .. })
    ));
}

#[test]
fn a_spent_counter_stops_sealing() {
    let s = sealer(1);
    s.counter.store(u64::MAX, Ordering::Relaxed);
    let mut v = Vec::new();
    assert_eq!(
        s.seal_into(AS, &[0u8; 8], &mut v),
        Err(SealError::NoncesUsed)
    );
    assert_eq!(
        s.seal_into(AS, &[0u8; 8], &mut v),
        Err(SealError::NoncesUsed)
    );
}

#[test]
fn debug_output_shows_no_key() {
    let k = SealKey::from_bytes([0xab; KEY_BYTES]);
    assert_eq!(format!("{k:?}"), "SealKey(..)");
    let s = Sealer::new(&k, 0x1234);
    let d = format!("{s:?}");
    assert!(!d.contains("ab, ab") && !d.contains("171"), "{d}");
}

fn key_file(dir: &std::path::Path, bytes: &[u8], mode: u32) -> std::path::PathBuf {
    let path = dir.join("key");
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, bytes).expect("writes");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path
}

#[test]
fn the_key_file_is_checked() {
    let dir = crate::test_support::TestDir::new("seal-key");
    let good = key_file(dir.path(), &[9u8; KEY_BYTES], 0o600);
    let k = SealKey::load(&good).expect("a good key file");
    assert_eq!(k.bytes(), &[9u8; KEY_BYTES]);
    SealKey::load(&key_file(dir.path(), &[9u8; KEY_BYTES], 0o400)).expect("read-only is fine");

    let err = SealKey::load(&key_file(dir.path(), &[9u8; KEY_BYTES], 0o644)).unwrap_err();
    assert!(matches!(err, KeyError::Mode { mode: 0o644, .. }), "{err}");
    assert!(err.to_string().contains("chmod 600"), "{err}");
    let err = SealKey::load(&key_file(dir.path(), &[9u8; KEY_BYTES], 0o640)).unwrap_err();
    assert!(matches!(err, KeyError::Mode { .. }), "{err}");
    for len in [0, 31, 33, 64] {
        let err = SealKey::load(&key_file(dir.path(), &vec![1u8; len], 0o600)).unwrap_err();
        assert!(matches!(err, KeyError::Length { .. }), "{len}: {err}");
        assert!(err.to_string().contains("/dev/urandom"), "{err}");
    }
    let err = SealKey::load(&dir.path().join("missing")).unwrap_err();
    assert!(matches!(err, KeyError::Open { .. }), "{err}");
    let err = SealKey::load(dir.path()).unwrap_err();
    assert!(
        matches!(err, KeyError::NotRegular { .. } | KeyError::Open { .. }),
        "{err}"
    );
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let err = SealKey::load(&fifo).unwrap_err();
    assert!(matches!(err, KeyError::NotRegular { .. }), "{err}");
    if nix::unistd::geteuid().is_root() {
        let other = key_file(dir.path(), &[9u8; KEY_BYTES], 0o600);
        std::os::unix::fs::chown(&other, Some(65534), None).expect("chown");
        let err = SealKey::load(&other).unwrap_err();
        assert!(matches!(err, KeyError::Owner { owner: 65534, .. }), "{err}");
    }
}

proptest! {
    #[test]
    fn any_change_to_a_sealed_value_is_refused(
        data in proptest::collection::vec(any::<u8>(), 1..4200),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let s = sealer(42);
        let mut v = sealed(&s, AS, &data);
        let mut out = vec![0u8; data.len()];
        s.open_into(AS, &v, &mut out).expect("opens");
        prop_assert_eq!(&out, &data);
        let i = at.index(v.len());
        v[i] ^= flip;
        prop_assert_eq!(s.open_into(AS, &v, &mut out), Err(SealError::Forged));
    }
}
