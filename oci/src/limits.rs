//! How much an import may read and write: one value every stage of an
//! import checks against while it streams.

/// Bounds on what an import reads and writes, each refused as soon as it is
/// exceeded (while streaming, before more is read). The defaults are in
/// docs/runtime.md; `host app import` has flags for the main ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportLimits {
    /// Uncompressed bytes of all layers together (tar headers included).
    pub max_image_size: u64,
    /// Uncompressed bytes per compressed byte of one layer, checked once
    /// the layer has produced `ratio_grace` bytes.
    pub max_ratio: u64,
    /// Uncompressed bytes of a layer before the ratio is checked.
    pub ratio_grace: u64,
    /// Tar entries of all layers together.
    pub max_entries: u64,
    /// Bytes of an entry's path, or of a link's target.
    pub max_path_len: usize,
    /// Components of an entry's path (and directories deep it may resolve to).
    pub max_path_depth: usize,
    /// Bytes of index.json, a manifest, a nested index, a config, or a
    /// docker save manifest.json.
    pub max_metadata_size: u64,
    /// Layers of the image.
    pub max_layers: usize,
    /// Bytes of one pax extended header or GNU long name in a tar.
    pub max_tar_header_size: u64,
    /// Entries of an oci-archive or docker save tar.
    pub max_archive_entries: usize,
}

impl Default for ImportLimits {
    fn default() -> Self {
        Self {
            max_image_size: 16 << 30,
            max_ratio: 100,
            ratio_grace: 8 << 20,
            max_entries: 1_000_000,
            max_path_len: 4096,
            max_path_depth: 256,
            max_metadata_size: 4 << 20,
            max_layers: 256,
            max_tar_header_size: 1 << 20,
            max_archive_entries: 100_000,
        }
    }
}
