//! Fernet decryption, for channels_redis's `symmetric_encryption_keys`.
//!
//! channels_redis encrypts with `MultiFernet([Fernet(urlsafe_b64encode(sha256(key)))…])`
//! (serializers.py): each configured key is hashed with SHA-256, whose first 16 bytes
//! sign and last 16 bytes encrypt. A token is base64url of `0x80 ‖ timestamp (8 bytes,
//! big endian) ‖ IV (16) ‖ AES-128-CBC ciphertext (PKCS#7) ‖ HMAC-SHA256 (32)` over
//! everything before the HMAC (https://github.com/fernet/spec). As `MultiFernet`, every
//! key is tried in order. The core layer decrypts with a TTL of `expiry + 10` seconds,
//! the pub/sub layer with none; a token from more than 60 s in the future is refused.

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockDecryptMut, KeyIvInit};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::config::Secret;

type Aes128CbcDec = cbc::Decryptor<aes::Aes128>;

/// Fernet's tolerance for tokens stamped in the future.
const MAX_CLOCK_SKEW_SECS: u64 = 60;

const VERSION: u8 = 0x80;
const HEADER_LEN: usize = 1 + 8 + 16;
const HMAC_LEN: usize = 32;

/// Why a token could not be decrypted. Deliberately vague, like Fernet's `InvalidToken`:
/// the reason never depends on the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FernetError {
    #[error("not a Fernet token")]
    Malformed,
    #[error("no configured key decrypts it (check symmetric_encryption_keys)")]
    WrongKey,
    #[error("the token is older than its TTL, or stamped in the future")]
    Expired,
}

/// The keys of a `MultiFernet`.
#[derive(Clone)]
pub struct Fernet {
    /// (signing key, encryption key) per configured key, in order.
    keys: Vec<([u8; 16], [u8; 16])>,
}

impl std::fmt::Debug for Fernet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fernet({} keys)", self.keys.len())
    }
}

impl Fernet {
    /// The keys channels_redis derives from `symmetric_encryption_keys`.
    pub fn from_secrets(secrets: &[Secret]) -> Self {
        let keys = secrets
            .iter()
            .map(|secret| {
                let digest: [u8; 32] = Sha256::digest(secret.expose().as_bytes()).into();
                split_key(&digest)
            })
            .collect();
        Self { keys }
    }

    /// A plain Fernet key (32 bytes, as base64url in Python's `Fernet(key)`).
    pub fn from_raw_keys(raw: &[[u8; 32]]) -> Self {
        Self {
            keys: raw.iter().map(split_key).collect(),
        }
    }

    /// Whether `bytes` look like a Fernet token (base64url of a version-0x80 header),
    /// to tell an encrypted message from a corrupt one.
    pub fn looks_like_token(bytes: &[u8]) -> bool {
        bytes.starts_with(b"gAAAAA")
    }

    /// Decrypts `token` as of `now` (Unix seconds); `ttl` in seconds, if any.
    pub fn decrypt(&self, token: &[u8], ttl: Option<u64>, now: u64) -> Result<Vec<u8>, FernetError> {
        let data = base64::engine::general_purpose::URL_SAFE
            .decode(token)
            .map_err(|_| FernetError::Malformed)?;
        if data.len() < HEADER_LEN + 16 + HMAC_LEN
            || data[0] != VERSION
            || (data.len() - HEADER_LEN - HMAC_LEN) % 16 != 0
        {
            return Err(FernetError::Malformed);
        }
        let mut stamp = [0u8; 8];
        stamp.copy_from_slice(&data[1..9]);
        let timestamp = u64::from_be_bytes(stamp);
        let (signed, tag) = data.split_at(data.len() - HMAC_LEN);
        let mut key_found = None;
        for (signing, encryption) in &self.keys {
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(signing) else {
                continue;
            };
            mac.update(signed);
            if mac.verify_slice(tag).is_ok() {
                key_found = Some(encryption);
                break;
            }
        }
        let encryption = key_found.ok_or(FernetError::WrongKey)?;
        if let Some(ttl) = ttl {
            if timestamp.saturating_add(ttl) < now {
                return Err(FernetError::Expired);
            }
        }
        if now.saturating_add(MAX_CLOCK_SKEW_SECS) < timestamp {
            return Err(FernetError::Expired);
        }
        let iv = &signed[9..HEADER_LEN];
        let ciphertext = &signed[HEADER_LEN..];
        Aes128CbcDec::new(encryption.into(), iv.into())
            .decrypt_padded_vec_mut::<Pkcs7>(ciphertext)
            .map_err(|_| FernetError::Malformed)
    }
}

fn split_key(raw: &[u8; 32]) -> ([u8; 16], [u8; 16]) {
    let mut signing = [0u8; 16];
    let mut encryption = [0u8; 16];
    signing.copy_from_slice(&raw[..16]);
    encryption.copy_from_slice(&raw[16..]);
    (signing, encryption)
}
