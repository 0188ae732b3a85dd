//! GRUB (BIOS) as the bootloader of cairn disks: the `grub.cfg` generator that
//! libostree's grub2 backend runs on every deployment change, and the GRUB
//! environment block (`/boot/grub/grubenv`) that carries the boot counter.
//!
//! libostree writes one BLS entry per deployment into
//! `/boot/loader.N/entries/ostree-*.conf`, runs `$OSTREE_GRUB2_EXEC -o
//! /boot/loader.N/grub.cfg` (the `host` executable: under the name
//! [`GENERATOR_NAME`] on a node, or the running `host-full` itself, see
//! [`is_generator_call`]), and then flips the `/boot/loader` symlink.
//! `/boot/grub/grub.cfg` is a symlink to `../loader/grub.cfg`, so GRUB always
//! reads the menu of the deployment set that was swapped in last.
//!
//! The menu begins with the boot counter (greenboot's semantics, written
//! without GRUB's `increment` module, which Debian's GRUB 2.06 lacks): when
//! `boot_success=0` and `boot_counter` is set, every boot counts down; once it
//! has run out, entry 1 (the previous deployment) boots and `boot_counter=-1`
//! tells user space that GRUB fell back.
//! Everything here is pure file work; the policy (when to arm, what to do
//! after a fallback) lives in the updater.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The name `host` answers to as libostree's `OSTREE_GRUB2_EXEC`.
pub const GENERATOR_NAME: &str = "grub2-generate";
/// Where the tree carries the generator: a symlink to `/usr/bin/host`.
pub const GENERATOR_PATH: &str = "/usr/lib/cairn/grub2-generate";
/// The variable that names libostree's GRUB menu generator.
pub const GENERATOR_ENV: &str = "OSTREE_GRUB2_EXEC";
/// What libostree's grub2 backend sets in its generator's environment (and
/// nowhere else): with `-o FILE` it tells the generator by its call, whatever
/// the executable is named (see [`is_generator_call`]).
pub const BOOTVERSION_ENV: &str = "_OSTREE_GRUB2_BOOTVERSION";
/// The environment block, relative to the /boot file system.
pub const GRUBENV: &str = "grub/grubenv";
/// Size of a GRUB environment block; GRUB rewrites it in place, never resizes it.
pub const GRUBENV_SIZE: usize = 1024;
const GRUBENV_HEADER: &str = "# GRUB Environment Block\n";
/// Attempts a new deployment gets before GRUB falls back to the previous one.
pub const BOOT_ATTEMPTS: u32 = 3;
/// The largest counter value the generated menu counts down from.
const MAX_COUNTER: u32 = 9;
/// Variables of the boot counter in the environment block.
pub const BOOT_COUNTER: &str = "boot_counter";
pub const BOOT_SUCCESS: &str = "boot_success";
/// Seconds the menu waits on the serial console.
const TIMEOUT_SECS: u32 = 1;

/// One BLS entry as libostree writes it (`ostree-N-<osname>.conf`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootEntry {
    /// The file it was read from.
    pub file: String,
    pub title: Option<String>,
    pub version: Option<String>,
    pub options: Option<String>,
    pub linux: String,
    pub initrd: Option<String>,
    pub devicetree: Option<String>,
}

/// Parse one entry: `key value` lines (split at the first blank), `#` comments.
pub fn parse_entry(file: &str, text: &str) -> Result<BootEntry> {
    let mut e = BootEntry {
        file: file.to_string(),
        ..Default::default()
    };
    let mut linux = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once([' ', '\t']) {
            Some((k, v)) => (k, v.trim().to_string()),
            None => (line, String::new()),
        };
        match key {
            "title" => e.title = Some(value),
            "version" => e.version = Some(value),
            "options" => e.options = Some(value),
            "linux" => linux = Some(value),
            "initrd" => e.initrd = Some(value),
            "devicetree" => e.devicetree = Some(value),
            _ => {}
        }
    }
    e.linux = linux.with_context(|| format!("boot entry {file} has no `linux` line"))?;
    Ok(e)
}

/// glibc's `strverscmp` for what libostree puts in `version`: digit runs
/// compare as numbers, everything else byte by byte.
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (&a[..na], &b[..nb]);
                let strip = |d: &[u8]| {
                    let z = d.iter().take_while(|&&c| c == b'0').count();
                    d[z..].to_vec()
                };
                let (sa, sb) = (strip(da), strip(db));
                let ord = sa.len().cmp(&sb.len()).then_with(|| sa.cmp(&sb));
                if ord != std::cmp::Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

/// Sort as libostree does: highest `version` first (that is the default
/// deployment), entries without a version last.
pub fn sort_entries(entries: &mut [BootEntry]) {
    entries.sort_by(|a, b| match (&a.version, &b.version) {
        (Some(x), Some(y)) => version_cmp(y, x),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.file.cmp(&b.file),
    });
}

/// The `ostree-*.conf` entries of a loader directory, in boot order.
pub fn read_entries(dir: &Path) -> Result<Vec<BootEntry>> {
    let mut entries = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(entries),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for item in rd {
        let item = item.with_context(|| format!("reading {}", dir.display()))?;
        let name = item.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("ostree-") && name.ends_with(".conf")) {
            continue;
        }
        if !item.file_type()?.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(item.path())
            .with_context(|| format!("reading boot entry {}", item.path().display()))?;
        entries.push(parse_entry(&name, &text)?);
    }
    sort_entries(&mut entries);
    Ok(entries)
}

/// GRUB single-quoted word (a `'` ends the quote, is escaped, and reopens it).
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The whole `grub.cfg`: console, boot counter, one menu entry per deployment
/// (entry 0 the default one, entry 1 the previous one).
pub fn render_config(entries: &[BootEntry]) -> String {
    let mut s = String::new();
    s.push_str(
        "# Written by cairn's GRUB generator (host as grub2-generate), run by libostree\n\
         # on every deployment change. Do not edit: the next upgrade rewrites it.\n",
    );
    s.push_str("serial --unit=0 --speed=115200\n");
    s.push_str("terminal_input serial console\n");
    s.push_str("terminal_output serial console\n");
    s.push_str(&format!("set timeout={TIMEOUT_SECS}\n"));
    s.push_str("set default=0\n\n");
    s.push_str(
        "# Boot counting: user space arms boot_counter with boot_success=0 for a new\n\
         # deployment and sets boot_success=1 once it is healthy. Each boot of an armed\n\
         # deployment counts down; when none are left, the previous deployment (entry 1)\n\
         # boots and boot_counter=-1 tells user space so.\n",
    );
    s.push_str(&format!(
        "load_env {BOOT_COUNTER} {BOOT_SUCCESS}\n\
         if [ -n \"${{{BOOT_COUNTER}}}\" -a \"${{{BOOT_SUCCESS}}}\" = \"0\" ]; then\n"
    ));
    s.push_str(&format!(
        "  if [ \"${{{BOOT_COUNTER}}}\" = \"0\" -o \"${{{BOOT_COUNTER}}}\" = \"-1\" ]; then\n\
         \x20   set default=1\n\
         \x20   set {BOOT_COUNTER}=-1\n"
    ));
    for n in (1..=MAX_COUNTER).rev() {
        s.push_str(&format!(
            "  elif [ \"${{{BOOT_COUNTER}}}\" = \"{n}\" ]; then\n    set {BOOT_COUNTER}={}\n",
            n - 1
        ));
    }
    s.push_str(&format!(
        "  else\n    set default=1\n    set {BOOT_COUNTER}=-1\n  fi\n  save_env {BOOT_COUNTER}\nfi\n"
    ));
    for (i, e) in entries.iter().enumerate() {
        let title = e.title.as_deref().unwrap_or("(Untitled)");
        s.push_str(&format!(
            "\nmenuentry {} --class gnu-linux --class os --unrestricted --id {} {{\n",
            quote(title),
            quote(&format!("ostree-{i}"))
        ));
        s.push_str("  insmod gzio\n");
        s.push_str(&format!("  linux {}", e.linux));
        if let Some(o) = e.options.as_deref().filter(|o| !o.is_empty()) {
            s.push(' ');
            s.push_str(o);
        }
        s.push('\n');
        if let Some(i) = &e.initrd {
            s.push_str(&format!("  initrd {i}\n"));
        }
        if let Some(d) = &e.devicetree {
            s.push_str(&format!("  devicetree {d}\n"));
        }
        s.push_str("}\n");
    }
    s
}

/// What libostree runs: read the entries next to `output`
/// (`<dir of output>/entries`) and write the menu to `output`.
pub fn generate(output: &Path) -> Result<()> {
    let dir = output
        .parent()
        .with_context(|| format!("output {} has no directory", output.display()))?;
    let entries = read_entries(&dir.join("entries"))?;
    if entries.is_empty() {
        bail!(
            "no ostree-*.conf boot entries in {}: nothing to boot",
            dir.join("entries").display()
        );
    }
    crate::durable::write_mode(output, render_config(&entries).as_bytes(), 0o644)
}

/// The arguments libostree passes (`-o FILE`), as the multi-call entry sees them.
pub fn generator_output(args: &[String]) -> Result<PathBuf> {
    match args {
        [o, path] if o == "-o" => Ok(PathBuf::from(path)),
        _ => bail!(
            "usage: {GENERATOR_NAME} -o FILE (run by libostree's grub2 backend through \
             OSTREE_GRUB2_EXEC; it reads the boot entries in the directory of FILE)"
        ),
    }
}

/// Is this process libostree's generator? Either it was called by
/// [`GENERATOR_NAME`] (the tree's symlink), or libostree's grub2 backend
/// spawned it under any other name (`host-full` itself, so a machine without
/// the tree's symlink can service a disk): then [`BOOTVERSION_ENV`] is set and
/// the arguments are exactly `-o FILE`, which no `host` command accepts.
pub fn is_generator_call(argv0: &str, args: &[String], bootversion_env: bool) -> bool {
    let by_name = Path::new(argv0).file_name() == Some(std::ffi::OsStr::new(GENERATOR_NAME));
    let by_call = bootversion_env && matches!(args, [o, _] if o == "-o");
    by_name || by_call
}

/// A GRUB environment block: `name=value` lines in order, unknown names kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrubEnv {
    vars: Vec<(String, String)>,
}

impl GrubEnv {
    /// Parse a block (`#` lines and padding ignored). GRUB escapes `\\` in
    /// values with a backslash; it is unescaped here.
    pub fn parse(bytes: &[u8]) -> Result<GrubEnv> {
        let text = String::from_utf8_lossy(bytes);
        if !text.starts_with(GRUBENV_HEADER) {
            bail!("not a GRUB environment block (it must begin with {GRUBENV_HEADER:?})");
        }
        let mut env = GrubEnv::default();
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let mut value = String::new();
            let mut chars = v.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
            env.set(k, &value);
        }
        Ok(env)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, key: &str, value: &str) {
        match self.vars.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value.to_string(),
            None => self.vars.push((key.to_string(), value.to_string())),
        }
    }

    pub fn unset(&mut self, key: &str) {
        self.vars.retain(|(k, _)| k != key);
    }

    pub fn vars(&self) -> &[(String, String)] {
        &self.vars
    }

    /// The block: header, `name=value` lines, `#` padding to exactly 1024 bytes.
    pub fn to_block(&self) -> Result<Vec<u8>> {
        let mut out = GRUBENV_HEADER.to_string();
        for (k, v) in &self.vars {
            if k.is_empty() || k.contains(['=', '\n', '#']) {
                bail!("GRUB environment variable name {k:?} is not allowed");
            }
            if v.contains('\n') {
                bail!("GRUB environment variable {k}: a value cannot span lines");
            }
            let v = v.replace('\\', "\\\\");
            out.push_str(&format!("{k}={v}\n"));
        }
        if out.len() > GRUBENV_SIZE {
            bail!(
                "the GRUB environment block would take {} bytes; GRUB's holds {GRUBENV_SIZE}",
                out.len()
            );
        }
        let mut bytes = out.into_bytes();
        bytes.resize(GRUBENV_SIZE, b'#');
        Ok(bytes)
    }

    /// Read `path`; a missing file is an empty environment.
    pub fn read(path: &Path) -> Result<GrubEnv> {
        match std::fs::read(path) {
            Ok(b) => GrubEnv::parse(&b).with_context(|| format!("reading {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(GrubEnv::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Replace `path` atomically (GRUB itself writes the block in place; a
    /// rename gives it a new, equally sized file).
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::durable::write_mode(path, &self.to_block()?, 0o644)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E1: &str = "title Debian GNU/Linux 12 (bookworm) 1.2 (ostree:cairn:0)\n\
        version 2\n\
        options root=LABEL=root rw console=ttyS0 ostree=/ostree/boot.1/cairn/abc/0\n\
        linux /ostree/cairn-abc/vmlinuz-6.1.0-28-amd64\n\
        initrd /ostree/cairn-abc/initramfs-6.1.0-28-amd64.img\n";
    const E2: &str = "title Debian GNU/Linux 12 (bookworm) 1.1 (ostree:cairn:1)\n\
        version 1\n\
        options root=LABEL=root rw console=ttyS0 ostree=/ostree/boot.1/cairn/def/0\n\
        linux /ostree/cairn-def/vmlinuz-6.1.0-28-amd64\n\
        initrd /ostree/cairn-def/initramfs-6.1.0-28-amd64.img\n";

    #[test]
    fn entries_become_menu_entries_default_first() {
        let dir = tempfile::tempdir().unwrap();
        let entries = dir.path().join("entries");
        std::fs::create_dir(&entries).unwrap();
        // File names do not decide the order; `version` does (highest first).
        std::fs::write(entries.join("ostree-1-cairn.conf"), E2).unwrap();
        std::fs::write(entries.join("ostree-2-cairn.conf"), E1).unwrap();
        std::fs::write(entries.join("other.conf"), "linux /x\n").unwrap();
        let out = dir.path().join("grub.cfg");
        generate(&out).unwrap();
        let cfg = std::fs::read_to_string(&out).unwrap();
        let first = cfg
            .find("menuentry 'Debian GNU/Linux 12 (bookworm) 1.2")
            .unwrap();
        let second = cfg
            .find("menuentry 'Debian GNU/Linux 12 (bookworm) 1.1")
            .unwrap();
        assert!(first < second, "{cfg}");
        assert_eq!(cfg.matches("menuentry ").count(), 2, "{cfg}");
        assert!(cfg.contains(
            "  linux /ostree/cairn-abc/vmlinuz-6.1.0-28-amd64 root=LABEL=root rw console=ttyS0 ostree=/ostree/boot.1/cairn/abc/0\n\
             \x20 initrd /ostree/cairn-abc/initramfs-6.1.0-28-amd64.img\n"
        ), "{cfg}");
        assert!(cfg.contains("--id 'ostree-0'") && cfg.contains("--id 'ostree-1'"));
        assert!(cfg.contains("serial --unit=0 --speed=115200\n"));
        assert!(cfg.contains("terminal_output serial console\n"));
        // The counter comes before the menu and never uses `increment`.
        let counter = cfg.find("load_env boot_counter boot_success").unwrap();
        assert!(counter < first);
        assert!(!cfg.contains("increment") && !cfg.contains("decrement"));
        assert!(!dir.path().join(".grub.cfg.tmp").exists());
    }

    #[test]
    fn the_counter_counts_down_then_falls_back_to_entry_1() {
        let cfg = render_config(&[]);
        let body = |n: u32| {
            format!(
                "elif [ \"${{boot_counter}}\" = \"{n}\" ]; then\n    set boot_counter={}\n",
                n - 1
            )
        };
        for n in 1..=BOOT_ATTEMPTS {
            assert!(cfg.contains(&body(n)), "{n}:\n{cfg}");
        }
        assert!(cfg.contains(
            "if [ \"${boot_counter}\" = \"0\" -o \"${boot_counter}\" = \"-1\" ]; then\n    set default=1\n    set boot_counter=-1\n"
        ));
        assert!(cfg.contains("  save_env boot_counter\nfi\n"));
        assert!(cfg.contains("if [ -n \"${boot_counter}\" -a \"${boot_success}\" = \"0\" ]; then"));
    }

    #[test]
    fn titles_are_quoted_and_entries_need_linux() {
        let e = parse_entry("ostree-1-x.conf", "title it's\nlinux /k\n").unwrap();
        let cfg = render_config(&[e]);
        assert!(cfg.contains("menuentry 'it'\\''s' "), "{cfg}");
        let err = parse_entry("ostree-1-x.conf", "title t\n").unwrap_err();
        assert!(format!("{err:#}").contains("no `linux` line"));
    }

    #[test]
    fn versions_sort_like_strverscmp() {
        use std::cmp::Ordering::*;
        assert_eq!(version_cmp("10", "9"), Greater);
        assert_eq!(version_cmp("2", "2"), Equal);
        assert_eq!(version_cmp("1.10", "1.9"), Greater);
        assert_eq!(version_cmp("a", "b"), Less);
    }

    #[test]
    fn generator_wants_dash_o() {
        assert_eq!(
            generator_output(&["-o".into(), "/boot/loader.1/grub.cfg".into()]).unwrap(),
            PathBuf::from("/boot/loader.1/grub.cfg")
        );
        assert!(generator_output(&[]).is_err());
    }

    #[test]
    fn the_generator_is_told_by_its_name_or_by_libostrees_call() {
        let o = |f: &str| vec!["-o".to_string(), f.to_string()];
        let cfg = o("/mnt/disk/boot/loader.1/grub.cfg");
        // The tree's symlink: by name, whatever the environment.
        assert!(is_generator_call(
            "/usr/lib/cairn/grub2-generate",
            &cfg,
            false
        ));
        // host-full spawned by libostree on a machine without the symlink.
        assert!(is_generator_call("/usr/bin/host-full", &cfg, true));
        // Not from libostree, or not its arguments: a `host` command.
        assert!(!is_generator_call("/usr/bin/host-full", &cfg, false));
        let upgrade = ["upgrade".to_string(), "--json".to_string()];
        assert!(!is_generator_call("/usr/bin/host-full", &upgrade, true));
        assert!(!is_generator_call("host-full", &["-o".to_string()], true));
    }

    #[test]
    fn grubenv_is_exactly_1024_bytes_and_round_trips() {
        let mut env = GrubEnv::default();
        env.set("saved_entry", "ostree-0");
        env.set(BOOT_COUNTER, "3");
        env.set(BOOT_SUCCESS, "0");
        let block = env.to_block().unwrap();
        assert_eq!(block.len(), GRUBENV_SIZE);
        assert!(block.starts_with(
            b"# GRUB Environment Block\nsaved_entry=ostree-0\nboot_counter=3\nboot_success=0\n#"
        ));
        assert!(block.ends_with(b"####"));
        assert_eq!(GrubEnv::parse(&block).unwrap(), env);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        assert_eq!(GrubEnv::read(&path).unwrap(), GrubEnv::default());
        env.write(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1024);
        let mut back = GrubEnv::read(&path).unwrap();
        back.unset(BOOT_COUNTER);
        back.set(BOOT_SUCCESS, "1");
        back.write(&path).unwrap();
        let again = GrubEnv::read(&path).unwrap();
        assert_eq!(
            again.get("saved_entry"),
            Some("ostree-0"),
            "unknown keys kept"
        );
        assert_eq!(again.get(BOOT_COUNTER), None);
        assert_eq!(again.get(BOOT_SUCCESS), Some("1"));
    }

    #[test]
    fn grubenv_reads_what_grub_editenv_writes_and_refuses_overflow() {
        // grub-editenv's format (Debian 12): header, a warning comment,
        // lines, '#' padding; backslash escapes.
        let mut block = b"# GRUB Environment Block\n\
            # WARNING: Do not edit this file by tools other than grub-editenv!!!\n\
            boot_counter=-1\nodd=a\\\\b\n"
            .to_vec();
        block.resize(1024, b'#');
        let env = GrubEnv::parse(&block).unwrap();
        assert_eq!(env.get(BOOT_COUNTER), Some("-1"));
        assert_eq!(env.get("odd"), Some("a\\b"));
        assert_eq!(env.vars().len(), 2);
        let mut plain = b"# GRUB Environment Block\nboot_counter=-1\nodd=a\\\\b\n".to_vec();
        plain.resize(1024, b'#');
        assert_eq!(env.to_block().unwrap(), plain);

        assert!(GrubEnv::parse(b"boot_counter=1\n").is_err());
        let mut big = GrubEnv::default();
        big.set("x", &"y".repeat(1100));
        assert!(format!("{:#}", big.to_block().unwrap_err()).contains("1024"));
    }
}
