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

/// GPT partition type of the BIOS boot partition GRUB's core.img lives in.
const BIOS_BOOT_TYPE: &str = "21686148-6449-6E6F-744E-656564454649";
/// GPT partition type of the /boot partition: plain "Linux filesystem data".
const BOOT_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
/// GPT partition type of the root partition: "Linux root (x86-64)" of the
/// discoverable partitions specification.
const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
/// Size of the BIOS boot partition.
pub const BIOS_BOOT_MIB: u64 = 1;

/// Where grub-pc-bin keeps GRUB's BIOS images and modules.
pub const GRUB_I386_PC: &str = "/usr/lib/grub/i386-pc";

/// One partition of the written table, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub size: u64,
}

/// The three partitions of a cairn disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// BIOS boot partition: GRUB's core.img, no file system.
    pub bios: Extent,
    pub boot: Extent,
    pub root: Extent,
}

/// The sfdisk script of a cairn disk: the BIOS boot partition for GRUB's
/// core.img, /boot, and root filling the rest.
pub fn sfdisk_script(boot_mib: u64) -> String {
    format!(
        "label: gpt\n\
         size={BIOS_BOOT_MIB}MiB, type={BIOS_BOOT_TYPE}, name=\"bios\"\n\
         size={boot_mib}MiB, type={BOOT_TYPE}, name=\"boot\"\n\
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

/// Parse `sfdisk -J` output of a three-partition cairn disk.
pub fn parse_layout(json: &[u8]) -> Result<Layout> {
    let dump: SfdiskDump = serde_json::from_slice(json).context("parsing sfdisk -J output")?;
    let sector = dump.partitiontable.sectorsize.unwrap_or(512);
    let parts = &dump.partitiontable.partitions;
    if parts.len() != 3 {
        bail!(
            "expected 3 partitions (BIOS boot, boot, root), found {}",
            parts.len()
        );
    }
    let extent = |p: &SfdiskPartition| Extent {
        offset: p.start * sector,
        size: p.size * sector,
    };
    Ok(Layout {
        bios: extent(&parts[0]),
        boot: extent(&parts[1]),
        root: extent(&parts[2]),
    })
}

/// Modules built into core.img: enough to find /boot, read the menu and the
/// environment block, and boot Linux even if /boot/grub/i386-pc went missing.
pub const GRUB_CORE_MODULES: &[&str] = &[
    "biosdisk",
    "part_gpt",
    "ext2",
    "search",
    "configfile",
    "normal",
    "linux",
    "loadenv",
    "test",
    "echo",
    "serial",
    "terminal",
    "gzio",
    "boot",
];

/// Build GRUB's core.img with `grub-mkimage` into `out`: the BIOS disk, GPT
/// and ext4 drivers and an early configuration that finds the /boot file
/// system by its label, so the image does not depend on device names. The
/// rest (menu, boot counter) is read from `/grub` on that file system.
pub fn grub_mkimage(out: &Path, boot_label: &str) -> Result<()> {
    let dir = out.parent().context("core.img path has no directory")?;
    let early = dir.join("early.cfg");
    std::fs::write(
        &early,
        format!("search --no-floppy --label {boot_label} --set=root\nset prefix=($root)/grub\n"),
    )
    .with_context(|| format!("writing {}", early.display()))?;
    let run = Command::new("grub-mkimage")
        .args(["-O", "i386-pc", "-d", GRUB_I386_PC, "-p", "/grub", "-c"])
        .arg(&early)
        .arg("-o")
        .arg(out)
        .args(GRUB_CORE_MODULES)
        .output()
        .context("running grub-mkimage (Debian packages grub-common and grub-pc-bin; scripts/setup installs them)")?;
    if !run.status.success() {
        bail!(
            "grub-mkimage -O i386-pc: {}",
            String::from_utf8_lossy(&run.stderr).trim()
        );
    }
    Ok(())
}

/// Offsets in GRUB's boot.img and diskboot.img (grub-core/boot/i386/pc).
const BOOT_KERNEL_SECTOR: usize = 0x5c;
const BOOT_DRIVE_CHECK: usize = 0x66;
const MBR_CODE_SIZE: usize = 440;
const DISKBOOT_BLOCKLIST: usize = 0x200 - 12;

/// What `grub-bios-setup` does for a disk with a BIOS boot partition, done on
/// the image file (grub-bios-setup wants a whole-disk device it can probe,
/// which loop devices without partition scanning are not): core.img goes into
/// the BIOS boot partition with the blocklist in its first sector pointing at
/// the rest, boot.img into the first 440 bytes of the MBR pointing at core.img.
/// The protective MBR's partition entries after byte 440 stay untouched.
pub fn install_grub_bios(image: &Path, bios: Extent, core_img: &Path) -> Result<()> {
    let boot_path = Path::new(GRUB_I386_PC).join("boot.img");
    let boot_img = std::fs::read(&boot_path).with_context(|| {
        format!(
            "reading {} (Debian package grub-pc-bin)",
            boot_path.display()
        )
    })?;
    let core_img =
        std::fs::read(core_img).with_context(|| format!("reading {}", core_img.display()))?;
    let (boot, core) = patch_grub_bios(bios, &boot_img, &core_img)?;
    let file = File::options()
        .write(true)
        .open(image)
        .with_context(|| format!("opening {} to install GRUB", image.display()))?;
    file.write_all_at(&core, bios.offset).with_context(|| {
        format!(
            "writing core.img into the BIOS boot partition of {}",
            image.display()
        )
    })?;
    file.write_all_at(&boot[..MBR_CODE_SIZE], 0)
        .with_context(|| {
            format!(
                "writing GRUB's boot.img into the MBR of {}",
                image.display()
            )
        })?;
    file.sync_all()
        .with_context(|| format!("syncing {}", image.display()))?;
    Ok(())
}

/// boot.img and core.img as they go on the disk (pure, for tests).
pub fn patch_grub_bios(
    bios: Extent,
    boot_img: &[u8],
    core_img: &[u8],
) -> Result<(Vec<u8>, Vec<u8>)> {
    if boot_img.len() != 512 {
        bail!("boot.img is {} bytes, expected 512", boot_img.len());
    }
    if core_img.len() < 512 {
        bail!("core.img is {} bytes, too small", core_img.len());
    }
    if core_img.len() as u64 > bios.size {
        bail!(
            "core.img is {} bytes; the BIOS boot partition holds {}",
            core_img.len(),
            bios.size
        );
    }
    let first_sector = bios.offset / 512;
    let sectors = core_img.len().div_ceil(512);
    let mut core = core_img.to_vec();
    core.resize(sectors * 512, 0);
    // diskboot's first blocklist entry: start sector (u64) and length (u16)
    // of the rest of core.img; the load segment after them keeps its default.
    let rest = u16::try_from(sectors - 1).context("core.img has too many sectors")?;
    core[DISKBOOT_BLOCKLIST..DISKBOOT_BLOCKLIST + 8]
        .copy_from_slice(&(first_sector + 1).to_le_bytes());
    core[DISKBOOT_BLOCKLIST + 8..DISKBOOT_BLOCKLIST + 10].copy_from_slice(&rest.to_le_bytes());
    let mut boot = boot_img.to_vec();
    boot[BOOT_KERNEL_SECTOR..BOOT_KERNEL_SECTOR + 8].copy_from_slice(&first_sector.to_le_bytes());
    // A hard disk: trust the drive number the BIOS passes (grub-bios-setup
    // replaces the floppy check's jump with two NOPs).
    boot[BOOT_DRIVE_CHECK] = 0x90;
    boot[BOOT_DRIVE_CHECK + 1] = 0x90;
    Ok((boot, core))
}

/// Copy GRUB's i386-pc modules into `<grub_dir>/i386-pc`, as grub-install
/// does, so commands not built into core.img load on demand.
pub fn copy_grub_modules(grub_dir: &Path) -> Result<()> {
    let dest = grub_dir.join("i386-pc");
    std::fs::create_dir_all(&dest).with_context(|| format!("creating {}", dest.display()))?;
    let rd = std::fs::read_dir(GRUB_I386_PC)
        .with_context(|| format!("reading {GRUB_I386_PC} (Debian package grub-pc-bin)"))?;
    for e in rd {
        let e = e.with_context(|| format!("reading {GRUB_I386_PC}"))?;
        let name = e.file_name();
        let n = name.to_string_lossy();
        if n.ends_with(".mod") || n.ends_with(".lst") {
            std::fs::copy(e.path(), dest.join(&name))
                .with_context(|| format!("copying {} to {}", e.path().display(), dest.display()))?;
        }
    }
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

/// `mkfs.ext4` on a device, with the default features (GRUB reads them).
pub fn mkfs_ext4(device: &Path, label: &str) -> Result<()> {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", label]);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_has_a_bios_boot_partition_then_boot_then_root() {
        let s = sfdisk_script(512);
        assert!(s.starts_with("label: gpt\n"));
        let bios = s.lines().nth(1).unwrap();
        assert!(bios.contains("size=1MiB"), "{bios}");
        assert!(bios.contains(BIOS_BOOT_TYPE), "{bios}");
        let boot = s.lines().nth(2).unwrap();
        assert!(boot.contains("size=512MiB"), "{boot}");
        let root = s.lines().nth(3).unwrap();
        assert!(!root.contains("size="), "root fills the disk: {root}");
    }

    #[test]
    fn layout_from_sfdisk_json() {
        let json = br#"{
           "partitiontable": {
              "label": "gpt", "id": "X", "device": "disk.img", "unit": "sectors",
              "firstlba": 2048, "lastlba": 16777182, "sectorsize": 512,
              "partitions": [
                 {"node": "disk.img1", "start": 2048, "size": 2048,
                  "type": "21686148-6449-6E6F-744E-656564454649", "uuid": "C", "name": "bios"},
                 {"node": "disk.img2", "start": 4096, "size": 1048576,
                  "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "uuid": "A", "name": "boot"},
                 {"node": "disk.img3", "start": 1052672, "size": 15724511,
                  "type": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", "uuid": "B", "name": "root"}
              ]
           }
        }"#;
        let layout = parse_layout(json).unwrap();
        assert_eq!(
            layout.bios,
            Extent {
                offset: 2048 * 512,
                size: 1 << 20
            }
        );
        assert_eq!(
            layout.boot,
            Extent {
                offset: 4096 * 512,
                size: 512 << 20
            }
        );
        assert_eq!(layout.root.offset, 1052672 * 512);
        assert_eq!(layout.root.size, 15724511 * 512);
    }

    #[test]
    fn grub_bios_setup_patches_the_sector_pointers() {
        let bios = Extent {
            offset: 2048 * 512,
            size: 1 << 20,
        };
        let mut boot = vec![0u8; 512];
        boot[BOOT_DRIVE_CHECK] = 0xeb;
        let mut core = vec![0u8; 3 * 512 + 100];
        core[0x1fe] = 0x20;
        core[0x1ff] = 0x08;
        let (b, c) = patch_grub_bios(bios, &boot, &core).unwrap();
        assert_eq!(&b[0x5c..0x64], &2048u64.to_le_bytes());
        assert_eq!(&b[0x66..0x68], &[0x90, 0x90]);
        assert_eq!(c.len(), 4 * 512, "padded to whole sectors");
        assert_eq!(&c[0x1f4..0x1fc], &2049u64.to_le_bytes());
        assert_eq!(&c[0x1fc..0x1fe], &3u16.to_le_bytes());
        assert_eq!(&c[0x1fe..0x200], &[0x20, 0x08], "load segment kept");
        let too_big = vec![0u8; (1 << 20) + 1];
        assert!(patch_grub_bios(bios, &boot, &too_big).is_err());
    }

    #[test]
    fn layout_rejects_other_tables() {
        let json = br#"{"partitiontable": {"partitions": [{"start": 2048, "size": 10}]}}"#;
        let err = parse_layout(json).unwrap_err();
        assert!(
            format!("{err:#}").contains("expected 3 partitions"),
            "{err:#}"
        );
    }
}
