//! Block-level pieces of a disk image: the GPT, loop devices attached per
//! partition (this machine has no partition scanning on loop devices), file
//! systems, mounts. Every resource is held by a guard that releases it on drop,
//! so an error anywhere leaves no loop device or mount behind.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// GPT partition type of the /boot partition: plain "Linux filesystem data".
const BOOT_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
/// GPT partition type of the root partition: "Linux root (x86-64)" of the
/// discoverable partitions specification.
const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";

/// Where syslinux-common puts the MBR boot code that chain-loads the GPT
/// partition marked `LegacyBIOSBootable`.
pub const GPTMBR_BIN: &str = "/usr/lib/syslinux/mbr/gptmbr.bin";

/// One partition of the written table, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub size: u64,
}

/// The two partitions of a cairn disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub boot: Extent,
    pub root: Extent,
}

/// The sfdisk script of a cairn disk: /boot first (BIOS-bootable), root fills the rest.
pub fn sfdisk_script(boot_mib: u64) -> String {
    format!(
        "label: gpt\n\
         size={boot_mib}MiB, type={BOOT_TYPE}, name=\"boot\", attrs=\"LegacyBIOSBootable\"\n\
         type={ROOT_TYPE}, name=\"root\"\n"
    )
}

/// Write the partition table into `image` (a regular file) with sfdisk and
/// read the resulting layout back.
pub fn partition(image: &Path, boot_mib: u64) -> Result<Layout> {
    let script = sfdisk_script(boot_mib);
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(image)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running sfdisk (Debian package fdisk; scripts/setup installs it)")?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .context("writing the partition script to sfdisk")?;
    let out = child.wait_with_output().context("waiting for sfdisk")?;
    if !out.status.success() {
        bail!(
            "sfdisk could not partition {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    read_layout(image)
}

#[derive(Deserialize)]
struct SfdiskDump {
    partitiontable: SfdiskTable,
}

#[derive(Deserialize)]
struct SfdiskTable {
    #[serde(default)]
    sectorsize: Option<u64>,
    partitions: Vec<SfdiskPartition>,
}

#[derive(Deserialize)]
struct SfdiskPartition {
    start: u64,
    size: u64,
}

/// Partition offsets as `sfdisk -J` reports them.
pub fn read_layout(image: &Path) -> Result<Layout> {
    let out = Command::new("sfdisk")
        .arg("-J")
        .arg(image)
        .output()
        .context("running sfdisk -J")?;
    if !out.status.success() {
        bail!(
            "sfdisk -J {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_layout(&out.stdout).with_context(|| format!("reading the GPT of {}", image.display()))
}

/// Parse `sfdisk -J` output of a two-partition cairn disk.
pub fn parse_layout(json: &[u8]) -> Result<Layout> {
    let dump: SfdiskDump = serde_json::from_slice(json).context("parsing sfdisk -J output")?;
    let sector = dump.partitiontable.sectorsize.unwrap_or(512);
    let parts = &dump.partitiontable.partitions;
    if parts.len() != 2 {
        bail!("expected 2 partitions (boot, root), found {}", parts.len());
    }
    let extent = |p: &SfdiskPartition| Extent {
        offset: p.start * sector,
        size: p.size * sector,
    };
    Ok(Layout {
        boot: extent(&parts[0]),
        root: extent(&parts[1]),
    })
}

/// Put syslinux's GPT-aware MBR boot code into the first 440 bytes, leaving
/// the (protective) partition entries after it untouched.
pub fn install_gptmbr(image: &Path) -> Result<()> {
    let code = std::fs::read(GPTMBR_BIN)
        .with_context(|| format!("reading {GPTMBR_BIN} (Debian package syslinux-common)"))?;
    if code.len() > 440 {
        bail!(
            "{GPTMBR_BIN} is {} bytes; MBR boot code must fit in 440",
            code.len()
        );
    }
    let file = File::options()
        .write(true)
        .open(image)
        .with_context(|| format!("opening {} to write the MBR", image.display()))?;
    file.write_all_at(&code, 0)
        .with_context(|| format!("writing the MBR boot code into {}", image.display()))?;
    Ok(())
}

/// A loop device attached to one byte range of an image file; detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    attached: bool,
}

impl LoopDevice {
    pub fn attach(image: &Path, extent: Extent) -> Result<LoopDevice> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(format!("--offset={}", extent.offset))
            .arg(format!("--sizelimit={}", extent.size))
            .arg(image)
            .output()
            .context("running losetup (Debian package mount)")?;
        if !out.status.success() {
            bail!(
                "attaching a loop device to {} at offset {}: {} (is the loop module loaded and are you root?)",
                image.display(),
                extent.offset,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if !path.starts_with("/dev") {
            bail!(
                "losetup printed an unexpected device name {}",
                path.display()
            );
        }
        Ok(LoopDevice {
            path,
            attached: true,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Detach now, reporting failure (the success path).
    pub fn detach(mut self) -> Result<()> {
        self.attached = false;
        detach_loop(&self.path)
    }
}

fn detach_loop(path: &Path) -> Result<()> {
    let out = Command::new("losetup")
        .arg("--detach")
        .arg(path)
        .output()
        .context("running losetup --detach")?;
    if !out.status.success() {
        bail!(
            "detaching {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if self.attached {
            if let Err(err) = detach_loop(&self.path) {
                tracing::warn!("cleanup: {err:#}");
            }
        }
    }
}

/// `mkfs.ext4` on a device. `extlinux_compatible` turns off the `64bit` and
/// `metadata_csum` features that extlinux cannot read.
pub fn mkfs_ext4(device: &Path, label: &str, extlinux_compatible: bool) -> Result<()> {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", label]);
    if extlinux_compatible {
        cmd.args(["-O", "^64bit,^metadata_csum"]);
    }
    cmd.arg(device);
    let out = cmd
        .output()
        .context("running mkfs.ext4 (Debian package e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "mkfs.ext4 -L {label} {}: {}",
            device.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// An ext4 mount; unmounted on drop (lazily if it is still busy then).
#[derive(Debug)]
pub struct Mount {
    target: PathBuf,
    mounted: bool,
}

impl Mount {
    pub fn ext4(device: &Path, target: &Path) -> Result<Mount> {
        std::fs::create_dir_all(target)
            .with_context(|| format!("creating mount point {}", target.display()))?;
        nix::mount::mount(
            Some(device),
            target,
            Some("ext4"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting {} on {}", device.display(), target.display()))?;
        Ok(Mount {
            target: target.to_owned(),
            mounted: true,
        })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Unmount now, reporting failure (the success path).
    pub fn unmount(mut self) -> Result<()> {
        self.mounted = false;
        nix::mount::umount(&self.target)
            .with_context(|| format!("unmounting {}", self.target.display()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        if let Err(err) = nix::mount::umount(&self.target) {
            tracing::warn!(
                "cleanup: unmounting {}: {err}; detaching it lazily",
                self.target.display()
            );
            if let Err(err) = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH) {
                tracing::warn!("cleanup: lazy unmount of {}: {err}", self.target.display());
            }
        }
    }
}

/// A scratch directory for mount points, removed on drop with `rmdir` only:
/// never recursively, so a mount that failed to go away is not emptied.
#[derive(Debug)]
pub struct MountDir {
    path: PathBuf,
}

impl MountDir {
    pub fn new() -> Result<MountDir> {
        let path = tempfile::Builder::new()
            .prefix("cairn-image-")
            .tempdir()
            .context("creating a scratch directory for mount points")?
            .keep();
        Ok(MountDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for MountDir {
    fn drop(&mut self) {
        // The root mount point holds the /boot mount point; remove inner first.
        for sub in ["root/boot", "root"] {
            let _ = std::fs::remove_dir(self.path.join(sub));
        }
        if let Err(err) = std::fs::remove_dir(&self.path) {
            tracing::warn!("cleanup: removing {}: {err}", self.path.display());
        }
    }
}

/// `extlinux --install` into a directory of the mounted /boot.
pub fn install_extlinux(dir: &Path) -> Result<()> {
    let out = Command::new("extlinux")
        .arg("--install")
        .arg(dir)
        .output()
        .context("running extlinux (Debian package extlinux)")?;
    if !out.status.success() {
        bail!(
            "extlinux --install {}: {}{}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_marks_boot_bios_bootable_and_sizes_it() {
        let s = sfdisk_script(512);
        assert!(s.starts_with("label: gpt\n"));
        let boot = s.lines().nth(1).unwrap();
        assert!(boot.contains("size=512MiB"), "{boot}");
        assert!(boot.contains("attrs=\"LegacyBIOSBootable\""), "{boot}");
        let root = s.lines().nth(2).unwrap();
        assert!(!root.contains("size="), "root fills the disk: {root}");
    }

    #[test]
    fn layout_from_sfdisk_json() {
        let json = br#"{
           "partitiontable": {
              "label": "gpt", "id": "X", "device": "disk.img", "unit": "sectors",
              "firstlba": 2048, "lastlba": 16777182, "sectorsize": 512,
              "partitions": [
                 {"node": "disk.img1", "start": 2048, "size": 1048576,
                  "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "uuid": "A", "name": "boot",
                  "attrs": "LegacyBIOSBootable"},
                 {"node": "disk.img2", "start": 1050624, "size": 15726559,
                  "type": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", "uuid": "B", "name": "root"}
              ]
           }
        }"#;
        let layout = parse_layout(json).unwrap();
        assert_eq!(
            layout.boot,
            Extent {
                offset: 2048 * 512,
                size: 512 << 20
            }
        );
        assert_eq!(layout.root.offset, 1050624 * 512);
        assert_eq!(layout.root.size, 15726559 * 512);
    }

    #[test]
    fn layout_rejects_other_tables() {
        let json = br#"{"partitiontable": {"partitions": [{"start": 2048, "size": 10}]}}"#;
        let err = parse_layout(json).unwrap_err();
        assert!(
            format!("{err:#}").contains("expected 2 partitions"),
            "{err:#}"
        );
    }
}
