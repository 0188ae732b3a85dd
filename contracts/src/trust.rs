//! The keys a tree trusts for its own updates: where a tree ships them and
//! what such a key file is. The compose writes them (`[trust] keys` of the
//! manifest), the updater reads them from the deployment an update is based
//! on and makes them the remote's keyring, so trust follows the OS version.

use anyhow::{bail, Result};

/// Where a tree ships its trusted public keys, one armored key per
/// `<FINGERPRINT>.asc` file (relative to the tree's root). Under the
/// read-only `/usr`, not `/etc`: a node-local edit of `/etc` cannot add a
/// key, only a new signed tree can.
pub const TRUSTED_KEYS_DIR: &str = "usr/share/cairn/trusted-keys";

/// The file name suffix of a key in [`TRUSTED_KEYS_DIR`]; other names there
/// are not keys and are ignored.
pub const KEY_SUFFIX: &str = ".asc";

/// A public key file larger than this is not a release key (keyrings of a
/// few keys are a few KiB); it is refused before it is read whole.
pub const MAX_PUBLIC_KEY_BYTES: u64 = 1 << 20;

/// At most this many keys in [`TRUSTED_KEYS_DIR`].
pub const MAX_TRUSTED_KEYS: usize = 64;

pub const ARMOR_PUBLIC: &str = "-----BEGIN PGP PUBLIC KEY BLOCK-----";
pub const ARMOR_SECRET: &str = "-----BEGIN PGP PRIVATE KEY BLOCK-----";

/// Check the bytes of a key file (`what` names it in messages): at most
/// [`MAX_PUBLIC_KEY_BYTES`], an armored public key block, no secret key.
/// Whether gpg can parse it is for the caller to find out.
pub fn check_public_key(what: &str, bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 > MAX_PUBLIC_KEY_BYTES {
        bail!(
            "key file {what} is larger than {} KiB: not a release public key",
            MAX_PUBLIC_KEY_BYTES >> 10
        );
    }
    let text = String::from_utf8_lossy(bytes);
    if text.contains(ARMOR_SECRET) {
        bail!(
            "key file {what} holds a SECRET key: give the public key (`{}` from `host compose keygen`)",
            crate::names::PUBLIC_KEY_FILE
        );
    }
    if !text.trim_start().starts_with(ARMOR_PUBLIC) {
        bail!(
            "key file {what} is not an armored public key (it must begin with {ARMOR_PUBLIC}; export one with `gpg --armor --export KEYID`)"
        );
    }
    Ok(())
}

/// The file name a key with primary `fingerprint` ships under.
pub fn key_file_name(fingerprint: &str) -> String {
    format!("{fingerprint}{KEY_SUFFIX}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_armored_public_keys_pass() {
        let ok = format!("\n{ARMOR_PUBLIC}\n\nabc\n-----END PGP PUBLIC KEY BLOCK-----\n");
        assert!(check_public_key("k", ok.as_bytes()).is_ok());
        let e = format!(
            "{:#}",
            check_public_key("k", ARMOR_SECRET.as_bytes()).unwrap_err()
        );
        assert!(e.contains("SECRET"), "{e}");
        let e = format!(
            "{:#}",
            check_public_key("k", b"\x99\x01binary").unwrap_err()
        );
        assert!(e.contains("not an armored public key"), "{e}");
        let big = vec![b'a'; MAX_PUBLIC_KEY_BYTES as usize + 1];
        let e = format!("{:#}", check_public_key("k", &big).unwrap_err());
        assert!(e.contains("larger than"), "{e}");
        assert_eq!(key_file_name("AB12"), "AB12.asc");
    }
}
