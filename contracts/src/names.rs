//! Names every node shares, whoever writes them (the image writer) or reads
//! them (the updater).

/// The stateroot (libostree's osname) of every cairn node.
pub const STATEROOT: &str = "cairn";
/// The remote in the node's repository that updates come from; a
/// deployment's origin is `REMOTE:REF`.
pub const REMOTE: &str = "cairn";

/// The armored public release key `host compose keygen DIR` exports into DIR,
/// for `host compose image --trust`.
pub const PUBLIC_KEY_FILE: &str = "cairn-release.asc";

/// `host` is three executables side by side: `host`, which serves the
/// container commands without libostree (their start latency and the
/// monitor's memory are the product), `host-full`, every command, which
/// `host` hands everything else to, and `host-monitor` (see
/// [`monitor_executable`]). This is the suffix of the second.
pub const FULL_EXECUTABLE_SUFFIX: &str = "-full";

/// The full executable next to the container one: `/usr/bin/host` →
/// `/usr/bin/host-full`.
pub fn full_executable(container_executable: &std::path::Path) -> std::path::PathBuf {
    sibling(container_executable, FULL_EXECUTABLE_SUFFIX)
}

/// `exe` with `suffix` appended to its file name.
fn sibling(exe: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let mut name = exe.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    exe.with_file_name(name)
}

/// The container executable next to the full one (the inverse of
/// [`full_executable`]); a path without the suffix is returned as it is.
pub fn container_executable(executable: &std::path::Path) -> std::path::PathBuf {
    match executable
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(FULL_EXECUTABLE_SUFFIX))
    {
        Some(stem) if !stem.is_empty() => executable.with_file_name(stem),
        _ => executable.to_path_buf(),
    }
}

/// The third executable, the one an idle detached monitor waits in (see
/// `cairn_runtime::idle`): `/usr/bin/host` → `/usr/bin/host-monitor`.
pub const MONITOR_EXECUTABLE_SUFFIX: &str = "-monitor";

/// The idle monitor's executable next to the container one.
pub fn monitor_executable(container_executable: &std::path::Path) -> std::path::PathBuf {
    sibling(container_executable, MONITOR_EXECUTABLE_SUFFIX)
}

/// Every executable `host` is made of, the container one first: what a
/// tree installs and what an image's identity hashes.
pub fn executables(container_executable: &std::path::Path) -> [std::path::PathBuf; 3] {
    [
        container_executable.to_path_buf(),
        full_executable(container_executable),
        monitor_executable(container_executable),
    ]
}

/// A node config `host compose image --config` writes into the image's
/// /var (the stateroot's), the last source first-boot provisioning reads.
pub const PROVISION_EMBEDDED_CONFIG: &str = "/var/lib/cairn/provision/embedded.toml";

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_two_executables_find_each_other() {
        let light = Path::new("/usr/bin/host");
        assert_eq!(full_executable(light), Path::new("/usr/bin/host-full"));
        assert_eq!(container_executable(&full_executable(light)), light);
        assert_eq!(container_executable(light), light);
        assert_eq!(
            executables(light),
            [
                light.to_path_buf(),
                Path::new("/usr/bin/host-full").to_path_buf(),
                Path::new("/usr/bin/host-monitor").to_path_buf()
            ]
        );
        assert_eq!(
            container_executable(Path::new("/x/-full")),
            Path::new("/x/-full")
        );
    }
}
