//! Harness that boots cairn disk images under QEMU and talks to the guest.
