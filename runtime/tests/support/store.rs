//! The image store of a test runtime's state root (`cairn_oci::store`), as
//! methods of the runtime. `import` also checks the image out, as `host
//! app run` does before it hands a run to the runtime (which reads only
//! checkouts).
#![allow(dead_code)]

use std::path::Path;

use anyhow::Result;
use cairn_oci::image::{ImageInfo, ImportOptions};
use cairn_oci::store::{Pruned, Store};
use cairn_runtime::Runtime;

pub trait StoreExt {
    fn store(&self) -> Store;
    fn import(&self, path: &Path, name: Option<&str>) -> Result<ImageInfo>;
    fn import_with(&self, path: &Path, opts: &ImportOptions) -> Result<ImageInfo>;
    fn images(&self) -> Result<Vec<ImageInfo>>;
    fn verify(&self, reference: &str) -> Result<(ImageInfo, usize)>;
    fn rmi(&self, reference: &str) -> Result<ImageInfo>;
    fn prune(&self) -> Result<Pruned>;
    fn repo(&self) -> Result<ostree::Repo>;
}

impl StoreExt for Runtime {
    fn store(&self) -> Store {
        Store::new(&self.paths.root)
    }
    fn import(&self, path: &Path, name: Option<&str>) -> Result<ImageInfo> {
        let info = self.store().import(path, name)?;
        self.store().checkout(&info.reference())?;
        Ok(info)
    }
    fn import_with(&self, path: &Path, opts: &ImportOptions) -> Result<ImageInfo> {
        let info = self.store().import_with(path, opts)?;
        self.store().checkout(&info.reference())?;
        Ok(info)
    }
    fn images(&self) -> Result<Vec<ImageInfo>> {
        self.store().images()
    }
    fn verify(&self, reference: &str) -> Result<(ImageInfo, usize)> {
        self.store().verify(reference)
    }
    fn rmi(&self, reference: &str) -> Result<ImageInfo> {
        self.store().rmi(reference, &self.images_in_use()?)
    }
    fn prune(&self) -> Result<Pruned> {
        self.store().prune(&self.images_in_use()?)
    }
    fn repo(&self) -> Result<ostree::Repo> {
        self.store().repo()
    }
}
