//! Release keys: make a signing key pair for a new user (`host compose
//! keygen`), find the key a GnuPG home signs with, and read the public keys an
//! image is told to trust. Keys are GnuPG's (libostree signs and verifies
//! through gpgme); making and listing them runs the `gpg` command, as users
//! of `ostree gpg-sign` do.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use ostree::gio;

pub use cairn_contracts::names::PUBLIC_KEY_FILE;

use cairn_contracts::trust::MAX_PUBLIC_KEY_BYTES;

/// Who signs: a key id (or fingerprint) and the GnuPG home holding it
/// (`None`: the user's own, `~/.gnupg`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    pub key_id: String,
    pub homedir: Option<PathBuf>,
}

impl Signer {
    /// The signer from `--gpg-sign` and `--gpg-homedir` (or their variables).
    /// A home without a key id signs with the one secret key it holds, so
    /// `CAIRN_GPG_HOMEDIR=build/keys` alone is enough after `keygen`.
    pub fn resolve(key_id: Option<String>, homedir: Option<PathBuf>) -> Result<Option<Signer>> {
        match (key_id, homedir) {
            (Some(key_id), homedir) => Ok(Some(Signer { key_id, homedir })),
            (None, Some(home)) => {
                let keys = secret_keys(&home)?;
                match keys.as_slice() {
                    [one] => Ok(Some(Signer {
                        key_id: one.clone(),
                        homedir: Some(home),
                    })),
                    [] => bail!(
                        "GnuPG home {} holds no secret key: make one with `host compose keygen DIR`, or name the key with --gpg-sign KEYID",
                        home.display()
                    ),
                    _ => bail!(
                        "GnuPG home {} holds {} secret keys: name the one to sign with, --gpg-sign KEYID ({})",
                        home.display(),
                        keys.len(),
                        keys.join(", ")
                    ),
                }
            }
            (None, None) => Ok(None),
        }
    }

    /// The home directory as libostree's signing calls take it.
    fn homedir_str(&self) -> Option<String> {
        self.homedir.as_ref().map(|h| h.display().to_string())
    }

    /// Sign commit `checksum` of `repo` (its detached metadata).
    pub fn sign_commit(&self, repo: &ostree::Repo, checksum: &str) -> Result<()> {
        let signed = repo
            .sign_commit(
                checksum,
                &self.key_id,
                self.homedir_str().as_deref(),
                gio::Cancellable::NONE,
            )
            .with_context(|| format!("signing commit {checksum} with GPG key {}", self.key_id));
        self.stop_agent();
        signed
    }

    /// Sign the summary of `repo` (`summary.sig`).
    pub fn sign_summary(&self, repo: &ostree::Repo) -> Result<()> {
        let signed = repo
            .add_gpg_signature_summary(
                &[self.key_id.as_str()],
                self.homedir_str().as_deref(),
                gio::Cancellable::NONE,
            )
            .with_context(|| format!("signing the summary with GPG key {}", self.key_id));
        self.stop_agent();
        signed
    }

    /// Stop the gpg-agent that signing started in a home of our own (never the
    /// user's default one), so no daemon outlives the command.
    fn stop_agent(&self) {
        if let Some(home) = &self.homedir {
            stop_agent(home);
        }
    }
}

fn gpg(home: &Path) -> Command {
    let mut c = Command::new("gpg");
    c.arg("--homedir")
        .arg(home)
        .args(["--batch", "--no-tty", "--quiet"])
        .env_remove("GNUPGHOME");
    c
}

fn run_gpg(mut cmd: Command, what: &str) -> Result<Vec<u8>> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: running gpg (Debian package gnupg)"))?;
    if !out.status.success() {
        bail!(
            "{what}: gpg: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn stop_agent(home: &Path) {
    let _ = Command::new("gpgconf")
        .arg("--homedir")
        .arg(home)
        .args(["--kill", "all"])
        .env_remove("GNUPGHOME")
        .output();
}

/// Fingerprints of the secret keys in `home`.
fn secret_keys(home: &Path) -> Result<Vec<String>> {
    if !home.is_dir() {
        bail!(
            "GnuPG home {} does not exist: make a key with `host compose keygen {}`",
            home.display(),
            home.display()
        );
    }
    let mut cmd = gpg(home);
    cmd.args(["--with-colons", "--list-secret-keys"]);
    let listing = run_gpg(
        cmd,
        &format!("listing the secret keys in {}", home.display()),
    );
    stop_agent(home);
    Ok(primary_fingerprints(&String::from_utf8_lossy(&listing?)))
}

/// The fingerprint of each primary key (`sec` or `pub`) in a `--with-colons`
/// listing: the `fpr` record right after it (subkeys have their own).
fn primary_fingerprints(listing: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut want = false;
    for line in listing.lines() {
        let mut fields = line.split(':');
        match fields.next() {
            Some("sec" | "pub") => want = true,
            Some("ssb" | "sub") => want = false,
            Some("fpr") if want => {
                if let Some(f) = fields.nth(8).filter(|f| !f.is_empty()) {
                    out.push(f.to_string());
                }
                want = false;
            }
            _ => {}
        }
    }
    out
}

/// What `keygen` made.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub fingerprint: String,
    /// The armored public key, for `host compose image --trust`.
    pub public_key: PathBuf,
}

/// Make a new release key pair in `dir` (created, mode 0700; it must be new
/// or empty, so an existing key is never touched): an Ed25519 signing key
/// without a passphrase (CI signs unattended; keep `dir` secret) and its
/// public key exported to `dir/cairn-release.asc`.
pub fn generate(dir: &Path, user_id: &str) -> Result<KeyPair> {
    if user_id.is_empty() || user_id.contains(|c: char| c.is_control()) {
        bail!("key name {user_id:?}: give a non-empty name on one line");
    }
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "{} is not empty: keygen makes a key in a new or empty directory and never touches an existing one",
                    dir.display()
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    }
    // Parents as any directory; the key's own directory private.
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("making {} private", dir.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let result = generate_in(dir, user_id);
    stop_agent(dir);
    if result.is_err() {
        // Nothing half-made stays behind: the directory was new or empty.
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

fn generate_in(dir: &Path, user_id: &str) -> Result<KeyPair> {
    let mut cmd = gpg(dir);
    cmd.args(["--pinentry-mode", "loopback", "--passphrase", ""])
        .args(["--quick-generate-key", user_id, "ed25519", "sign", "never"]);
    run_gpg(cmd, &format!("generating a key in {}", dir.display()))?;
    let keys = secret_keys(dir)?;
    let [fingerprint] = keys.as_slice() else {
        bail!(
            "gpg made {} keys in {}, expected one",
            keys.len(),
            dir.display()
        );
    };
    let mut cmd = gpg(dir);
    cmd.args(["--armor", "--export", fingerprint]);
    let public = run_gpg(cmd, "exporting the public key")?;
    let public_key = dir.join(PUBLIC_KEY_FILE);
    cairn_contracts::durable::write_mode(&public_key, &public, 0o644)?;
    Ok(KeyPair {
        fingerprint: fingerprint.clone(),
        public_key,
    })
}

/// Read an armored public key file for `--trust`: bounded in size, and
/// refused if it is not a public key block (a secret key never goes into an
/// image).
pub fn read_public_key(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening key file {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_PUBLIC_KEY_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading key file {}", path.display()))?;
    cairn_contracts::trust::check_public_key(&path.display().to_string(), &bytes)?;
    Ok(bytes)
}

/// A trusted public key, read and checked: its armored bytes and the
/// fingerprints of the primary keys in it.
#[derive(Debug, Clone)]
pub struct PublicKey {
    pub path: PathBuf,
    pub armored: Vec<u8>,
    pub fingerprints: Vec<String>,
}

impl PublicKey {
    /// Read `path` ([`read_public_key`]) and let gpg parse it, in a scratch
    /// home: a file gpg cannot read as keys is refused here, not on the node.
    pub fn load(path: &Path) -> Result<PublicKey> {
        let armored = read_public_key(path)?;
        PublicKey::parse(path, armored)
    }

    /// Check `armored` (read from `path`, named in messages) as
    /// [`read_public_key`] does and let gpg parse it, in a scratch home.
    pub fn parse(path: &Path, armored: Vec<u8>) -> Result<PublicKey> {
        use std::io::Write;
        cairn_contracts::trust::check_public_key(&path.display().to_string(), &armored)?;
        let home = tempfile::tempdir().context("creating a scratch GnuPG home")?;
        let mut child = gpg(home.path())
            .args(["--with-colons", "--show-keys"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running gpg (Debian package gnupg)")?;
        let fed = child
            .stdin
            .take()
            .context("gpg's stdin")?
            .write_all(&armored);
        let out = child.wait_with_output().context("waiting for gpg")?;
        stop_agent(home.path());
        if fed.is_err() || !out.status.success() {
            bail!(
                "key file {}: gpg cannot read it as public keys: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let fingerprints = primary_fingerprints(&String::from_utf8_lossy(&out.stdout));
        if fingerprints.is_empty() {
            bail!("key file {} holds no public key", path.display());
        }
        Ok(PublicKey {
            path: path.to_owned(),
            armored,
            fingerprints,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_contracts::trust::{ARMOR_PUBLIC, ARMOR_SECRET};

    #[test]
    fn primary_fingerprints_skip_subkeys() {
        let listing = "sec:u:255:22:AAAA:1:::u:::scESC:::+:::23::0:\n\
             fpr:::::::::1111222233334444555566667777888899990000:\n\
             grp:::::::::ABCD:\n\
             uid:u::::1::X::cairn release key::::::::::0:\n\
             ssb:u:255:18:BBBB:1::::::e:::+:::cv25519::\n\
             fpr:::::::::FFFF222233334444555566667777888899990000:\n\
             sec:u:255:22:CCCC:1:::u:::scESC:::+:::23::0:\n\
             fpr:::::::::2222222233334444555566667777888899990000:\n";
        assert_eq!(
            primary_fingerprints(listing),
            vec![
                "1111222233334444555566667777888899990000".to_string(),
                "2222222233334444555566667777888899990000".to_string()
            ]
        );
    }

    #[test]
    fn public_key_files_are_checked_before_use() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.asc");
        std::fs::write(
            &p,
            format!("\n{ARMOR_PUBLIC}\n\nabc\n-----END PGP PUBLIC KEY BLOCK-----\n"),
        )
        .unwrap();
        assert!(read_public_key(&p).is_ok());
        std::fs::write(&p, format!("{ARMOR_SECRET}\nabc\n")).unwrap();
        let e = format!("{:#}", read_public_key(&p).unwrap_err());
        assert!(e.contains("SECRET"), "{e}");
        std::fs::write(&p, b"\x99\x01binary keyring").unwrap();
        let e = format!("{:#}", read_public_key(&p).unwrap_err());
        assert!(e.contains("not an armored public key"), "{e}");
        let big = vec![b'a'; (MAX_PUBLIC_KEY_BYTES + 10) as usize];
        std::fs::write(&p, big).unwrap();
        let e = format!("{:#}", read_public_key(&p).unwrap_err());
        assert!(e.contains("larger than"), "{e}");
        let e = format!(
            "{:#}",
            read_public_key(&dir.path().join("none")).unwrap_err()
        );
        assert!(e.contains("opening key file"), "{e}");
    }

    #[test]
    fn keygen_refuses_a_directory_with_anything_in_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pubring.kbx"), b"x").unwrap();
        let e = format!("{:#}", generate(dir.path(), "t").unwrap_err());
        assert!(e.contains("is not empty"), "{e}");
        assert!(dir.path().join("pubring.kbx").exists(), "left as it was");
        let e = format!(
            "{:#}",
            generate(&dir.path().join("new"), "a\nb").unwrap_err()
        );
        assert!(e.contains("one line"), "{e}");
        assert!(!dir.path().join("new").exists());
    }

    #[test]
    fn a_signer_is_named_or_found_in_its_home() {
        assert_eq!(Signer::resolve(None, None).unwrap(), None);
        let s = Signer::resolve(Some("ABCD".into()), None).unwrap().unwrap();
        assert_eq!(s.key_id, "ABCD");
        let e = format!(
            "{:#}",
            Signer::resolve(None, Some("/nonexistent/keys".into())).unwrap_err()
        );
        assert!(e.contains("does not exist"), "{e}");
    }
}
