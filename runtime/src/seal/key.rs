//! The key file (`LEGO_KEY_FILE`): [`SealKey::load`] reads it only if it is a regular file of
//! exactly [`KEY_BYTES`] bytes, owned by the user that runs lego and readable by nobody else,
//! and says which of those it is not otherwise. The checks are made on the opened file (not
//! on its path, which could be swapped between a check and the read).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Bytes of the key a key file holds.
pub const KEY_BYTES: usize = 32;

/// Why the key file cannot be used. Each names the file and says what would be right.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error("cannot open the key file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the key file {path} is not a regular file")]
    NotRegular { path: PathBuf },
    #[error(
        "the key file {path} is {len} bytes long; it must hold exactly {KEY_BYTES} random \
         bytes (head -c {KEY_BYTES} /dev/urandom > FILE)"
    )]
    Length { path: PathBuf, len: u64 },
    #[error(
        "the key file {path} is owned by uid {owner}, not by the user running lego (uid {uid})"
    )]
    Owner { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "the key file {path} has mode {mode:04o}: others can read it; make it readable by its \
         owner only (chmod 600)"
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error("reading the key file {path} failed")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The key of a key file. Its bytes are never printed and are zeroed on drop.
pub struct SealKey {
    bytes: [u8; KEY_BYTES],
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl Drop for SealKey {
    fn drop(&mut self) {
        self.bytes.fill(0);
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

impl SealKey {
    /// Reads and checks the key file at `path`.
    pub fn load(path: &Path) -> Result<SealKey, KeyError> {
        let p = || path.to_path_buf();
        let mut file = File::options()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| KeyError::Open { path: p(), source })?;
        let meta = file
            .metadata()
            .map_err(|source| KeyError::Read { path: p(), source })?;
        if !meta.file_type().is_file() {
            return Err(KeyError::NotRegular { path: p() });
        }
        let uid = nix::unistd::geteuid().as_raw();
        if meta.uid() != uid {
            return Err(KeyError::Owner {
                path: p(),
                owner: meta.uid(),
                uid,
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Mode { path: p(), mode });
        }
        if meta.len() != KEY_BYTES as u64 {
            return Err(KeyError::Length {
                path: p(),
                len: meta.len(),
            });
        }
        let mut key = SealKey {
            bytes: [0; KEY_BYTES],
        };
        file.read_exact(&mut key.bytes)
            .map_err(|source| KeyError::Read { path: p(), source })?;
        // A file that grew since it was checked is not the key that was checked.
        let mut more = [0u8; 1];
        match file.read(&mut more) {
            Ok(0) => Ok(key),
            Ok(_) => Err(KeyError::Length {
                path: p(),
                len: KEY_BYTES as u64 + 1,
            }),
            Err(source) => Err(KeyError::Read { path: p(), source }),
        }
    }

    /// A key from bytes (tests, and tools that hold a key already).
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> SealKey {
        SealKey { bytes }
    }

    pub(super) fn bytes(&self) -> &[u8; KEY_BYTES] {
        &self.bytes
    }
}

/// 32 random bits from the system's generator.
pub(super) fn random_u32() -> u32 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the system's random generator (getrandom) works");
    u32::from_le_bytes(b)
}
