//! cairn-updater: move a node between host trees atomically (status, upgrade,
//! rollback, deploy, switch, cleanup, pin) over libostree's sysroot API.
