//! Small reads of procfs files, which report a size of 0: std's readers
//! then probe them 32 bytes at a time (six reads for `/proc/PID/stat`),
//! on the start path of every container.

use std::io::Read;

/// Bound on what [`read_small`] returns; procfs lines it is used for are
/// well under it.
const MAX: usize = 4096;

/// The whole file, read with one buffer (a read and the read at its end).
/// More than 4 KiB is an error: this is for one-line files.
pub fn read_small(path: &str) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; MAX + 1];
    let mut len = 0;
    loop {
        match file.read(&mut buf[len..])? {
            0 => break,
            n => len += n,
        }
        if len > MAX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{path}: over {MAX} bytes"),
            ));
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_procfs_file_whole_and_refuses_a_long_one() {
        let stat = super::read_small("/proc/self/stat").unwrap();
        assert!(stat.ends_with('\n') && stat.contains(") "), "{stat}");
        assert_eq!(
            super::read_small("/proc/sys/kernel/random/boot_id")
                .unwrap()
                .trim()
                .len(),
            36
        );
        let dir = tempfile::tempdir().unwrap();
        let long = dir.path().join("long");
        std::fs::write(&long, vec![b'x'; 5000]).unwrap();
        let err = super::read_small(long.to_str().unwrap()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        let exact = dir.path().join("exact");
        std::fs::write(&exact, vec![b'y'; 4096]).unwrap();
        assert_eq!(
            super::read_small(exact.to_str().unwrap()).unwrap().len(),
            4096
        );
    }
}
